"""End to end: the real Snakemake pipeline on a small grid on CPU, uninterrupted and interrupted-then-resumed.

The corpus is a synthetic LongCrawl64: train.zarr and heldout.zarr of 65,536-token documents in LongCrawl64's
layout, read in place, every training window inside one document and starting with BOS. Both runs use the same
config in their own folder; the interrupted one is stopped with SIGINT once a training job has written a
checkpoint and the same command is run again, then killed with SIGKILL (Snakemake and its jobs) during
evaluation and resumed with the README's commands after a kill: the training resumes from its checkpoint,
nothing already complete is recomputed, and the final table equals the uninterrupted run's (CPU fp32 is
deterministic, so val_loss is compared exactly). The uninterrupted results are then browsed as a user does:
through the MLflow UI's server (its REST API) after moving the results folder, and Snakemake's report.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import mlflow_server, rest
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
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    (path / "commit.txt").write_text(commit)  # the code the pipeline runs, whatever HEAD is by the end
    result = subprocess.run(command(path), cwd=path, env=environment(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path / "stdout.txt").write_text(result.stdout)
    return path


def test_the_last_line_says_where_the_results_are(uninterrupted):
    last = (uninterrupted / "stdout.txt").read_text().strip().splitlines()[-1]
    assert last == ("[fox] results: table results/table1.md (csv: results/table1.csv); plots results/plots/; MLflow: "
                    "mlflow ui --backend-store-uri sqlite:///results/mlflow.db --artifacts-destination "
                    "results/mlartifacts, then open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning")


def test_table_has_one_row_per_cell(uninterrupted):
    rows = read_table(uninterrupted)
    assert [r["run"] for r in rows] == RUNS
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
    assert (results / "table1.md").read_text().startswith("| run | model | block | size |")
    for run in RUNS:  # README: `fox train --config results/runs/RUN/config.json`
        assert json.loads((results / "runs" / run / "config.json").read_text())["run"] == run


def test_mlflow_ui_server_shows_every_run_after_the_results_move(uninterrupted, tmp_path):
    """The results folder copied elsewhere (off a cluster) and the original gone: the MLflow UI's server finds
    the training view's experiment, grouped metrics, params as used, the commit and each run's artifacts."""
    original = uninterrupted / "results"
    moved = tmp_path / "elsewhere" / "results"
    shutil.copytree(original, moved)
    parked = original.rename(uninterrupted / "parked")
    try:
        with mlflow_server(moved / "mlflow.db", moved / "mlartifacts") as url:
            assert "<html" in requests.get(url, timeout=30).text.lower()  # the UI itself
            experiments = rest(url, "experiments/search", max_results=100)["experiments"]
            assert [e["name"] for e in experiments] == ["pipeline-test"]  # no empty Default beside it
            (experiment,) = experiments
            assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
            runs = rest(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
            assert sorted(r["info"]["run_name"] for r in runs) == sorted(RUNS)
            commit = (uninterrupted / "commit.txt").read_text()
            listings = set()
            for run in runs:
                run_id, name = run["info"]["run_id"], run["info"]["run_name"]
                params = {p["key"]: p["value"] for p in run["data"]["params"]}
                tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
                metrics = {m["key"] for m in run["data"]["metrics"]}
                assert params["train.lr"] == "0.003" and params["model.vocab_size"] == "257"
                assert params["model.d_model"] == "64" and params["model.n_layer"] == "2"
                assert params["model.acp"] == tags["acp"] == ("true" if name.endswith("-acp") else "false")
                assert tags["mlflow.source.git.commit"].startswith(commit)
                assert {m.split("/")[0] for m in metrics} == {"train", "throughput", "val", "eval"}
                assert {"train/loss", "throughput/tokens_per_s", "val/loss", "eval/val_loss",
                        "eval/fox_heldout_mc/acc"} <= metrics
                steps = [m["step"] for m in rest(url, "metrics/get-history", run_id=run_id,
                                                 metric_key="train/loss")["metrics"]]
                assert steps == list(range(4, 33, 4))
                files = {f["path"] for f in rest(url, "artifacts/list", run_id=run_id)["files"]}
                files |= {f["path"] for folder in ("eval", "plots", "checkpoints")
                          for f in rest(url, "artifacts/list", run_id=run_id, path=folder)["files"]}
                listings.add(frozenset(files))
                served = requests.get(f"{url}/get-artifact", params={"path": "eval/results.json", "run_uuid": run_id},
                                      timeout=30)
                assert served.json() == json.loads((moved / "eval" / f"{name}.json").read_text())
            (files,) = listings  # the same names in every run: "compare" lines them up
            assert {"config.json", "train.json", "train_log.jsonl", "checkpoints/manifest.json", "eval/results.json",
                    "plots/loss_by_position.png", "plots/ppl_by_length.png", "plots/niah.png",
                    "plots/acp_pruned.png"} <= files
    finally:
        parked.rename(original)


def test_snakemake_report(uninterrupted):
    result = subprocess.run([*command(uninterrupted), "--report", "report.html"], cwd=uninterrupted,
                            env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    html = (uninterrupted / "report.html").read_text()
    assert "table1.csv" in html and "loss_by_position.png" in html and "rulegraph" in html


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
    # the runs' config.json records change, and the table that lists them; nothing is trained or evaluated again
    assert dry_run_jobs(uninterrupted, "experiment: pipeline-test", "experiment: renamed") == {"resolve": 3,
                                                                                               "table": 1}
    assert dry_run_jobs(uninterrupted, "log_every_steps: 4", "log_every_steps: 2") == {"resolve": 3, "table": 1}


def first_checkpoint(results: Path) -> str | None:
    """A run with a checkpoint on disk and no train.json yet: the moment to interrupt."""
    for manifest in results.glob("runs/*/checkpoints/manifest.json"):
        run_dir = manifest.parent.parent
        if not (run_dir / "train.json").exists() and json.loads(manifest.read_text()):
            return run_dir.name
    return None


def _default_sigint() -> None:
    """Ctrl-C's default action in the pipeline's processes: a shell that starts the tests in the background
    (`cmd &`, as some CI runners do) hands them SIGINT ignored, and Snakemake would then not stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_until(path: Path, ready, what: str) -> subprocess.Popen:
    """Start the pipeline in its own process group (a terminal's foreground group) and return its output once
    ready() holds, with the group still running; the caller then sends the signal."""
    process = subprocess.Popen(command(path), cwd=path, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=_default_sigint)
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, f"the pipeline ended before {what}"
        time.sleep(0.2)
    return process


