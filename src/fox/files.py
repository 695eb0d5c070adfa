"""Atomic file writes: every output is written under a temp name beside it and renamed into place, so a
kill at any moment leaves the old file or the new one, never a half-written file that looks complete. Also the
lock of a run folder, and readers that name a damaged file instead of failing deep inside a stage."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path to write to (same folder and suffix, so writers that infer the format from it still do);
    renamed onto `path` when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class Busy(RuntimeError):
    """Another live process holds the lock; the message names it."""


@contextmanager
def file_lock(path: str | Path, *, wait: bool = True, owner: str | None = None) -> Iterator[None]:
    """An advisory lock (flock) on `path` for the block. The OS drops it when its process dies, so a killed
    holder never leaves a stale lock behind. With wait=False a held lock raises Busy naming its holder, which
    is whatever the holder passed as `owner` (written into the file once the lock is taken)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise Busy(f"{path} is held by {holder}") from None
        except OSError as error:  # a filesystem without flock (some network mounts): go on, unprotected
            print(f"[fox] warning: cannot lock {path} ({error}); nothing stops a second process", flush=True)
            yield
            return
        try:
            if owner is not None:
                handle.truncate(0)
                handle.write(owner)
                handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_json(path: str | Path) -> Any:
    """A JSON file fox wrote; a damaged one (cut short, edited) is a ValueError naming it and what to do."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}); it was damaged or edited: delete it and rerun, which "
                         "writes it again") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log; a last line cut short (a write interrupted by a crash) is dropped."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not valid JSON ({error}); it was damaged or edited") from None
    return records
