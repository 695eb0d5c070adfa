"""MLflow tracking: one experiment per config, one MLflow run per trained model, only rank 0 writes.

This package is the only importer of mlflow. The default store is sqlite under results_dir (no server); config
`tracking_uri` or MLFLOW_TRACKING_URI point it anywhere, e.g. at one `mlflow server` for a whole cluster.
The MLflow run id is kept in runs/{run}/mlflow_run_id, so a resumed training and the later stages all log
into the same MLflow run. What MLflow shows is a projection of files in the run folder (train_log.jsonl, the
evaluation JSON, the plots): a tracking call that fails is retried, never stops a stage, and what it missed is
logged again from those files by the next stage that reaches MLflow.

Names, the same in every run so that runs compare:
    metrics     train/{loss,lr,grad_norm,tokens,attn_pruned_fraction}, throughput/{tokens_per_s,mfu},
                val/loss (periodic held-out loss), eval/{val_loss,val_ppl_at_train_ctx,...,<task>/<metric>}
    artifacts   config.json, train.json, train_log.jsonl, checkpoints/manifest.json, eval/results.json,
                plots/*.png, profile/step<N>.json and .trace.json.gz (train.profile_step)
Artifacts live under <store folder>/mlartifacts/ with locations relative to it (mlflow-artifacts:/...), so a
results folder moved or copied off a cluster keeps them: `mlflow ui --backend-store-uri sqlite:///<db>
--artifacts-destination <folder>/mlartifacts` serves them from wherever it now is.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from fox.tracking.tracker import Tracker, is_local_sqlite, store_folder

__all__ = ["TRAIN_METRICS", "Tracker", "eval_metrics", "flatten", "git_commit", "log_evaluation", "log_plots",
           "param_values", "sync_training", "tracking_uri", "ui_command"]

TRAIN_METRICS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
                 "attn_pruned_fraction": "train/attn_pruned_fraction", "tokens_per_s": "throughput/tokens_per_s",
                 "mfu": "throughput/mfu", "peak_memory_gb": "throughput/peak_memory_gb", "val_loss": "val/loss"}
"""train_log.jsonl key -> MLflow metric name."""


def tracking_uri(cfg: dict) -> str:
    """MLFLOW_TRACKING_URI, else the config's tracking_uri, else sqlite under results_dir."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.get("tracking_uri"):
        return cfg["tracking_uri"]
    return f"sqlite:///{Path(cfg['results_dir']).resolve() / 'mlflow.db'}"


def ui_command(cfg: dict) -> str:
    """How to browse the store: the `mlflow ui` command for a local sqlite store, else the server's address."""
    uri = tracking_uri(cfg)
    if not is_local_sqlite(uri):
        return f"open {uri}"
    db = Path(uri.removeprefix("sqlite:///"))
    with_cwd = lambda path: os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    return (f"mlflow ui --backend-store-uri sqlite:///{with_cwd(db)} "
            f"--artifacts-destination {with_cwd(store_folder(uri) / 'mlartifacts')}")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}, the form MLflow params take."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def param_values(tree: dict) -> dict[str, str]:
    """Flattened params as text, spelled as in the config files: true/false, null, [0.9, 0.95]."""
    import json

    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in flatten(tree).items()}


def git_commit() -> str | None:
    """The commit of the fox checkout this code runs from ("-dirty" appended with uncommitted changes);
    None when fox is not installed from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def eval_metrics(result: dict) -> dict[str, float | None]:
    """An evaluation JSON's scalar results as eval/... metrics."""
    metrics = {f"eval/{key}": result.get(key) for key in ("val_loss", "val_ppl_at_train_ctx", "val_ppl_at_4x_ctx")}
    metrics["eval/niah_acc"] = (result.get("niah") or {}).get("mean_acc")
    metrics["eval/attn_pruned_fraction"] = (result.get("acp_stats") or {}).get("pruned_fraction")
    for task, scores in (result.get("lm_eval") or {}).items():
        metrics |= {f"eval/{task}/{metric.split(',')[0]}": value for metric, value in scores.items()
                    if isinstance(value, int | float) and not isinstance(value, bool) and "_stderr" not in metric}
    return metrics


def sync_training(tracker: Tracker, run_cfg: dict) -> None:
    """What a training left in its run folder, into its MLflow run, as far as MLflow lacks it: the params as
    used (train.json's settings), the steps of train_log.jsonl, and the run's files as artifacts."""
    import json
    import tempfile

    from fox.files import read_json

    run_dir = Path(run_cfg["run_dir"])
    summary = read_json(run_dir / "train.json") if (run_dir / "train.json").is_file() else {}
    if summary.get("settings"):
        tracker.log_params(summary["settings"])
    tracker.sync_train_log(run_dir / "train_log.jsonl", TRAIN_METRICS)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(run_cfg, indent=1, sort_keys=True))
        for path, folder in ((Path(tmp) / "config.json", None), (run_dir / "train.json", None),
                             (run_dir / "train_log.jsonl", None), (run_dir / "checkpoints" / "manifest.json",
                                                                   "checkpoints")):
            if path.is_file():
                tracker.log_artifact(path, folder)
    for path in sorted((run_dir / "profile").glob("step*.json*")):      # train.profile_step's summary and trace
        tracker.log_artifact(path, "profile")


def log_evaluation(run_cfg: dict, result: dict, path: Path, step: int) -> None:
    """After `fox evaluate`: the eval/... metrics at the final training step and the JSON as eval/results.json,
    after whatever of the training MLflow missed (sync_training)."""
    tracker = Tracker(run_cfg)
    tracker.start()
    sync_training(tracker, run_cfg)
    tracker.log_metrics(eval_metrics(result), step)
    tracker.log_artifact(path, "eval", name="results.json")


def log_plots(run_cfgs: list[dict], evals: dict[str, dict], plots: list[Path]) -> None:
    """After `fox plot`: the figures (each compares all runs) as plots/*.png of every run, and the eval/...
    metrics of a run whose evaluation did not reach MLflow."""
    for run_cfg in run_cfgs:
        tracker = Tracker(run_cfg)
        if tracker.start(create=False) is None:
            continue
        result = evals.get(run_cfg["run"])
        if result is not None and not tracker.has_metric("eval/val_loss"):
            tracker.log_metrics(eval_metrics(result), tracker.last_step("train/loss"))
        for plot in plots:
            tracker.log_artifact(plot, "plots")
