"""Training through the real DeepSpeed engine on CPU, exact resume after a kill, and the MLflow record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from fox import config as fox_config
from fox.train import fp32_state_dict, read_manifest
from fox.train.schedule import lr_factor
from tests.conftest import tiny_experiment

STEPS = 24


def make_run(root: Path, corpus: Path, **train) -> tuple[Path, dict]:
    """Write a resolved run config for one tiny FoX (Pro) under root; returns its path and content."""
    config = fox_config.validate(tiny_experiment(root / "results", **train))
    run = fox_config.run_ids(config)[0]
    resolved = fox_config.resolve_run(config, run) | {"data_dir": str(corpus)}
    path = root / "run.json"
    path.write_text(json.dumps(resolved))
    return path, resolved


def fox_train(path: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fox.cli", "train", "--config", str(path), *extra],
                          capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"fox train failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def train_log(run: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(run["run_dir"]) / "train_log.jsonl").read_text().splitlines()]


def final_weights(run: dict) -> dict[str, torch.Tensor]:
    root = Path(run["run_dir"]) / "checkpoints"
    return fp32_state_dict(root, read_manifest(root)[-1]["tag"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, byte_corpus) -> dict:
    """One uninterrupted run of STEPS steps: the reference the other tests compare against."""
    path, run = make_run(tmp_path_factory.mktemp("straight"), byte_corpus)
    fox_train(path)
    return run


def test_lr_schedule_warmup_then_cosine_to_zero():
    assert lr_factor(50, 100, 1000) == pytest.approx(0.5)
    assert lr_factor(100, 100, 1000) == pytest.approx(1.0)
    assert lr_factor(550, 100, 1000) == pytest.approx(0.5)
    assert lr_factor(1000, 100, 1000) == 0.0
    factors = [lr_factor(t, 100, 1000) for t in range(100, 1001, 50)]
    assert factors == sorted(factors, reverse=True)


def test_tiny_fox_pro_loss_falls(straight):
    log = train_log(straight)
    assert [entry["step"] for entry in log] == list(range(1, STEPS + 1))
    assert log[0]["loss"] > 5.0  # ln(257) = 5.55 at init
    assert sum(e["loss"] for e in log[-4:]) / 4 < log[0]["loss"] - 1.0
    assert all(entry["grad_norm"] > 0 and entry["tokens_per_s"] > 0 for entry in log)
    assert log[0]["lr"] == pytest.approx(3e-3 * 256 / 2048)  # mid-step of warmup: 256 of 2048 tokens
    assert 0 < log[-1]["lr"] < 3e-3 * 0.01                     # cosine ends near zero, last update not wasted
    summary = json.loads((Path(straight["run_dir"]) / "train.json").read_text())
    assert summary["steps"] == STEPS and summary["tokens"] == STEPS * 512
    assert summary["mfu"] is None  # no known peak on CPU: left empty, not invented
    kept = [entry["step"] for entry in read_manifest(Path(straight["run_dir"]) / "checkpoints")]
    assert kept == [8, 16, 24]


def test_resume_after_kill_is_exact(tmp_path, byte_corpus, straight):
    path, run = make_run(tmp_path, byte_corpus)
    fox_train(path, "--stop-after-steps", "11")  # dies 3 steps after the checkpoint at step 8
    assert [e["step"] for e in read_manifest(Path(run["run_dir"]) / "checkpoints")] == [8]

    # a real SIGKILL in the middle of the resumed run, then the same command once more
    process = subprocess.Popen([sys.executable, "-m", "fox.cli", "train", "--config", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_path = Path(run["run_dir"]) / "train_log.jsonl"
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
        if any(json.loads(line)["step"] >= 18 for line in log_path.read_text().splitlines()):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    output = process.communicate()[0]
    assert "resumed at step 8" in output
    resumed = fox_train(path)
    assert "resumed at step" in resumed.stdout or process.returncode == 0

    assert train_log(run)[-1]["loss"] == train_log(straight)[-1]["loss"]
    ours, reference = final_weights(run), final_weights(straight)
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name

    # all three invocations logged into one MLflow run, which ends FINISHED with every step's loss
    mlflow.set_tracking_uri(f"sqlite:///{Path(run['results_dir']).resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fox-test"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "loss")
    assert {m.step for m in history} == set(range(1, STEPS + 1))


def test_compiled_training_matches_eager(tmp_path, byte_corpus, straight):
    """train.compile=true through the DeepSpeed engine (ZeRO 2, CPU: inductor's C++ code): the same losses as
    the eager run, step for step (the first 4 steps: still in warmup, so the same lr)."""
    path, run = make_run(tmp_path, byte_corpus, tokens=512 * 4, compile=True, zero_stage=2)
    assert "compile on" in fox_train(path).stdout
    ours, reference = train_log(run), train_log(straight)[:4]
    assert [e["step"] for e in ours] == [1, 2, 3, 4]
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_bf16_runs_zero_1_and_average_from_fp32_masters(tmp_path, byte_corpus):
    """bf16 asks for ZeRO 0 but runs ZeRO 1 (fp32 gradient accumulation); the checkpoint's fp32 weights are the
    optimizer's masters, which round to the module's bf16 copy but are not it."""
    path, run = make_run(tmp_path, byte_corpus, tokens=512 * 2, checkpoint_every_tokens=1024, precision="bf16")
    assert "bf16, ZeRO 1" in fox_train(path).stdout
    root = Path(run["run_dir"]) / "checkpoints"
    masters = final_weights(run)
    module = torch.load(root / read_manifest(root)[-1]["tag"] / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    assert masters.keys() == module.keys()
    for name, weight in module.items():
        assert masters[name].dtype == torch.float32 and weight.dtype == torch.bfloat16
        assert torch.equal(masters[name].bfloat16(), weight), name
    assert any(not torch.equal(masters[name], weight.float()) for name, weight in module.items())


def test_two_ranks_match_one_rank(tmp_path, byte_corpus, straight):
    """torchrun with 2 CPU processes (gloo): same global batches, so the same run up to reduction order."""
    path, run = make_run(tmp_path, byte_corpus)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fox.cli", "train", "--config", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 micro-batches/step, 2 rank(s)" in done.stdout
    ours, reference = train_log(run), train_log(straight)
    assert [e["step"] for e in ours] == [e["step"] for e in reference]
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    weights, reference_weights = final_weights(run), final_weights(straight)
    for name in weights:
        torch.testing.assert_close(weights[name], reference_weights[name], rtol=1e-3, atol=1e-4)


def test_changed_settings_train_afresh_and_keep_the_old_run(tmp_path, byte_corpus):
    path, run = make_run(tmp_path, byte_corpus, tokens=512 * 2, checkpoint_every_tokens=1024)
    fox_train(path)
    first = final_weights(run)
    run["train"]["warmup_tokens"] = 512
    path.write_text(json.dumps(run))
    again = fox_train(path)
    assert "settings changed since the last checkpoint (train.warmup_tokens)" in again.stdout
    assert "resumed" not in again.stdout
    assert [entry["step"] for entry in train_log(run)] == [1, 2]
    assert not torch.equal(final_weights(run)["embed.weight"], first["embed.weight"])
    (archived,) = (Path(run["run_dir"]) / "superseded").iterdir()
    assert torch.equal(fp32_state_dict(archived / "checkpoints", "step_00000002")["embed.weight"],
                       first["embed.weight"])
    assert "resumed at step 2" in fox_train(path).stdout  # same settings again: nothing to redo


def test_mlflow_run_holds_params_metrics_and_manifest(straight):
    mlflow.set_tracking_uri(f"sqlite:///{Path(straight['results_dir']).resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fox-test"], output_format="list")
    assert [r.info.run_name for r in runs] == [straight["run"]]
    run = runs[0]
    assert run.data.params["train.lr"] == "0.003" and run.data.params["grid.model"] == "fox"
    assert run.data.params["params.paper"].isdigit()
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/manifest.json"]
    assert (Path(straight["run_dir"]) / "mlflow_run_id").read_text() == run.info.run_id


def test_acp_pruned_fraction_is_logged(tmp_path, byte_corpus):
    path, run = make_run(tmp_path, byte_corpus, tokens=512 * 2, checkpoint_every_tokens=1024)
    run["grid"]["acp"] = True
    run["train"]["context"] = 128
    path.write_text(json.dumps(run))
    fox_train(path)
    fractions = [entry["attn_pruned_fraction"] for entry in train_log(run)]
    assert len(fractions) == 2 and all(0.0 <= f <= 1.0 for f in fractions)


def test_diverging_loss_stops_with_a_clear_message(tmp_path, byte_corpus):
    path, run = make_run(tmp_path, byte_corpus, lr=1e8, grad_clip=0.0, warmup_tokens=0)
    done = fox_train(path, check=False)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fox train: error: fox-pro-tiny-ctx64-dense: loss is ")
    assert "nan" in last or "inf" in last


def test_tokens_per_step_must_split_into_micro_batches(tmp_path, byte_corpus):
    path, run = make_run(tmp_path, byte_corpus)
    run["train"]["tokens_per_step"] = 500  # a hand-edited config.json: the schema check is behind it
    path.write_text(json.dumps(run))
    done = fox_train(path, check=False)
    assert done.returncode == 2
    assert "train.tokens_per_step=500: must be a multiple of" in done.stderr
    assert not (Path(run["run_dir"]) / "checkpoints").exists()


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setitem(os.environ, "OMP_NUM_THREADS", "2")
