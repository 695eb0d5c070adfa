"""Training through the real DeepSpeed engine on CPU, exact resume after a kill, and the MLflow record."""

from __future__ import annotations

import gzip
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
from fox.train.profiling import kernel_family
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


def stored_artifacts(results: Path, artifact_uri: str) -> Path:
    """Where a run's artifacts lie in the local store: under mlartifacts/, which `mlflow ui
    --artifacts-destination` serves."""
    return results / "mlartifacts" / artifact_uri.removeprefix("mlflow-artifacts:/")


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

    # all three invocations logged into one MLflow run, which ends FINISHED with every step's loss once: the
    # steps trained again after each resume are neither repeated in train_log.jsonl nor in MLflow
    assert [entry["step"] for entry in train_log(run)] == list(range(1, STEPS + 1))
    client = mlflow.MlflowClient(f"sqlite:///{Path(run['results_dir']).resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fox-test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for name in ("train/loss", "throughput/tokens_per_s", "val/loss"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, name)]
        assert steps == sorted(set(steps)), name
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("zero_stage", [2, 3], ids=["zero2", "zero3-acp"])
def test_compiled_training_matches_eager(tmp_path, byte_corpus, straight, zero_stage):
    """train.compile=true through the DeepSpeed engine (CPU: inductor's C++ code): the same losses as the eager
    run, step for step (the first 4 steps: still in warmup, so the same lr). ZeRO-3 gathers parameters in
    module hooks, inside the compiled blocks too: the forget gate's fp32 weights are read in a module of their
    own, and ACP's QK-norm gains are registered as Attention's external parameters (at this context ACP prunes
    nothing, so the dense run's losses hold)."""
    path, run = make_run(tmp_path, byte_corpus, tokens=512 * 4, compile=True, zero_stage=zero_stage)
    if zero_stage == 3:
        run["grid"]["acp"] = True
        path.write_text(json.dumps(run))
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
    assert "already trained (2 steps" in fox_train(path).stdout  # same settings again: nothing to redo


def test_mlflow_run_holds_params_metrics_and_artifacts(straight):
    results = Path(straight["results_dir"]).resolve()
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fox-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens as model training
    assert client.get_experiment("0").lifecycle_stage == "deleted"  # no empty Default experiment beside it
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == straight["run"] and run.data.tags["acp"] == "false"
    params = run.data.params
    # as used: the resolved lr and vocabulary, the model's dimensions
    assert params["train.lr"] == "0.003" and params["model.vocab_size"] == "257" and params["model.d_model"] == "64"
    assert params["model.n_layer"] == "2" and params["model.n_head"] == "2" and params["params.paper"].isdigit()
    assert params["run.attention_kernels"] == "reference" and params["run.torch"] == torch.__version__
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert run.data.tags["mlflow.source.git.commit"].startswith(commit.stdout.strip())
    assert set(run.data.metrics) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens",
                                     "throughput/tokens_per_s", "val/loss"}  # mfu: no known peak on CPU
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [10, 20, 24]
    # artifacts under the store's folder, where `mlflow ui --artifacts-destination` serves them
    assert experiment.artifact_location == "mlflow-artifacts:/fox-test"
    stored = stored_artifacts(results, run.info.artifact_uri)
    assert sorted(str(p.relative_to(stored)) for p in stored.rglob("*") if p.is_file()) == [
        "checkpoints/manifest.json", "config.json", "train.json", "train_log.jsonl"]
    assert (Path(straight["run_dir"]) / "mlflow_run_id").read_text() == run.info.run_id


def test_finished_run_rerun_changes_no_file(straight):
    """README: reruns are safe. A finished run is left alone: no file written, not even MLflow's store."""
    root = Path(straight["results_dir"]).parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    done = fox_train(root / "run.json")
    assert f"{straight['run']}: already trained ({STEPS} steps" in done.stdout
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_a_second_trainer_of_the_same_run_is_refused(tmp_path, byte_corpus):
    path, run = make_run(tmp_path, byte_corpus, tokens=512, checkpoint_every_tokens=512)
    lock = Path(run["run_dir"]) / ".train.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fox.files import file_lock\n"
                               f"with file_lock({str(lock)!r}, owner='fox train (pid 4242 on node7)'):\n"
                               "    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    refused = fox_train(path, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"fox train: error: {run['run']}: {lock} is held by fox train (pid 4242 on "
                                      "node7), which is training this run: wait for it to end or stop it (a killed "
                                      "process releases the lock at once), then rerun")
    assert not (Path(run["run_dir"]) / "checkpoints").exists()
    holder.kill()  # SIGKILL: no chance to clean up, yet the lock goes with the process
    holder.wait()
    assert "1/1 (100%)" in fox_train(path).stdout


