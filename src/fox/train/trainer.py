"""`fox train`: one DeepSpeed code path for one CPU process, one GPU and N GPUs, resumable after a kill."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from fox_kernels import attention_kernels
from tqdm import tqdm

from fox.data import TrainWindows, load_manifest, training_data, validation_windows
from fox.files import Busy, file_lock, read_jsonl, write_atomic
from fox.model import LanguageModel, model_config, peak_lr
from fox.model.config import RECURRENT_ARCHS, default_components, parse_variant
from fox.tracking import TRAIN_METRICS, Tracker, sync_training

from . import checkpoint
from .compile import compile_enabled, compile_model
from .distributed import Dist, barrier, init_distributed, mean_over_ranks
from .flops import mfu, peak_flops
from .profiling import StepProfile
from .schedule import lr_factor

LOCK = ".train.lock"
"""runs/{run}/.train.lock: held (flock) by the process training the run; it names that process."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stops instead of writing garbage checkpoints."""


class RunBusy(RuntimeError):
    """Another live process is training the same run folder."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    context: int
    tokens: int
    tokens_per_step: int
    micro_batch_size: int
    lr: float | None
    warmup_tokens: int
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    precision: str
    zero_stage: int
    activation_checkpointing: bool
    compile: bool | str
    compile_memory_budget: float
    checkpoint_every_tokens: int
    keep_checkpoints: int
    log_every_steps: int
    seed: int
    val_every_steps: int = 0
    """A held-out loss every this many steps (0: none), over val_windows windows of the validation split."""
    val_windows: int = 8
    profile_step: int = 0
    """Profile this optimizer step (counted from 1) when this call runs it (fox.train.profiling); 0: none."""

    @classmethod
    def from_dict(cls, train: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if k == "betas" else v for k, v in train.items() if k in names})

    def steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; tokens_per_step must split evenly."""
        per_pass = self.context * self.micro_batch_size * world_size
        if self.tokens_per_step % per_pass:
            raise ValueError(f"train.tokens_per_step={self.tokens_per_step}: must be a multiple of context x "
                             f"micro_batch_size x ranks = {self.context} x {self.micro_batch_size} x {world_size}")
        return self.tokens_per_step // per_pass


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision='bf16': this GPU has no bf16; allowed here are auto, fp32")
    return precision


def build_model(run_cfg: dict, vocab_size: int, activation_checkpointing: bool) -> LanguageModel:
    grid, model = run_cfg["grid"], run_cfg["model"]
    variant = grid.get("variant", "")
    bound = model["acp_bound"]
    if bound == "auto":
        components = default_components(grid["model"], grid["block"]) | parse_variant(grid["model"], grid["block"],
                                                                                      variant)
        bound = "gains" if components["qk_norm"] else "norms"  # QK-norm bounds |q.k| by its gains, no data pass
    cfg = model_config(grid["model"], grid["block"], grid["size"], vocab_size=model["vocab_size"] or vocab_size,
                       variant=variant, acp=grid["acp"], acp_bound=bound, log_eps=model["log_eps"],
                       fgate_bias_init=tuple(model["fgate_bias_init"]),
                       activation_checkpointing=activation_checkpointing)
    return LanguageModel(cfg)


def zero_stage(cfg: TrainConfig, precision: str) -> int:
    """The ZeRO stage run: with bf16, at least 1. DeepSpeed accumulates bf16 gradients in bf16 at stage 0 (32
    micro-batches a step in the papers' recipe on one GPU) and in fp32 from stage 1 on, whose sharding is a
    no-op on one GPU."""
    return max(cfg.zero_stage, 1) if precision == "bf16" else cfg.zero_stage


