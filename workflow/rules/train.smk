# One grid cell: its resolved config (a record for the reader), then training (resumes from
# runs/{run}/checkpoints/ when rerun).
#
# The checkpoints folder is deliberately not an output: Snakemake deletes the outputs of a failed or interrupted
# job, and the checkpoints are what the rerun resumes from. train.json is written last, so its absence means
# "not finished" and the plain rerun of the same command resumes the training.
#
# The stages read the experiment config files with --run, not runs/{run}/config.json: were config.json an
# input, any config change would rerun everything downstream (mtime), and as an ancient() input Snakemake
# skips the downstream jobs' own params triggers while resolve reruns (it masks jobs below a rerunning one),
# so a changed train.lr would be missed. Each stage's params hold its part of the config instead.


localrules:
    resolve,


rule resolve:
    output:
        config=f"{RESULTS}/runs/{{run}}/config.json",
    log:
        f"{RESULTS}/logs/resolve/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/resolve/{{run}}.tsv"
    conda:
        "../../envs/fox.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        configfiles=get_configfiles,
        resolved=get_resolved_config,
    shell:
        "fox resolve --config {params.configfiles} --run {wildcards.run} --out {output.config} > {log} 2>&1"


rule train:
    input:
        data=f"{DATA}/manifest.json",
    output:
        summary=f"{RESULTS}/runs/{{run}}/train.json",
    log:
        f"{RESULTS}/logs/train/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{run}}.tsv"
    conda:
        "../../envs/fox.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    params:
        configfiles=get_configfiles,
        train=get_train_params,
        launcher=get_train_launcher,
    shell:
        "{params.launcher} train --config {params.configfiles} --run {wildcards.run} > {log} 2>&1"
