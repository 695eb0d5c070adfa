# Average the last checkpoints of a run, then evaluate the averaged model; LongBench (longbench.enabled) is
# a rule of its own: hours of generation on a GPU that no other setting should rerun.


rule average:
    input:
        summary=f"{RESULTS}/runs/{{run}}/train.json",
    output:
        model=f"{RESULTS}/runs/{{run}}/averaged.pt",
    log:
        f"{RESULTS}/logs/average/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/average/{{run}}.tsv"
    conda:
        "../../envs/fox.yaml"
    threads: 1
    resources:
        mem_mb=fox.config.average_mem_mb(CONFIG),
        runtime=30,
    params:
        configfiles=get_configfiles,
        average=get_average_params,
    shell:
        "fox average --config {params.configfiles} --run {wildcards.run} --out {output.model} > {log} 2>&1"


rule evaluate:
    input:
        model=f"{RESULTS}/runs/{{run}}/averaged.pt",
        data=f"{DATA}/manifest.json",
    output:
        json=f"{RESULTS}/eval/{{run}}.json",
    log:
        f"{RESULTS}/logs/evaluate/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{run}}.tsv"
    conda:
        "../../envs/fox.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    params:
        configfiles=get_configfiles,
        evaluate=get_evaluate_params,
    shell:
        "fox evaluate --config {params.configfiles} --run {wildcards.run} --in {input.model} --out {output.json} "
        "> {log} 2>&1"


rule longbench:
    input:
        model=f"{RESULTS}/runs/{{run}}/averaged.pt",
        data=f"{DATA}/manifest.json",
    output:
        json=f"{RESULTS}/eval/longbench/{{run}}.json",
    log:
        f"{RESULTS}/logs/longbench/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/longbench/{{run}}.tsv"
    conda:
        "../../envs/fox.yaml"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=0,
    params:
        configfiles=get_configfiles,
        longbench=get_longbench_params,
    shell:
        "fox longbench --config {params.configfiles} --run {wildcards.run} --in {input.model} "
        "--out {output.json} > {log} 2>&1"