def deepspeed_config(cfg: TrainConfig, precision: str, world_size: int) -> dict:
    accumulation = cfg.accumulation(world_size)
    config = {
        "train_batch_size": cfg.micro_batch_size * accumulation * world_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": zero_stage(cfg, precision)},
        "steps_per_print": 2**62,
    }
    if precision == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def train(run_cfg: dict, stop_after_steps: int | None = None) -> dict | None:
    """Train one grid cell to the end (or for stop_after_steps more steps); returns the summary when done.

    A run already trained to the end with these settings is left as it is, no file touched. One process at a
    time trains a run folder: a second one is refused (RunBusy) while the first lives.
    """
    run_dir = Path(run_cfg["run_dir"])
    identity = checkpoint.training_identity(run_cfg, load_manifest(run_cfg["data_dir"]))
    is_main = int(os.environ.get("RANK", "0")) == 0
    if (summary := checkpoint.finished(run_dir, identity)) is not None:
        if is_main:
            print(f"[fox] {run_cfg['run']}: already trained ({summary['steps']} steps, {run_dir / 'train.json'}); "
                  "nothing to do", flush=True)
        return summary
    if not is_main:
        return _train(run_cfg, stop_after_steps)
    owner = f"fox train (pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})"
    try:
        with file_lock(run_dir / LOCK, wait=False, owner=owner):
            return _train(run_cfg, stop_after_steps)
    except Busy as busy:
        raise RunBusy(f"{run_cfg['run']}: {busy}, which is training this run: wait for it to end or stop it "
                      "(a killed process releases the lock at once), then rerun") from None


