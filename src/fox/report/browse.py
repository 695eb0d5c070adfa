"""Where the results are: the one line the pipeline ends with."""

from __future__ import annotations

import atexit
from pathlib import Path

from fox.tracking import ui_command


def where(config: dict) -> str:
    """The table, the plots and the command that opens the MLflow store, as far as they exist yet."""
    results = Path(config["results_dir"])
    parts = []
    if (results / "table1.md").is_file():
        parts.append(f"table {results / 'table1.md'} (csv: {results / 'table1.csv'})")
    if any((results / "plots").glob("*.png")):
        parts.append(f"plots {results / 'plots'}/")
    parts.append(f"MLflow: {ui_command(config)}, then open http://127.0.0.1:5000/#/experiments?workflowType="
                 "machine_learning")
    return "[fox] results: " + "; ".join(parts)


def announce_at_exit(config: dict) -> None:
    """Print where() as the process's very last line (Snakemake's onsuccess runs before its own closing lines)."""
    atexit.register(lambda: print(where(config), flush=True))
