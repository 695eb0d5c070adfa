"""Shared fixtures: a small real corpus tokenized once per session, experiment configs built on it, and a real
MLflow server with its REST API."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_mlflow():
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which fox honours first: without this, one
    test's store would leak into the next test and into the `fox` subprocesses it starts."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    mlflow = sys.modules.get("mlflow")       # not imported: no run is open (and the GPU machines lack it)
    while mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run()
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def byte_corpus(tmp_path_factory) -> Path:
    """~200 standard-library files through the byte tokenizer: real text, no download."""
    from fox.data import CorpusConfig, TokenizerConfig, tokenize_corpus

    out = tmp_path_factory.mktemp("corpus") / "stdlib" / "bytes"
    tokenize_corpus(CorpusConfig(max_documents=200, val_fraction=0.1), TokenizerConfig(name="bytes"), out, workers=2)
    return out


def tiny_experiment(results_dir: Path, **train) -> dict:
    """An experiment config for one tiny FoX (Pro) on CPU; train overrides the train section."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config = copy.deepcopy(config)
    config.update(results_dir=str(results_dir), experiment="fox-test")
    config["grid"] = [{"model": ["fox"], "block": ["pro"], "size": ["tiny"], "context": [64], "acp": [False]}]
    config["train"] = {"tokens": 64 * 8 * 24, "tokens_per_step": 64 * 8, "micro_batch_size": 4,
                       "warmup_tokens": 64 * 8 * 4, "checkpoint_every_tokens": 64 * 8 * 8, "keep_checkpoints": 3,
                       "log_every_steps": 1, "lr": 3e-3, "seed": 0, **train}
    config["average"] = {"last_k": 1}
    return config


def train_first_run(root: Path, config: dict, data_dir: Path, few_fla_configs: bool = False
                    ) -> tuple[dict, Path, str]:
    """Validate config, resolve its first run on data_dir, write it to root/run.json and train it with `fox train`
    in a subprocess (a failure shows its output); returns the resolved run, the run.json path and the stdout.
    few_fla_configs: the subprocess autotunes fla's kernels over a few configurations (fla_with_few_configs)."""
    import json

    from fox import config as fox_config

    config = fox_config.validate(config)
    run = fox_config.resolve_run(config, fox_config.run_ids(config)[0]) | {"data_dir": str(data_dir)}
    path = root / "run.json"
    path.write_text(json.dumps(run))
    entry = ["-m", "fox.cli"]
    if few_fla_configs:
        entry = ["-c", "import sys; from tests.conftest import fla_with_few_configs; fla_with_few_configs(); "
                       "from fox.cli import main; main(sys.argv[1:])"]
    done = subprocess.run([sys.executable, *entry, "train", "--config", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return run, path, done.stdout


@contextlib.contextmanager
def mlflow_server(store: Path, artifacts: Path) -> Iterator[str]:
    """A real `mlflow server` (the UI's server) on 127.0.0.1 for the sqlite store and artifact folder given;
    yields its address. Started in its own session and stopped by process group: it leaves workers otherwise."""
    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(store.parent / f"mlflow-server-{port}.log", "w")  # noqa: SIM115 - open while the server runs
    process = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                                f"sqlite:///{store}", "--artifacts-destination", str(artifacts), "--host",
                                "127.0.0.1", "--port", str(port), "--workers", "1"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (store.parent / f"mlflow-server-{port}.log").read_text()[-2000:]
            try:
                if requests.get(f"{url}/health", timeout=2).text == "OK":
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def rest(url: str, endpoint: str, body: dict | None = None, **params) -> dict:
    """One call of MLflow's REST API (api/2.0/mlflow/...): GET with params, or POST with a JSON body."""
    import requests

    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if body is None:
        response = requests.get(address, params=params, timeout=30)
    else:
        response = requests.post(address, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


FLA_KERNEL_MODULES = ("fla.ops.gla", "fla.ops.simple_gla", "fla.ops.delta_rule", "fla.modules")


def fla_with_few_configs(keep: int = 3) -> None:
    """Every autotuned kernel of flash-linear-attention keeps `keep` of its configurations, 4-warp ones first.

    fla 0.6 autotunes each kernel on first use over up to 48 configurations (chunk_h's), compiling each: on a
    fresh H200 with Triton 3.6, one layer test spent over 7 minutes there. What the GPU tests check (outputs and
    gradients) does not depend on the tiling; training speed does, and `fox train` keeps fla's full lists."""
    import importlib

    for name in FLA_KERNEL_MODULES:
        importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.") and module is not None:
            for value in vars(module).values():
                tuner = _autotuner(value)
                if tuner is None or getattr(tuner, "_fox_few_configs", False):
                    continue
                tuner._fox_few_configs = True
                if tuner.early_config_prune is None:
                    tuner.configs = _few(tuner.configs, keep)
                else:                    # fla's own pruning first (it may drop every config we would keep)
                    tuner.early_config_prune = _pruned_then_few(tuner.early_config_prune, keep)


def _few(configs, keep: int):
    return sorted(configs, key=lambda config: abs(config.num_warps - 4))[:keep]


def _pruned_then_few(prune, keep: int):
    def prune_and_keep_few(configs, named_args, **kwargs):
        return _few(prune(configs, named_args, **kwargs), keep)

    return prune_and_keep_few


def _autotuner(value):
    """The triton Autotuner a module attribute is or wraps (triton.heuristics holds it in .fn), or None."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    while isinstance(value, KernelInterface):
        if isinstance(value, Autotuner):
            return value
        value = getattr(value, "fn", None)
    return None
