"""fox.tracking against a real MLflow tracking server, as a cluster uses one (profiles/slurm): training logs
through it, and a server that cannot be reached never stops a training; what it missed is logged afterwards
from train_log.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fox import config as fox_config
from fox.tracking import TRAIN_METRICS, Tracker
from tests.conftest import mlflow_server, rest, tiny_experiment

STEPS = 4


def make_run(root: Path, corpus: Path) -> tuple[Path, dict]:
    config = fox_config.validate(tiny_experiment(root / "results", tokens=512 * STEPS, checkpoint_every_tokens=1024,
                                                 val_every_steps=2))
    run = fox_config.resolve_run(config, fox_config.run_ids(config)[0]) | {"data_dir": str(corpus)}
    path = root / "run.json"
    path.write_text(json.dumps(run))
    return path, run


def fox_train(path: Path, tracking_uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "fox.cli", "train", "--config", str(path)], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1, as docs/PIPELINE.md starts it for a cluster."""
    root = tmp_path_factory.mktemp("server")
    with mlflow_server(root / "mlflow.db", root / "mlartifacts") as url:
        yield url, root


def run_of(url: str, name: str) -> dict:
    experiment = rest(url, "experiments/get-by-name", experiment_name="fox-test")["experiment"]
    runs = rest(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    return next(r for r in runs if r["info"]["run_name"] == name)


def history(url: str, run: dict, key: str) -> list[int]:
    metrics = rest(url, "metrics/get-history", run_id=run["info"]["run_id"], metric_key=key)["metrics"]
    return [m["step"] for m in metrics]


def test_training_logs_through_the_server(tmp_path, byte_corpus, server):
    url, root = server
    path, run = make_run(tmp_path, byte_corpus)
    fox_train(path, url)
    logged = run_of(url, run["run"])
    assert logged["info"]["status"] == "FINISHED"
    assert history(url, logged, "train/loss") == list(range(1, STEPS + 1))
    assert history(url, logged, "val/loss") == [2, 4]
    params = {p["key"]: p["value"] for p in logged["data"]["params"]}
    assert params["train.lr"] == "0.003" and params["model.vocab_size"] == "257"
    files = rest(url, "artifacts/list", run_id=logged["info"]["run_id"])["files"]
    assert {f["path"] for f in files} == {"checkpoints", "config.json", "train.json", "train_log.jsonl"}
    # uploaded through the server into its artifacts folder, at a location relative to it
    assert logged["info"]["artifact_uri"].startswith("mlflow-artifacts:/fox-test/")
    stored = root / "mlartifacts" / logged["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/")
    assert json.loads((stored / "train.json").read_text())["steps"] == STEPS


def test_an_unreachable_server_never_stops_training(tmp_path, byte_corpus, server):
    url, _ = server
    path, run = make_run(tmp_path, byte_corpus)
    done = fox_train(path, "http://127.0.0.1:9")  # the discard port: nothing answers
    warnings = [line for line in done.stderr.splitlines() if "warning: MLflow at http://127.0.0.1:9" in line]
    assert len(warnings) == 1 and "failed 3 times" in warnings[0], done.stderr[-2000:]
    assert json.loads((Path(run["run_dir"]) / "train.json").read_text())["steps"] == STEPS

    # the server is back (any later stage does this): the whole curve comes from train_log.jsonl, once
    tracker = Tracker(run | {"tracking_uri": url})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert tracker.start() is not None
    assert tracker.sync_train_log(Path(run["run_dir"]) / "train_log.jsonl", TRAIN_METRICS) == STEPS
    assert tracker.sync_train_log(Path(run["run_dir"]) / "train_log.jsonl", TRAIN_METRICS) == STEPS
    logged = run_of(url, run["run"])
    assert history(url, logged, "train/loss") == list(range(1, STEPS + 1))
    assert history(url, logged, "val/loss") == [2, 4]