def test_damaged_checkpoint_is_named_and_training_resumes_before_it(tmp_path, byte_corpus, straight):
    """A truncated final checkpoint: `fox average` names it and says what to do; doing it retrains from the
    checkpoint before it, to the same weights."""
    import shutil

    shutil.copytree(Path(straight["results_dir"]).parent, tmp_path, dirs_exist_ok=True)
    run = json.loads((tmp_path / "run.json").read_text())
    run = {**run, "results_dir": str(tmp_path / "results"), "run_dir": str(tmp_path / "results" / "runs" / run["run"])}
    (tmp_path / "run.json").write_text(json.dumps(run))
    damaged = Path(run["run_dir"]) / "checkpoints" / "step_00000024" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    averaged = subprocess.run([sys.executable, "-m", "fox.cli", "average", "--config", str(tmp_path / "run.json"),
                               "--out", str(tmp_path / "averaged.pt")], capture_output=True, text=True)
    assert averaged.returncode == 2 and len(averaged.stderr.strip().splitlines()) == 1, averaged.stderr
    assert f"checkpoint {damaged.parent} is damaged: mp_rank_00_model_states.pt holds 1000 bytes" in averaged.stderr
    assert f"Delete {Path(run['run_dir']) / 'train.json'} and rerun" in averaged.stderr
    assert not (tmp_path / "averaged.pt").exists()

    (Path(run["run_dir"]) / "train.json").unlink()
    resumed = fox_train(tmp_path / "run.json")
    assert f"checkpoint {damaged.parent} is damaged" in resumed.stdout and "resumed at step 16" in resumed.stdout
    ours, reference = final_weights(run), final_weights(straight)
    assert all(torch.equal(ours[name], reference[name]) for name in reference)


def test_acp_pruned_fraction_is_logged(tmp_path, byte_corpus):
    path, run = make_run(tmp_path, byte_corpus, tokens=512 * 2, checkpoint_every_tokens=1024)
    run["grid"]["acp"] = True
    run["train"]["context"] = 128
    path.write_text(json.dumps(run))
    fox_train(path)
    fractions = [entry["attn_pruned_fraction"] for entry in train_log(run)]
    assert len(fractions) == 2 and all(0.0 <= f <= 1.0 for f in fractions)


def test_profile_step_writes_time_by_kernel_family_and_a_trace(tmp_path, byte_corpus):
    path, run = make_run(tmp_path, byte_corpus, tokens=512 * 3, checkpoint_every_tokens=512 * 3, profile_step=2)
    done = fox_train(path)
    profile = Path(run["run_dir"]) / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["step2.json", "step2.trace.json.gz"]
    summary = json.loads((profile / "step2.json").read_text())
    families = summary["families_ms"]
    assert summary["time"] == "cpu" and families["GEMM"] > 0 and families["optimizer"] > 0   # on CPU: operators
    assert summary["total_ms"] == pytest.approx(sum(families.values()))
    assert {"aten::mm", "aten::bmm"} <= {kernel["name"] for kernel in summary["top_kernels"]}
    assert "profile of one step" in done.stdout and "GEMM" in done.stdout
    with gzip.open(profile / "step2.trace.json.gz", "rt") as trace:
        names = {event.get("name", "") for event in json.load(trace)["traceEvents"]}
    assert "aten::mm" in names and "Optimizer.step#AdamW.step" in names
    assert len(train_log(run)) == 3
    results = Path(run["results_dir"]).resolve()                          # and both files in the MLflow run
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    artifact_uri = client.get_run((Path(run["run_dir"]) / "mlflow_run_id").read_text()).info.artifact_uri
    stored = stored_artifacts(results, artifact_uri) / "profile"
    assert sorted(p.name for p in stored.iterdir()) == ["step2.json", "step2.trace.json.gz"]


@pytest.mark.parametrize(("name", "family"), [
    ("_attn_bwd_fused", "fox attention"),
    ("triton_per_fused__to_copy__unsafe_view_add_attention_backward_div_expand_lerp_mul_pow_sigmoid", "inductor fused"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>", "SDPA attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "SDPA attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "SDPA attention"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", "GEMM"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamW>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "the rest"),
])
def test_kernel_family_names_what_each_kernel_is(name, family):
    """Kernel and operator names as profiles show them (the FoX, inductor, GEMM and elementwise ones from an H200
    profile of a 760M FoX step): inductor's kernels that fuse an attention block's elementwise work are not SDPA's."""
    assert kernel_family(name) == family


def test_diverging_loss_stops_with_a_clear_message(tmp_path, byte_corpus):
    path, run = make_run(tmp_path, byte_corpus, lr=1e8, grad_clip=0.0, warmup_tokens=0)
    done = fox_train(path, check=False)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fox train: error: fox-pro-tiny-ctx64-dense: loss is ")
    assert "nan" in last or "inf" in last
    # no checkpoint yet: nothing to resume from, and the message does not suggest it
    assert "before the first checkpoint: lower train.lr" in last and "resume" not in last


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
