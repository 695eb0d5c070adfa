"""Checkpoints through the DeepSpeed engine, written atomically, the last K kept, listed in a manifest.

Layout under runs/{run}/checkpoints/:
    step_00000128/        one DeepSpeed checkpoint (module, optimizer, lr scheduler, client state)
    latest                the newest complete tag (DeepSpeed's own convention)
    manifest.json         [{tag, step, tokens}] of the kept checkpoints, oldest first
A checkpoint is saved under a hidden partial name and renamed once every rank has written its part, so a
kill at any moment leaves either the previous set or the new one, never a half-written tag that looks done.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from fox.files import write_atomic

from .distributed import barrier

MANIFEST = "manifest.json"
IDENTITY = "identity.json"
RUN_RECORDS = ("checkpoints", "train_log.jsonl", "train.json", "mlflow_run_id")
"""What one training of a run leaves in its folder; superseded together when the settings change."""


def read_manifest(root: Path) -> list[dict]:
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else []


def latest(root: Path) -> dict | None:
    """The newest complete checkpoint entry, or None for a fresh run."""
    entries = read_manifest(root)
    return entries[-1] if entries else None


def training_identity(run_cfg: dict, data_manifest: dict) -> dict:
    """Everything that decides the training trajectory, flattened: resuming is exact only if none changed.

    Logging and checkpoint cadence are left out (they change no weight), and so is compilation (the same
    computation, up to rounding); so is the world size, since the sample order and ZeRO-0 checkpoints do not
    depend on it.
    """
    from fox.tracking import flatten

    cadence = {"log_every_steps", "keep_checkpoints", "checkpoint_every_tokens", "compile", "compile_memory_budget"}
    train = {key: value for key, value in run_cfg["train"].items() if key not in cadence}
    shards = [shard["sha256"] for shard in data_manifest["splits"]["train"]["shards"]]
    return flatten({"grid": run_cfg["grid"], "model": run_cfg["model"], "train": train, "data": {"train": shards}})


def supersede_if_changed(run_dir: Path, identity: dict) -> list[str]:
    """Move an earlier training made with other settings aside, so the rerun trains afresh instead of resuming.

    Its checkpoints, log and MLflow link go to runs/{run}/superseded/<time>/ (nothing is deleted); returns the
    keys that changed, empty when the folder holds no earlier training or the same settings.
    """
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if not (root / MANIFEST).is_file():
        return []
    before = json.loads((root / IDENTITY).read_text()) if (root / IDENTITY).is_file() else {}
    changed = sorted(key for key in before.keys() | identity.keys() if before.get(key) != identity.get(key))
    if changed:
        archive = run_dir / "superseded" / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        archive.mkdir(parents=True, exist_ok=True)
        for name in RUN_RECORDS:
            if (run_dir / name).exists():
                os.replace(run_dir / name, archive / name)
    return changed


def record_identity(root: Path, identity: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / IDENTITY, json.dumps(identity, indent=1, sort_keys=True))


def save(engine, root: Path, step: int, tokens: int, client_state: dict, keep: int, is_main: bool) -> None:
    root = Path(root)
    tag = f"step_{step:08d}"
    partial = f".partial-{tag}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / partial, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=partial, client_state=client_state, save_latest=False)
    barrier()
    if is_main:
        shutil.rmtree(root / tag, ignore_errors=True)
        os.replace(root / partial, root / tag)
        entries = [entry for entry in read_manifest(root) if entry["tag"] != tag]
        entries.append({"tag": tag, "step": step, "tokens": tokens})
        for old in entries[:-keep]:
            shutil.rmtree(root / old["tag"], ignore_errors=True)
        write_atomic(root / MANIFEST, json.dumps(entries[-keep:], indent=1))
        write_atomic(root / "latest", tag)
    barrier()


def load(engine, root: Path) -> dict | None:
    """Restore the newest checkpoint into the engine; returns its client state, or None if there is none."""
    entry = latest(root)
    if entry is None:
        return None
    path, client_state = engine.load_checkpoint(str(root), tag=entry["tag"])
    if path is None:
        raise RuntimeError(f"checkpoint {Path(root) / entry['tag']} is listed in the manifest but did not load")
    return client_state


def fp32_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's weights in fp32 from one checkpoint, whatever the ZeRO stage and precision.

    ZeRO and the bf16 optimizer keep fp32 master weights in their optimizer shards: DeepSpeed's zero_to_fp32
    gathers ZeRO's, _bf16_optimizer_masters the bf16 optimizer's (bf16 at ZeRO 1, which zero_to_fp32 does not
    read). A plain fp32 run keeps the module itself in fp32.
    """
    folder = Path(root) / tag
    if any(folder.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        return _bf16_optimizer_masters(folder)
    if any(folder.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {name: tensor.float() for name, tensor in states["module"].items()}


def _bf16_optimizer_masters(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 masters of DeepSpeed's BF16_Optimizer: per parameter group, each rank holds one contiguous slice of
    the group's flattened fp32 parameters (the last one padded); the model states file lists the parameters of
    each group in flattening order with their shapes."""
    model = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True)
    ranks = sorted(folder.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda path: int(path.name.split("_")[4]))
    shards = [torch.load(path, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
              for path in ranks]
    state = {}
    for group, shapes in enumerate(model["param_shapes"]):
        flat = torch.cat([shard["single_partition_of_fp32_groups"][group] for shard in shards])
        offset = 0
        for name, shape in shapes.items():
            numel = shape.numel()
            state[name] = flat[offset:offset + numel].view(shape).clone()
            offset += numel
        padding = shards[-1]["group_paddings"][group]
        if offset + padding != flat.numel():
            raise ValueError(f"{folder}: parameter group {group} holds {flat.numel()} values, its parameters "
                             f"{offset} plus padding {padding}: the checkpoint does not match its model states")
    return state
