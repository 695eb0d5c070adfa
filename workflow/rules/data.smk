# Corpus -> token shards + manifest.json (written last by `fox tokenize`).


rule tokenize:
    input:
        corpus=get_corpus_files,
    output:
        manifest=f"{RESULTS}/data/{{corpus}}/{{tokenizer}}/manifest.json",
    log:
        f"{RESULTS}/logs/tokenize/{{corpus}}/{{tokenizer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenize/{{corpus}}/{{tokenizer}}.tsv"
    conda:
        "../../envs/fox.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        configfiles=get_configfiles,
        data=get_data_params,
        out=get_data_dir,
    shell:
        "fox tokenize --config {params.configfiles} --out {params.out} --workers {threads} > {log} 2>&1"
