"""Checkpoints through the DeepSpeed engine, written atomically, the last K kept, listed in a manifest.

Layout under runs/{run}/checkpoints/:
    step_00000128/        one DeepSpeed checkpoint (module, optimizer, lr scheduler, client state)
    latest                the newest complete tag (DeepSpeed's own convention)
    manifest.json         [{tag, step, tokens, files: {name: bytes}}] of the kept checkpoints, oldest first
A checkpoint is saved under a hidden partial name and renamed once every rank has written its part, so a
kill at any moment leaves either the previous set or the new one, never a half-written tag that looks done.
Every reader checks a checkpoint against the sizes the manifest recorded (and that each file is a whole zip
archive) before loading it, so a truncated or damaged file is named instead of failing deep inside torch.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path

import torch

from fox.config import CADENCE
from fox.files import read_json, write_atomic

from .distributed import barrier

MANIFEST = "manifest.json"
IDENTITY = "identity.json"
RUN_RECORDS = ("checkpoints", "train_log.jsonl", "train.json", "mlflow_run_id")
"""What one training of a run leaves in its folder; superseded together when the settings change."""


class DamagedCheckpoint(ValueError):
    """A checkpoint's files are missing, truncated or not the archives torch wrote; the message says what to do."""


def read_manifest(root: Path) -> list[dict]:
    path = Path(root) / MANIFEST
    return read_json(path) if path.is_file() else []


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

    train = {key: value for key, value in run_cfg["train"].items() if key not in CADENCE}
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
    before = read_json(root / IDENTITY) if (root / IDENTITY).is_file() else {}
    changed = sorted(key for key in before.keys() | identity.keys() if before.get(key) != identity.get(key))
    if changed:
        archive = run_dir / "superseded" / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        archive.mkdir(parents=True, exist_ok=True)
        for name in RUN_RECORDS:
            if (run_dir / name).exists():
                os.replace(run_dir / name, archive / name)
    return changed


def finished(run_dir: Path, identity: dict) -> dict | None:
    """The summary of a run trained to the end with these settings (its train.json), else None: rerunning it
    has nothing to do."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if not (run_dir / "train.json").is_file() or not (root / IDENTITY).is_file():
        return None
    summary = read_json(run_dir / "train.json")
    last = latest(root)
    if read_json(root / IDENTITY) != identity or last is None or last["step"] != summary["steps"]:
        return None
    return summary


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
        files = {str(f.relative_to(root / tag)): f.stat().st_size for f in sorted((root / tag).rglob("*"))
                 if f.is_file()}
        entries.append({"tag": tag, "step": step, "tokens": tokens, "files": files})
        for old in entries[:-keep]:
            shutil.rmtree(root / old["tag"], ignore_errors=True)
        write_atomic(root / MANIFEST, json.dumps(entries[-keep:], indent=1))
        write_atomic(root / "latest", tag)
    barrier()


def verify(root: Path, tag: str) -> None:
    """Raise DamagedCheckpoint unless every file of checkpoint `tag` has the size recorded when it was saved
    and each .pt file is a readable zip archive (its directory sits at the end: a truncated file fails)."""
    root, folder = Path(root), Path(root) / tag
    entry = next((e for e in read_manifest(root) if e["tag"] == tag), {})
    problems = [f"{name} is missing" for name in entry.get("files", {}) if not (folder / name).is_file()]
    problems += [f"{name} holds {(folder / name).stat().st_size} bytes, {size} when saved"
                 for name, size in entry.get("files", {}).items()
                 if (folder / name).is_file() and (folder / name).stat().st_size != size]
    if not folder.is_dir():
        problems.append("the folder is missing")
    for path in sorted(folder.glob("*.pt")) if not problems else ():
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as error:
            problems.append(f"{path.name} is not a readable archive ({error})")
    if problems:
        raise DamagedCheckpoint(f"checkpoint {folder} is damaged: {'; '.join(problems)}")


def load(engine, root: Path) -> dict | None:
    """Restore the newest intact checkpoint into the engine; returns its client state, or None if there is none.
    A damaged newer one is reported and passed over (training redoes its steps and saves it again)."""
    entry = None
    for candidate in reversed(read_manifest(root)):
        try:
            verify(root, candidate["tag"])
        except DamagedCheckpoint as error:
            print(f"[fox] warning: {error}; resuming from the checkpoint before it", flush=True)
            continue
        entry = candidate
        break
    if entry is None:
        if read_manifest(root):
            raise DamagedCheckpoint(f"{root}: every checkpoint the manifest lists is damaged (see above); move "
                                    f"{root} aside to train the run from the start")
        return None
    try:
        path, client_state = engine.load_checkpoint(str(root), tag=entry["tag"])
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise DamagedCheckpoint(f"checkpoint {Path(root) / entry['tag']} could not be loaded ({error}); move that "
                                "folder aside and rerun: training resumes from the checkpoint before it") from None
    if path is None:
        raise RuntimeError(f"checkpoint {Path(root) / entry['tag']} is listed in the manifest but did not load")
    return client_state


def fp32_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's fp32 weights in one checkpoint, by parameter name, whatever the ZeRO stage and precision.

    Under bf16 the module copy in a checkpoint is bf16; the fp32 masters that the optimizer updates live in its
    shards, and those are returned (the trainer runs bf16 at ZeRO >= 1):
        ZeRO 1/2 (the bf16 optimizer and ZeRO's): *zero_pp_rank_<r>_mp_rank_00_optim_states.pt hold rank r's
            slice of each flat fp32 group ("single_partition_of_fp32_groups") and, per parameter, where its
            fragment lies in that slice ("param_slice_mappings"); a parameter is its fragments in rank order
        ZeRO 3: DeepSpeed's zero_to_fp32 gathers its partitions
        fp32 at ZeRO 0: the module itself
    Files are memory-mapped, so only the masters are read, not the Adam moments (~2/3 of a checkpoint).
    """
    try:
        verify(root, tag)
    except DamagedCheckpoint as error:
        raise DamagedCheckpoint(f"{error}. Delete {Path(root).parent / 'train.json'} and rerun: training resumes "
                                "from the newest intact checkpoint and saves this one again") from None
    folder = Path(root) / tag
    model_states = _load(folder / "mp_rank_00_model_states.pt")
    optim_files = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                         key=lambda path: int(path.name.split("zero_pp_rank_")[1].split("_")[0]))
    if not optim_files:
        return {name: tensor.float().clone() for name, tensor in model_states["module"].items()}
    ranks = [_load(path)["optimizer_state_dict"] for path in optim_files]
    if "param_slice_mappings" not in ranks[0]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    fragments: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
    for rank in ranks:
        for flat, mapping in zip(rank["single_partition_of_fp32_groups"], rank["param_slice_mappings"],
                                 strict=True):
            for name, address in mapping.items():
                fragments[name].append(flat.narrow(0, address.start, address.numel))
    return {name: torch.cat(parts).view(shapes[name]).float().clone() for name, parts in fragments.items()}


def _load(path: Path) -> dict:
    """A DeepSpeed checkpoint file, memory-mapped (tensors are read when touched); a damaged one is named."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        folder = path.parent
        raise DamagedCheckpoint(f"checkpoint {folder} could not be read ({error}). Delete "
                                f"{folder.parent.parent / 'train.json'} and move {folder} aside, then rerun: "
                                "training resumes from the checkpoint before it") from None
