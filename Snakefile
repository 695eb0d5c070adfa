# fox: pretrain and evaluate the Forgetting Transformer (FoX) with Adaptive Computation Pruning.
#
#   snakemake --cores all                                         embedded default (config.yaml), CPU, minutes
#   snakemake --cores all --configfile configs/fox-paper.yaml     a paper grid (merged over config.yaml)
#   snakemake --profile profiles/slurm --configfile configs/...   the same rules on a SLURM cluster
#
# Layout under results_dir (config.yaml: results), {run} = <model>-<block>-<size>-ctx<context>-<acp|dense>
# (a Table 3 variant appends its edits: ...-dense-no_qknorm):
#   data/{corpus}/{tokenizer}/manifest.json    token shards + checksums                 rule tokenize
#   runs/{run}/config.json                     the run's resolved config (a record)     rule resolve
#   runs/{run}/checkpoints/                    DeepSpeed checkpoints (kept on interrupt) rule train
#   runs/{run}/train.json                      written last by `fox train`: run done    rule train
#   runs/{run}/averaged.pt                     averaged fp32 weights                    rule average
#   eval/{run}.json                            lm-eval, losses, NIAH, ACP stats         rule evaluate
#   plots/*.png                                loss by position, ppl by length, ...    rule plot
#   eval/longbench/{run}.json, longbench.csv  LongBench, Table 2 (longbench.enabled)  rules longbench, longbench_table
#   table1.csv, table1.md                      Table 1 of the papers, one row per run   rule table
#   mlflow.db, mlartifacts/                    MLflow store (browse: docs/PIPELINE.md)
#   logs/{rule}/{wildcards}.log, benchmarks/{rule}/{wildcards}.tsv
# After a kill: docs/PIPELINE.md ("Interrupting and resuming"); a report: snakemake --report report.html

from snakemake.utils import min_version

import fox.config

min_version("9.0")

# a syntax error in config.yaml is named with its line (Snakemake's own message names neither)
fox.config.read_yaml(os.path.join(workflow.basedir, "config.yaml"))


configfile: os.path.join(workflow.basedir, "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs,


onsuccess:
    from fox.report import announce_at_exit

    announce_at_exit(CONFIG)
