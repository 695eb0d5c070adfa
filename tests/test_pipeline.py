"""End to end: the real Snakemake pipeline on a small grid on CPU, uninterrupted and interrupted-then-resumed.

The corpus is a synthetic LongCrawl64: train.zarr and heldout.zarr of 65,536-token documents in LongCrawl64's
layout, read in place, every training window inside one document and starting with BOS. Both runs use the same
config in their own folder; the interrupted one is stopped with SIGINT once a training
job has written a checkpoint, then the same command is run again: the training resumes from its checkpoint,
nothing already complete is recomputed, and the final table equals the uninterrupted run's (CPU fp32 is
deterministic, so val_loss is compared exactly).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.test_longcrawl import write_longcrawl

ROOT = Path(__file__).resolve().parents[1]
SMALL = """\
results_dir: results
experiment: pipeline-test
corpus: {name: lc64, source: zarr, path: lc64, windows: documents}
grid:
  - {model: [fox], block: [pro], size: [tiny], context: [64], acp: [false, true]}
  - {model: [transformer], block: [llama], size: [tiny], context: [64]}
train:
  tokens: 131072
  tokens_per_step: 4096
  micro_batch_size: 16
  warmup_tokens: 16384
  checkpoint_every_tokens: 16384
  keep_checkpoints: 2
  log_every_steps: 4
evaluate:
  val_tokens: 1024
  val_windows: 4
  batch_size: 8
  length_multipliers: [0.5, 1, 4]
  lm_eval: {local_tasks: {docs: 8, ppl_tokens: 128, mc_context_tokens: 32, mc_continuation_tokens: 8}}
  niah: {length_multipliers: [2, 4], depths: [0.0, 1.0], samples: 1}
"""
RUNS = ["fox-pro-tiny-ctx64-dense", "fox-pro-tiny-ctx64-acp", "transformer-llama-tiny-ctx64-dense"]
PAPER_ACC = ["lambada_acc", "piqa_acc", "hellaswag_acc_norm", "winogrande_acc", "arc_easy_acc",
             "arc_challenge_acc_norm", "copa_acc", "openbookqa_acc_norm", "sciq_acc", "boolq_acc"]

pytestmark = pytest.mark.slow


def command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--cores", "2",
            "--configfile", "small.yaml", "--directory", str(workdir)]


def environment() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": ""}


def workdir(tmp_path_factory, name: str) -> Path:
    path = tmp_path_factory.mktemp(name)
    (path / "small.yaml").write_text(SMALL)
    (path / "lc64").mkdir()
    write_longcrawl(path / "lc64")
    return path


def read_table(path: Path) -> list[dict]:
    with (path / "results" / "table1.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    path = workdir(tmp_path_factory, "uninterrupted")
    result = subprocess.run(command(path), cwd=path, env=environment(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def test_table_has_one_row_per_cell(uninterrupted):
    rows = read_table(uninterrupted)
    assert [f"{r['model']}-{r['block']}-{r['size']}-ctx{r['train_ctx']}-{'acp' if r['acp'] == 'true' else 'dense'}"
            for r in rows] == RUNS
    for r in rows:
        assert math.isfinite(float(r["val_loss"])) and 0 < float(r["val_loss"]) < 6
        assert float(r["fox_heldout_ppl_word_perplexity"]) > 1 and 0 <= float(r["fox_heldout_mc_acc"]) <= 1
        assert float(r["avg_acc"]) == float(r["fox_heldout_mc_acc"])  # the only accuracy measured
        assert all(r[c] == "" for c in PAPER_ACC + ["wikitext_word_ppl", "lambada_ppl"])
        assert int(r["tokens"]) == 131072 and int(r["params"]) > 0
    assert rows[1]["attn_flops_pruned"] != "" and rows[0]["attn_flops_pruned"] == ""


def test_plots_and_markdown_exist(uninterrupted):
    results = uninterrupted / "results"
    for name in ("loss_by_position", "ppl_by_length", "niah", "acp_pruned"):
        assert (results / "plots" / f"{name}.png").stat().st_size > 10_000
    assert (results / "table1.md").read_text().startswith("| model | block | size |")


def test_mlflow_runs_hold_params_and_metrics(uninterrupted):
    mlflow.set_tracking_uri(f"sqlite:///{uninterrupted / 'results' / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["pipeline-test"], output_format="list")}
    assert set(runs) == {*RUNS, "summary"}
    for run in RUNS:
        data = runs[run].data
        assert data.params["train.tokens"] == "131072" and data.params["grid.model"] in ("fox", "transformer")
        assert "loss" in data.metrics and "final_loss" in data.metrics
        history = mlflow.MlflowClient().get_metric_history(runs[run].info.run_id, "loss")
        assert len(history) == 131072 // 4096 // 4


def dry_run_jobs(path: Path, old: str = "", new: str = "") -> dict[str, int]:
    """{rule: count} of what Snakemake would run now, with `old` in small.yaml replaced by `new`."""
    config = SMALL.replace(old, new)
    assert config != SMALL or not old
    (path / "changed.yaml").write_text(config)
    args = [a if a != "small.yaml" else "changed.yaml" for a in command(path)]
    result = subprocess.run([*args, "-n", "--quiet", "rules"], cwd=path, env=environment(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit() and line.split()[0] not in ("total", "all")}


def test_a_changed_setting_reruns_exactly_what_it_affects(uninterrupted):
    assert dry_run_jobs(uninterrupted) == {}
    assert dry_run_jobs(uninterrupted, "val_windows: 4", "val_windows: 5") == {
        "resolve": 3, "evaluate": 3, "plot": 1, "table": 1}
    assert dry_run_jobs(uninterrupted, "warmup_tokens: 16384", "warmup_tokens: 8192") == {
        "resolve": 3, "train": 3, "average": 3, "evaluate": 3, "plot": 1, "table": 1}
    assert dry_run_jobs(uninterrupted, "experiment: pipeline-test", "experiment: renamed") == {"resolve": 3}


def first_checkpoint(results: Path) -> str | None:
    """A run with a checkpoint on disk and no train.json yet: the moment to interrupt."""
    for manifest in results.glob("runs/*/checkpoints/manifest.json"):
        run_dir = manifest.parent.parent
        if not (run_dir / "train.json").exists() and json.loads(manifest.read_text()):
            return run_dir.name
    return None


def test_interrupted_pipeline_resumes_and_matches(uninterrupted, tmp_path_factory):
    path = workdir(tmp_path_factory, "interrupted")
    results = path / "results"
    # its own process group, which gets the SIGINT as a terminal's Ctrl-C sends it to the foreground group
    process = subprocess.Popen(command(path), cwd=path, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while (run := first_checkpoint(results)) is None:
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the pipeline ended"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output[-2000:]
    assert not (results / "runs" / run / "train.json").exists(), output[-3000:]
    assert (results / "runs" / run / "checkpoints" / "manifest.json").exists(), "Snakemake removed the checkpoints"
    done = {p: p.stat().st_mtime_ns for p in results.glob("**/*") if p.is_file() and p.suffix in (".json", ".pt")
            and "checkpoints" not in p.parts and "chunk_sums" not in p.parts}  # chunk_sums grows as chunks are read

    result = subprocess.run(command(path), cwd=path, env=environment(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed at step" in (results / "logs" / "train" / f"{run}.log").read_text()
    for file, mtime in done.items():
        assert file.stat().st_mtime_ns == mtime, f"{file} was recomputed"
    assert [r["val_loss"] for r in read_table(path)] == [r["val_loss"] for r in read_table(uninterrupted)]