def test_interrupted_pipeline_resumes_and_matches(uninterrupted, tmp_path_factory):
    path = workdir(tmp_path_factory, "interrupted")
    results = path / "results"
    # 1) Ctrl-C once a training has a checkpoint: the plain command resumes it
    process = run_until(path, lambda: first_checkpoint(results) is not None, "a checkpoint")
    run = first_checkpoint(results)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output[-2000:]
    assert not (results / "runs" / run / "train.json").exists(), output[-3000:]
    assert (results / "runs" / run / "checkpoints" / "manifest.json").exists(), "Snakemake removed the checkpoints"
    done = {p: p.stat().st_mtime_ns for p in results.glob("**/*") if p.is_file() and p.suffix in (".json", ".pt")
            and "checkpoints" not in p.parts and "chunk_sums" not in p.parts}  # chunk_sums grows as chunks are read

    # 2) the same command, killed with SIGKILL (Snakemake and every job, no cleanup) during the evaluations
    process = run_until(path, lambda: any(results.glob("eval/*.json")), "an evaluation")
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=120)
    assert "resumed at step" in (results / "logs" / "train" / f"{run}.log").read_text()
    for file, mtime in done.items():
        assert file.stat().st_mtime_ns == mtime, f"{file} was recomputed"

    # 3) README, after a kill: unlock once, then the same command
    unlock = subprocess.run([*command(path), "--unlock"], cwd=path, env=environment(), capture_output=True,
                            text=True, timeout=120)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    result = subprocess.run(command(path), cwd=path, env=environment(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for file, mtime in done.items():
        assert file.stat().st_mtime_ns == mtime, f"{file} was recomputed"
    assert [r["val_loss"] for r in read_table(path)] == [r["val_loss"] for r in read_table(uninterrupted)]

    # 4) a damaged final checkpoint, its averaged model and the table gone: the plain command does not rebuild
    #    the table from the old evaluation, it fails naming the checkpoint and what to do, which then works
    run = RUNS[0]
    damaged = results / "runs" / run / "checkpoints" / "step_00000032" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    (results / "runs" / run / "averaged.pt").unlink()
    (results / "table1.csv").unlink()
    failed = subprocess.run(command(path), cwd=path, env=environment(), capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and not (results / "table1.csv").exists()
    advice = f"Delete {results.relative_to(path)}/runs/{run}/train.json and rerun"
    assert f"checkpoint {damaged.parent.relative_to(path)} is damaged" in failed.stdout + failed.stderr
    assert advice in failed.stdout + failed.stderr
    (results / "runs" / run / "train.json").unlink()
    result = subprocess.run(command(path), cwd=path, env=environment(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["val_loss"] for r in read_table(path)] == [r["val_loss"] for r in read_table(uninterrupted)]