def _train(run_cfg: dict, stop_after_steps: int | None) -> dict | None:
    dist = init_distributed()
    import deepspeed

    cfg = TrainConfig.from_dict(run_cfg["train"])
    accumulation = cfg.accumulation(dist.world_size)
    precision = resolve_precision(cfg.precision, dist.device)
    run_dir = Path(run_cfg["run_dir"])
    ckpt_root = run_dir / "checkpoints"
    manifest = training_data(run_cfg)

    torch.manual_seed(cfg.seed)
    model = build_model(run_cfg, manifest["tokenizer"]["n_vocab"], cfg.activation_checkpointing)
    stage = zero_stage(cfg, precision)
    if stage == 3:
        for module, parameter in model.external_parameters():
            deepspeed.zero.register_external_parameter(module, parameter)
    compiled = compile_enabled(cfg.compile, dist.device, stage)
    if compiled:
        compile_model(model, memory_budget=cfg.compile_memory_budget)
    grid = run_cfg["grid"]
    peak = cfg.lr if cfg.lr is not None else peak_lr(grid["model"], grid["block"], grid["size"], cfg.tokens)
    optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), lr=peak, betas=cfg.betas,
                                  fused=dist.device.type == "cuda")
    # each update is scheduled at the middle of the tokens it consumes: the first and last are both non-zero
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step * cfg.tokens_per_step + cfg.tokens_per_step // 2, cfg.warmup_tokens, cfg.tokens))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(cfg, precision, dist.world_size))
    windows = TrainWindows(run_cfg["data_dir"], cfg.context, cfg.micro_batch_size, rank=dist.rank,
                           world_size=dist.world_size, seed=cfg.seed, order=run_cfg["train"]["data_order"])

    identity = checkpoint.training_identity(run_cfg, manifest)
    if dist.is_main:
        changed = checkpoint.supersede_if_changed(run_dir, identity)
        if changed:
            print(f"[fox] {run_cfg['run']}: settings changed since the last checkpoint ({', '.join(changed)}); "
                  f"the earlier training moved to {run_dir / 'superseded'}, training afresh", flush=True)
        checkpoint.record_identity(ckpt_root, identity)
    barrier()
    state = checkpoint.load(engine, ckpt_root)
    step = state["step"] if state else 0
    if state:
        windows.load_state_dict(state["data"])
    tracker = Tracker(run_cfg, enabled=dist.is_main)
    tracker.start(training=True)
    counts = model.param_counts()
    log = _TrainLog(run_dir, dist, tracker, cfg, step, _Validation(engine, run_cfg, cfg, dist.device, step),
                    _params_used(run_cfg, model.cfg, counts, peak, precision, dist, accumulation, manifest))
    train_flops = model.train_flops_per_token(cfg.context)
    peak_device = peak_flops(precision)
    if dist.is_main:
        print(f"[fox] {run_cfg['run']}: {counts['paper'] / 1e6:.2f}M params (paper count), {cfg.steps()} steps "
              f"of {cfg.tokens_per_step} tokens, {accumulation} micro-batches/step, {dist.world_size} rank(s), "
              f"{precision}, ZeRO {stage}, compile {'on' if compiled else 'off'}"
              + (f", resumed at step {step}" if state else ""), flush=True)
        if model.cfg.arch in RECURRENT_ARCHS and dist.device.type == "cuda":
            print("[fox] flash-linear-attention tunes each kernel on its first use on a machine: the first step "
                  "can take minutes (Triton's cache keeps the choices for later runs)", flush=True)

    # Nothing in the loop waits for the GPU except at log and checkpoint steps: the loss and ACP's tile counts
    # are summed on the device and read there, and batches go up from pinned memory without blocking.
    steps_this_call = 0
    interval_start, interval_tokens, interval_steps = time.perf_counter(), 0, 0
    interval_loss = torch.zeros((), device=dist.device)
    acp_tiles = torch.zeros(2, dtype=torch.float64, device=dist.device)   # visited, total
    while step < cfg.steps() and (stop_after_steps is None or steps_this_call < stop_after_steps):
        lr = schedule.get_last_lr()[0]
        log_step = (step + 1) % cfg.log_every_steps == 0 or step + 1 == cfg.steps()
        save_step = (step + 1) * cfg.tokens_per_step // cfg.checkpoint_every_tokens > \
            step * cfg.tokens_per_step // cfg.checkpoint_every_tokens or step + 1 == cfg.steps()
        step_loss, grad_norm = torch.zeros((), device=dist.device), None
        profiling = step + 1 == cfg.profile_step
        with StepProfile(run_dir / "profile", step + 1, dist.device, dist.rank, dist.world_size) if profiling \
                else contextlib.nullcontext():
            for _ in range(accumulation):
                inputs, targets = (_to_device(x, dist.device) for x in windows.next_batch())
                loss = engine(inputs, targets)
                engine.backward(loss)
                if log_step and engine.is_gradient_accumulation_boundary():
                    grad_norm = _fp32_grad_norm(engine)
                engine.step()
                step_loss += loss.detach().float() / accumulation
                if (tiles := model.acp_tiles()) is not None:
                    acp_tiles += tiles
        step += 1
        steps_this_call += 1
        tokens = step * cfg.tokens_per_step
        interval_tokens += cfg.tokens_per_step
        interval_steps += 1
        interval_loss += step_loss
        if not (log_step or save_step):
            continue
        loss_value = mean_over_ranks(step_loss).item()
        if not math.isfinite(loss_value):
            tracker.end("FAILED")
            raise TrainingDiverged(_diverged(run_cfg["run"], loss_value, step, tokens, ckpt_root))
        if log_step:
            if grad_norm is None and (recorded := engine.get_global_grad_norm()) is not None:
                grad_norm = float(recorded)
            visited, total = acp_tiles.tolist()
            elapsed = time.perf_counter() - interval_start            # .item() above waited for the GPU
            tokens_per_s = interval_tokens / elapsed
            log.write(step, {"loss": mean_over_ranks(interval_loss).item() / interval_steps, "lr": lr,
                             "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": tokens,
                             "tokens_per_s": tokens_per_s,
                             "mfu": mfu(train_flops, tokens_per_s, dist.world_size, peak_device),
                             "attn_pruned_fraction": 1.0 - visited / total if total else None,
                             "peak_memory_gb": _peak_memory_gb(dist.device)})
            interval_start, interval_tokens, interval_steps = time.perf_counter(), 0, 0
            interval_loss.zero_()
            acp_tiles.zero_()
        if save_step:
            client = {"step": step, "tokens": tokens, "data": windows.state_dict(), "loss": loss_value}
            checkpoint.save(engine, ckpt_root, step, tokens, client, cfg.keep_checkpoints, dist.is_main)

    if step < cfg.steps():
        tracker.end("KILLED")
        return None
    summary = log.summary(run_cfg, counts, precision, step, cfg, train_flops)
    tracker.end("FINISHED")
    return summary


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch to the device; on CUDA through pinned memory, so the copy does not make the host wait."""
    if device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)


def _peak_memory_gb(device: torch.device) -> float | None:
    """Most device memory PyTorch has held at once so far in this process, GiB (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _fp32_grad_norm(engine) -> torch.Tensor | None:
    """Gradient norm before clipping where DeepSpeed does not record one (fp32 without ZeRO), else None."""
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled():
        return None
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else None


def _params_used(run_cfg: dict, model_cfg, counts: dict, peak: float, precision: str, dist: Dist,
                 accumulation: int, manifest: dict) -> dict:
    """The settings as this training uses them, for MLflow: the resolved peak lr, the model's dimensions and
    vocabulary (not the config's nulls), parameter counts, data, hardware and the attention kernels and
    versions that ran (bit-level results depend on them)."""
    return {"grid": {key: run_cfg["grid"][key] for key in ("size", "context")}, "model": asdict(model_cfg),
            "train": {**run_cfg["train"], "lr": peak}, "params": counts,
            "data": {"dir": run_cfg["data_dir"], "tokenizer": manifest["tokenizer"]["name"],
                     "train_tokens": manifest["splits"]["train"]["tokens"]},
            "run": {"precision": precision, "world_size": dist.world_size, "accumulation": accumulation,
                    "attention_kernels": attention_kernels(dist.device), "torch": torch.__version__,
                    "triton": importlib.metadata.version("triton")}}


def _diverged(run: str, loss: float, step: int, tokens: int, ckpt_root: Path) -> str:
    """What stopped the run and what to do, depending on whether a checkpoint exists to resume from."""
    last = checkpoint.latest(ckpt_root)
    retrain = "lower train.lr (or lengthen train.warmup_tokens) and rerun"
    if last is None:
        return f"{run}: loss is {loss} at step {step} ({tokens} tokens), before the first checkpoint: {retrain}"
    return (f"{run}: loss is {loss} at step {step} ({tokens} tokens); the same settings would resume from "
            f"{ckpt_root / last['tag']} (step {last['step']}) and likely diverge again: {retrain} (training restarts "
            f"from step 0; the diverged one is kept in {ckpt_root.parent / 'superseded'})")


class _Validation:
    """A small held-out loss at the first log line past every val_every_steps steps and at the last step: the
    first val_windows windows of the validation split at the training context, the same windows each time, so
    the curve compares step to step."""

    def __init__(self, engine, run_cfg: dict, cfg: TrainConfig, device: torch.device, start_step: int):
        self.engine, self.every, self.device, self.done = engine, cfg.val_every_steps, device, start_step
        self.batches = list(validation_windows(run_cfg["data_dir"], cfg.context, cfg.micro_batch_size,
                                               cfg.val_windows)) if self.every else []

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every) and (step // self.every > self.done // self.every or last)

    @torch.no_grad()
    def loss(self, step: int) -> float:
        """Every rank evaluates the same windows (a ZeRO-3 forward needs them all): no reduction."""
        self.done = step
        self.engine.eval()
        total, count = torch.zeros((), device=self.device), 0
        for inputs, targets in self.batches:
            total += self.engine(inputs.to(self.device), targets.to(self.device)).float() * len(inputs)
            count += len(inputs)
        self.engine.train()
        return (total / count).item()


class _TrainLog:
    """Training metrics to stdout, runs/{run}/train_log.jsonl and MLflow, from rank 0 only.

    The log file is the record: a resumed run first cuts it back to the checkpoint's step (the steps after it
    are trained again), and MLflow gets each step once, the steps it missed (an outage, a kill before they were
    sent) logged again from the file. On a terminal progress is a tqdm bar; in a log file one line per
    log_every_steps, both with step/total, tokens/s and the estimated time left.
    """

    def __init__(self, run_dir: Path, dist: Dist, tracker: Tracker, cfg: TrainConfig, start_step: int,
                 validation: _Validation, params: dict):
        self.path, self.dist, self.tracker, self.validation = run_dir / "train_log.jsonl", dist, tracker, validation
        self.total, self.tokens_per_step, self.shown = cfg.steps(), cfg.tokens_per_step, start_step
        self.rates: list[float] = []
        self.last: dict = {}
        self.params, self.params_logged = params, False
        self.bar = None
        self.first: tuple[int, float, float] | None = None  # (step, time, seconds per step) of the first line
        if not dist.is_main:
            return
        if self.path.is_file():
            kept = [record for record in read_jsonl(self.path) if record["step"] <= start_step]
            write_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        self._sync()
        if sys.stdout.isatty():
            self.bar = tqdm(total=self.total, initial=start_step, desc=run_dir.name, unit="step",
                            dynamic_ncols=True, file=sys.stdout)

    def _sync(self) -> None:
        """Params if still owed, then the records of the log file MLflow does not hold yet."""
        if not self.params_logged:
            self.params_logged = self.tracker.log_params(self.params)
        self.mlflow_step = self.tracker.sync_train_log(self.path, TRAIN_METRICS)

    def write(self, step: int, metrics: dict) -> None:
        if self.validation.due(step, step == self.total):
            metrics = {**metrics, "val_loss": self.validation.loss(step)}
        self.rates.append(metrics["tokens_per_s"])
        self.last = metrics
        if not self.dist.is_main:
            return
        with self.path.open("a") as out:
            out.write(json.dumps({"step": step, **metrics}) + "\n")
        self._show(step, metrics)
        if self.mlflow_step < 0 or not self.params_logged:
            self._sync()
        elif step > self.mlflow_step:
            named = {TRAIN_METRICS[key]: value for key, value in metrics.items() if key in TRAIN_METRICS}
            self.mlflow_step = step if self.tracker.log_metrics(named, step) else -1

    def _show(self, step: int, metrics: dict) -> None:
        fields = [("loss", metrics["loss"], ".4f"), ("val", metrics.get("val_loss"), ".4f"),
                  ("lr", metrics["lr"], ".2e"), ("grad", metrics.get("grad_norm"), ".3f")]
        text = "  ".join(f"{name} {value:{spec}}" for name, value, spec in fields if value is not None)
        text += f"  {_count(metrics['tokens_per_s'])} tok/s"
        if metrics.get("mfu") is not None:
            text += f"  mfu {100 * metrics['mfu']:.1f}%"
        if metrics.get("attn_pruned_fraction") is not None:
            text += f"  pruned {100 * metrics['attn_pruned_fraction']:.1f}%"
        if metrics.get("peak_memory_gb") is not None:
            text += f"  mem {metrics['peak_memory_gb']:.1f} GiB"
        if self.bar is not None:
            self.bar.update(step - self.shown)
            self.bar.set_postfix_str(text, refresh=True)
            self.shown = step
            if step == self.total:
                self.bar.close()
            return
        # wall time per step since the first line of this process: logging and validation included
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now, self.tokens_per_step / metrics["tokens_per_s"])
        first_step, first_time, first_step_s = self.first
        per_step = (now - first_time) / (step - first_step) if step > first_step else first_step_s
        eta = _duration((self.total - step) * per_step)
        print(f"[fox] step {step}/{self.total} ({100 * step / self.total:.0f}%)  {text}  eta {eta}", flush=True)

    def summary(self, run_cfg: dict, counts: dict, precision: str, step: int, cfg: TrainConfig,
                train_flops: float) -> dict:
        """Written last, as train.json: its presence marks a finished run for the pipeline."""
        steady = self.rates[1:] or self.rates  # the first interval holds start-up and compilation
        summary = {"run": run_cfg["run"], "steps": step, "tokens": step * cfg.tokens_per_step,
                   "final_loss": self.last.get("loss"), "params": counts, "precision": precision,
                   "world_size": self.dist.world_size,
                   "tokens_per_s": sum(steady) / len(steady) if steady else None,
                   "mfu": self.last.get("mfu"), "train_flops_per_token": train_flops,
                   "attn_pruned_fraction": self.last.get("attn_pruned_fraction"),
                   "peak_memory_gb": self.last.get("peak_memory_gb"), "settings": self.params}
        if self.dist.is_main:
            write_atomic(Path(run_cfg["run_dir"]) / "train.json", json.dumps(summary, indent=1))
            sync_training(self.tracker, run_cfg)
        return summary


def _count(value: float) -> str:
    """12345.6 -> 12.3k: tokens/s at a glance."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.1f}{suffix}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    """Seconds as 1h02m, 3m05s or 42s."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
