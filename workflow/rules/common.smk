# Config validation, wildcard constraints and the named input/params functions of the rules.
# Grid expansion, run ids and per-run configs come from fox.config, where they are unit-tested.

import json
import re
import shlex

import fox.config
import fox.preflight
from fox.data.sources import matched_files
from snakemake.utils import validate

# 1) The config, before anything else: fox.config.validate names a bad value's key and runs the cross-field checks,
#    Snakemake's validate fills the schema defaults, fox.preflight checks this machine (tokenizer, lm-eval tasks).
CONFIG = fox.config.validate(config)
validate(config, schema="../schemas/config.schema.yaml")
fox.preflight.check(CONFIG)

# 2) The stages read the experiment config from files, so --config KEY=VALUE (which exists only inside this
#    Snakemake process) would silently not reach them; overrides go into a file passed with --configfile.
if workflow.config_settings.config:
    raise fox.config.ConfigError(
        f"--config {' '.join(workflow.config_settings.config)}: put overrides into a YAML file and pass it "
        "with --configfile (the fox stages read the config files, in the order Snakemake merges them)"
    )
_FILES = (
    []
    if workflow.config_settings.replace_workflow_config
    else [os.path.join(workflow.basedir, "config.yaml")]
)
CONFIGFILES = " ".join(
    shlex.quote(str(p)) for p in _FILES + list(workflow.overwrite_configfiles)
)

RESULTS = CONFIG["results_dir"]
DATA = fox.config.data_dir(CONFIG)
RUNS = fox.config.run_ids(CONFIG)
PLOTS = ["loss_by_position", "ppl_by_length", "niah", "acp_pruned"]


def _alternatives(values):
    return "|".join(re.escape(str(v)) for v in values)


wildcard_constraints:
    run=_alternatives(RUNS),
    corpus=_alternatives([CONFIG["corpus"]["name"]]),
    tokenizer=_alternatives([CONFIG["tokenizer"]["name"]]),
    plot=_alternatives(PLOTS),


def _json(value):
    """Params are compared as text by Snakemake's params rerun trigger: one canonical JSON string."""
    return json.dumps(value, sort_keys=True)


def _resolved(run):
    return fox.config.resolve_run(CONFIG, run)


# 3) Missing inputs fail at parse time (before any job), naming the key.
def get_corpus_files(wildcards):
    """Local corpus files: inputs of tokenize, so a changed file re-tokenizes."""
    corpus, tokenizer = CONFIG["corpus"], CONFIG["tokenizer"]
    files = []
    if corpus["source"] in ("files", "npy"):
        files = matched_files(tuple(corpus["files"]))
    elif corpus["source"] == "hf" and corpus["data_files"]:
        files = matched_files(tuple(corpus["data_files"]))
    if tokenizer["rank_file"] is not None:
        files.append(tokenizer["rank_file"])
    return files


# 4) Params hold exactly what a stage's output depends on, so that Snakemake's params trigger reruns a stage
#    when (and only when) its part of the config changes (see train.smk for why not runs/{run}/config.json).
def get_configfiles(wildcards, input):
    """The config files for `fox <stage> --config`, in Snakemake's merge order (a derived param: it takes
    `input`, so the params trigger ignores it; the values are tracked by each rule's other params)
    """
    return CONFIGFILES


def get_data_params(wildcards):
    return _json({key: CONFIG[key] for key in ("corpus", "tokenizer")})


def get_data_dir(wildcards):
    return DATA


def get_resolved_config(wildcards):
    return _json(_resolved(wildcards.run))


def get_train_params(wildcards):
    """Without the logging and checkpoint cadence: changing it retrains nothing."""
    return _json(fox.config.training_settings(_resolved(wildcards.run)))


def get_average_params(wildcards):
    return _json(_resolved(wildcards.run)["average"])


def get_evaluate_params(wildcards):
    return _json(_resolved(wildcards.run)["evaluate"])


def get_longbench_params(wildcards):
    return _json(_resolved(wildcards.run)["longbench"])


def get_train_launcher(wildcards, resources):
    """One process (`fox`) for CPU or one GPU; DeepSpeed's launcher for several GPUs of the job's node.

    A params function that takes `resources` is a derived param: the GPU count reruns nothing.
    """
    gpus = int(resources.get("gpu", 0))
    return f"deepspeed --num_gpus {gpus} --module fox.cli" if gpus > 1 else "fox"


def get_plot_dir(wildcards):
    return f"{RESULTS}/plots"


def get_eval_files(wildcards):
    return expand(f"{RESULTS}/eval/{{run}}.json", run=RUNS)


def get_longbench_files(wildcards):
    return expand(f"{RESULTS}/eval/longbench/{{run}}.json", run=RUNS)


def get_plot_files(wildcards):
    return expand(f"{RESULTS}/plots/{{plot}}.png", plot=PLOTS)


def get_run_config_files(wildcards):
    return expand(f"{RESULTS}/runs/{{run}}/config.json", run=RUNS)


def get_averaged_files(wildcards):
    return expand(f"{RESULTS}/runs/{{run}}/averaged.pt", run=RUNS)


def get_final_outputs(wildcards):
    tables = [f"{RESULTS}/table1.csv", f"{RESULTS}/table1.md"]
    tables += fox.config.longbench_outputs(CONFIG)
    return tables + get_plot_files(wildcards) + get_run_config_files(wildcards)
