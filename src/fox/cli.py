"""`fox <stage>`: the command line the Snakemake rules call. It only parses arguments and dispatches.

    fox validate --config config.yaml
    fox runs     --config config.yaml
    fox tokenize --config config.yaml --out results/data/stdlib/bytes
    fox resolve  --config config.yaml --run RUN --out results/runs/RUN/config.json
    fox train    --config results/runs/RUN/config.json            (or: --config config.yaml --run RUN)
    fox average  --config results/runs/RUN/config.json --out results/runs/RUN/averaged.pt
    fox evaluate --config results/runs/RUN/config.json --in results/runs/RUN/averaged.pt \
                 --out results/eval/RUN.json
    fox plot     --config config.yaml --in results/eval/*.json --out results/plots
    fox table    --config config.yaml --in results/eval/*.json --out results/table1.csv
    fox longbench --config results/runs/RUN/config.json --in results/runs/RUN/averaged.pt \
                 --out results/eval/longbench/RUN.json
    fox longbench-table --config config.yaml --in results/eval/longbench/*.json --out results/longbench.csv \
                 --plot results/plots/longbench.png

train, average and evaluate also take the experiment config file(s) with --run RUN instead of a config.json
(the Snakemake rules do: see workflow/rules/train.smk); several --config files merge left to right.

Multi-GPU training: `deepspeed --num_gpus N --module fox.cli train ...` or
`torchrun --nproc_per_node N -m fox.cli train ...`.
A bad value stops the command with one line naming it (exit 2) before anything is written; FOX_DEBUG=1 shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fox import config as fox_config
from fox.files import write_atomic


def _experiment(paths: list[str]) -> dict:
    """The experiment config: one file, or several merged in order (as snakemake --configfile merges them)."""
    return fox_config.load_config(*paths)


def _run_config(paths: list[str], run: str | None) -> dict:
    """A resolved run config: runs/{run}/config.json as is, or resolved from the experiment config and --run."""
    if len(paths) == 1 and Path(paths[0]).suffix == ".json":
        path = paths[0]
        if run is not None:
            raise fox_config.ConfigError("--run goes with an experiment config (.yaml), not a resolved config.json")
        return fox_config.load_run_config(path)
    if run is None:
        raise fox_config.ConfigError(f"--config {' '.join(paths)} is an experiment config: name the grid cell with "
                                     f"--run; runs are: {', '.join(fox_config.run_ids(_experiment(paths)))}")
    return fox_config.resolve_run(_experiment(paths), run)


def _write_json(path: str | Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")


def cmd_validate(args) -> None:
    from fox import preflight

    cfg = _experiment(args.config)
    preflight.check(cfg)
    print(f"{' '.join(args.config)}: valid, {len(fox_config.run_ids(cfg))} runs")


def cmd_runs(args) -> None:
    print("\n".join(fox_config.run_ids(_experiment(args.config))))


def cmd_tokenize(args) -> None:
    from fox.data import CorpusConfig, TokenizerConfig, tokenize_corpus

    cfg = _experiment(args.config)
    corpus, tokenizer = CorpusConfig(**cfg["corpus"]), TokenizerConfig(**cfg["tokenizer"])
    tokenize_corpus(corpus, tokenizer, args.out or fox_config.data_dir(cfg), workers=args.workers)


def cmd_resolve(args) -> None:
    _write_json(args.out, fox_config.resolve_run(_experiment(args.config), args.run))


def cmd_train(args) -> None:
    from fox.train import RunBusy, TrainingDiverged, train

    run_cfg = _run_config(args.config, args.run)
    Path(run_cfg["run_dir"]).mkdir(parents=True, exist_ok=True)
    try:
        train(run_cfg, stop_after_steps=args.stop_after_steps)
    except (TrainingDiverged, RunBusy) as error:
        print(f"fox train: error: {error}", file=sys.stderr)
        sys.exit(1)


def cmd_average(args) -> None:
    from fox.eval import average_checkpoints

    average_checkpoints(_run_config(args.config, args.run), Path(args.out))


def cmd_evaluate(args) -> None:
    from fox.eval import evaluate

    evaluate(_run_config(args.config, args.run), Path(args.inputs[0]), Path(args.out))


def cmd_longbench(args) -> None:
    from fox.eval.longbench import longbench

    longbench(_run_config(args.config, args.run), Path(args.inputs[0]), Path(args.out))


def cmd_longbench_table(args) -> None:
    from fox.report.longbench import longbench_table

    longbench_table(_experiment(args.config), [Path(p) for p in args.inputs], Path(args.out), Path(args.plot))


def cmd_plot(args) -> None:
    from fox.report import plot

    plot(_experiment(args.config), [Path(p) for p in args.inputs], Path(args.out))


def cmd_table(args) -> None:
    from fox.report import table

    table(_experiment(args.config), [Path(p) for p in args.inputs], Path(args.out))


STAGES = {
    "validate": "Check config files (merged in order) against the schema, then against this machine: corpus files, "
                "that the tokenizer loads (offline: a GPT-2 rank file), that lm-eval knows every task and that the "
                "NIAH prompts fit. Prints the number of runs; writes nothing. The Snakefile runs the same checks.",
    "runs": "List the run ids of the config's grid, <model>-<block>-<size>-ctx<context>-<acp|dense>, one per line.",
    "tokenize": "Read the corpus, tokenize it and write token shards and manifest.json (sha256 of every shard, "
                "written last) into --out (default: results/data/<corpus>/<tokenizer>).",
    "resolve": "Write one run's resolved config (the experiment config with the run's grid cell and overrides "
               "applied) to --out, usually results/runs/RUN/config.json, which `fox train --config` accepts.",
    "train": "Train one run with DeepSpeed into results/runs/RUN/: checkpoints, train_log.jsonl, and train.json "
             "when done. Rerunning resumes from the newest intact checkpoint; a finished run is left untouched; a run "
             "whose settings changed trains afresh (the old one moves to superseded/); a second trainer of the "
             "same run is refused. Logs step/total, loss, held-out loss, tokens/s and ETA, and to MLflow.",
    "average": "Average the last average.last_k checkpoints of a trained run (fp32) into --out (averaged.pt, a "
               "self-contained model); a damaged checkpoint is named with what to do.",
    "evaluate": "Evaluate an averaged model: held-out loss by position and length, lm-eval tasks, needle in a "
                "haystack, ACP pruning; writes --out (eval/RUN.json) and logs eval/... metrics to the run in MLflow.",
    "plot": "Draw the figures (loss by position, perplexity vs length, NIAH and ACP heat maps) from evaluation "
            "JSONs into --out, and attach them to every run in MLflow.",
    "table": "Write Table 1 of the papers (--out table1.csv, and table1.md beside it) from evaluation JSONs.",
    "longbench": "Run LongBench (the FoX paper's Table 2: lm-eval's longbench_* tasks, prompts cut in the middle to "
                 "15,500 tokens with BOS, greedy generation on the KV cache) on an averaged model; writes --out "
                 "(eval/longbench/RUN.json) and logs the scores to the run in MLflow.",
    "longbench-table": "Write the LongBench table (--out longbench.csv, longbench.md beside it: a row per model, "
                       "a column per task) and its plot (--plot) from LongBench result JSONs.",
}
"""What each stage does, for `fox <stage> --help`."""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = top.add_subparsers(dest="stage", required=True)

    def stage(name: str, func, help: str, *, out: bool = False, inputs: bool = False,
              run: bool = False) -> argparse.ArgumentParser:
        sub = stages.add_parser(name, help=help, description=STAGES[name])
        sub.add_argument("--config", required=True, nargs="+", metavar="CONFIG",
                         help="config.yaml (several: merged in order, later ones win), or a runs/{run}/config.json")
        if out:
            sub.add_argument("--out", required=name != "tokenize", help="output path")
        if inputs:
            sub.add_argument("--in", dest="inputs", nargs="+", required=True, help="input files")
        if run:
            sub.add_argument("--run", default=None, help="run id, with an experiment config")
        sub.set_defaults(func=func)
        return sub

    stage("validate", cmd_validate, "check a config against the schema")
    stage("runs", cmd_runs, "list the run ids of a config's grid")
    stage("tokenize", cmd_tokenize, "corpus -> token shards + manifest", out=True).add_argument(
        "--workers", type=int, default=None, help="processes (default: all cores)")
    stage("resolve", cmd_resolve, "write one run's resolved config", out=True).add_argument(
        "--run", required=True, help="run id, e.g. fox-pro-tiny-ctx256-acp")
    train = stage("train", cmd_train, "train one run with DeepSpeed (resumes from its last checkpoint)", run=True)
    train.add_argument("--stop-after-steps", type=int, default=None,
                       help="return after this many steps of this invocation (e.g. to fit a job's time limit)")
    stage("average", cmd_average, "average the last K checkpoints of a run", out=True, run=True)
    stage("evaluate", cmd_evaluate, "evaluate an averaged model", out=True, inputs=True, run=True)
    stage("plot", cmd_plot, "plots from evaluation results", out=True, inputs=True)
    stage("table", cmd_table, "results/table1.csv from evaluation results", out=True, inputs=True)
    stage("longbench", cmd_longbench, "LongBench (the FoX paper's Table 2) on an averaged model", out=True,
          inputs=True, run=True)
    stage("longbench-table", cmd_longbench_table, "results/longbench.csv and its plot from LongBench results",
          out=True, inputs=True).add_argument("--plot", required=True, help="output path of the plot (.png)")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("FOX_DEBUG"):
            raise
        print(f"fox {args.stage}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
