"""The commit a benchmark result belongs to, for the records in bench/results/."""

from __future__ import annotations

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
