"""The records in bench/results/: the commit and launch settings a benchmark result belongs to, where a record goes
and how it is written."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """This checkout's commit (+dirty with uncommitted changes); FOX_COMMIT names it where the tree travels
    without its own .git (a lent GPU machine's copy reported a stale HEAD)."""
    if os.environ.get("FOX_COMMIT"):
        return os.environ["FOX_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
    except OSError:                                      # no git on this machine
        return "unknown"
    return (done.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def launch_settings(launch) -> dict:
    """A fox_kernels launch module's settings of the Gluon kernels (tiles, persistent programs, rescaling, gate
    bias, head groups, ...): a record holds them, so that what ran is read from it, not only from the commit."""
    return {name: value for name, value in vars(launch).items() if name.startswith("GLUON") and not callable(value)}


def record_path(kind: str, out: str | None, date: str) -> Path:
    """--out, or bench/results/<kind>_<date>.json; its folder made."""
    path = Path(out) if out else REPO / "bench" / "results" / f"{kind}_{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_record(path: Path, record: dict) -> None:
    """JSON to a temporary name, then renamed: a run cut off mid-write leaves the last whole record."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
