"""Shared fixtures: a small real corpus tokenized once per session, and experiment configs built on it."""

from __future__ import annotations

import copy
import os
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
    import mlflow

    while mlflow.active_run() is not None:
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
