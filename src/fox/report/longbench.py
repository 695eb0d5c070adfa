"""`fox longbench-table`: results/longbench.csv (Table 2 of the FoX paper: a row per model, a column per LongBench
task), its Markdown view and plots/longbench.png, from the eval/longbench/{run}.json files.

Scores are on LongBench's 0-100 scale, as the paper prints them; a task not run stays empty.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fox.config import run_ids  # noqa: E402
from fox.files import atomic_path, write_atomic  # noqa: E402
from fox.model.config import variant_label  # noqa: E402

TABLE_2_TASKS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report",
                 "qmsum", "multi_news", "trec", "triviaqa", "samsum", "lcc", "repobench-p")
"""LongBench's names of the FoX paper's Table 2 columns, in its order (lm-eval's tasks: longbench_<name>)."""
ROW_COLUMNS = ["run", "model", "params", "tokens", "train_ctx", "acp"]
TASK_LABELS = {"narrativeqa": "NarrativeQA", "qasper": "Qasper", "multifieldqa_en": "MFQA", "hotpotqa": "HotpotQA",
               "2wikimqa": "2WikiMQA", "musique": "Musique", "gov_report": "GovReport", "qmsum": "QMSum",
               "multi_news": "MultiNews", "trec": "TREC", "triviaqa": "TriviaQA", "samsum": "SamSum", "lcc": "LCC",
               "repobench-p": "RepoBench-P"}
"""Table 2's column headers."""


def _ordered(config: dict, paths: list[Path]) -> list[dict]:
    """The evaluations in the config's grid order; runs the config does not name follow in input order."""
    evals = [json.loads(Path(path).read_text()) for path in paths]
    rank = {run: i for i, run in enumerate(run_ids(config))}
    return sorted(evals, key=lambda ev: rank.get(ev["run"], len(rank)))


def task_columns(evals: list[dict]) -> list[str]:
    """Table 2's 14 tasks in its order, then any other task run (e.g. the offline one) by name."""
    others = sorted({task for ev in evals for task in ev["scores"]} - set(TABLE_2_TASKS))
    return list(TABLE_2_TASKS) + others


def rows(evals: list[dict]) -> list[dict]:
    """One row per model: its name as the paper writes it (FoX (Pro), ... with a Table 3 variant's edits)."""
    tasks = task_columns(evals)
    out = []
    for ev in evals:
        grid = ev["grid"]
        row = {"run": ev["run"], "model": variant_label(grid["model"], grid["block"], grid.get("variant", "")),
               "params": ev["params"], "tokens": ev["tokens"], "train_ctx": ev["train_ctx"], "acp": ev["acp"]}
        out.append(row | {task: ev["scores"].get(task) for task in tasks})
    return out


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def markdown(table: list[dict], tasks: list[str]) -> str:
    """Table 2 as Markdown: the paper's headers, two decimals; tasks no model ran are left out."""
    shown = [task for task in tasks if any(row[task] is not None for row in table)]
    header = ["Model"] + [TASK_LABELS.get(task, task) for task in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        label = row["model"] + (" (ACP)" if row["acp"] else "")
        cells = [f"{row[task]:.2f}" if row[task] is not None else "" for task in shown]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    hidden = [task for task in tasks if task not in shown]
    note = "LongBench scores (0-100, higher is better)."
    if hidden:
        note += f" Not run: {', '.join(hidden)}."
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot(table: list[dict], tasks: list[str], out: Path) -> None:
    """A heat map, models x tasks: each cell's score printed, its colour the score relative to the task's best,
    so the winner of each column (the paper's bold) stands out whatever the task's scale."""
    shown = [task for task in tasks if any(row[task] is not None for row in table)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * max(len(shown), 1), 1.2 + 0.45 * max(len(table), 1)))
    if not table or not shown:
        ax.text(0.5, 0.5, "no LongBench scores", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_axis_off()
    else:
        scores = np.array([[np.nan if row[t] is None else row[t] for t in shown] for row in table], dtype=float)
        best = np.nanmax(scores, axis=0)
        relative = np.divide(scores, best, out=np.zeros_like(scores), where=best > 0)
        ax.imshow(np.nan_to_num(relative), cmap="Greens", vmin=0, vmax=1, aspect="auto")
        for (i, j), value in np.ndenumerate(scores):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if relative[i, j] > 0.7 else "black")
        ax.set_xticks(range(len(shown)), [TASK_LABELS.get(t, t) for t in shown], rotation=45, ha="right")
        ax.set_yticks(range(len(table)), [row["model"] + (" (ACP)" if row["acp"] else "") for row in table])
        ax.set_title("LongBench (0-100; colour: share of the task's best score)", fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def longbench_table(config: dict, eval_paths: list[Path], out: Path, plot_path: Path) -> list[dict]:
    """Write out (longbench.csv), its Markdown twin (longbench.md) and the plot; returns the rows."""
    evals = _ordered(config, eval_paths)
    tasks = task_columns(evals)
    table = rows(evals)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ROW_COLUMNS + tasks)
    writer.writerows([[_cell(row[c]) for c in ROW_COLUMNS + tasks] for row in table])
    out = Path(out)
    write_atomic(out, buffer.getvalue())
    write_atomic(out.with_suffix(".md"), markdown(table, tasks))
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    plot(table, tasks, Path(plot_path))
    print(f"[fox] {out}: {len(table)} rows, {len(tasks)} tasks; plot {plot_path}")
    return table
