"""`fox table`: results/table1.csv (Table 1 of both papers, one row per trained model) and its Markdown view.

A cell with no measurement stays empty; nothing is filled in or estimated.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fox.config import run_ids
from fox.files import read_json, write_atomic
from fox.model.config import variant_label

GRID_COLUMNS = ["run", "model", "block", "size", "params", "tokens", "train_ctx", "acp"]
"""run first: the id that names the run's folder, its MLflow run and its evaluation JSON."""
PAPER_TASKS = {  # table column -> (lm-eval task, metric), in the papers' order
    "wikitext_word_ppl": ("wikitext", "word_perplexity"),
    "lambada_ppl": ("lambada_openai", "perplexity"),
    "lambada_acc": ("lambada_openai", "acc"),
    "piqa_acc": ("piqa", "acc"),
    "hellaswag_acc_norm": ("hellaswag", "acc_norm"),
    "winogrande_acc": ("winogrande", "acc"),
    "arc_easy_acc": ("arc_easy", "acc"),
    "arc_challenge_acc_norm": ("arc_challenge", "acc_norm"),
    "copa_acc": ("copa", "acc"),
    "openbookqa_acc_norm": ("openbookqa", "acc_norm"),
    "sciq_acc": ("sciq", "acc"),
    "boolq_acc": ("boolq", "acc"),
}
OUR_COLUMNS = ["val_loss", "val_ppl_at_train_ctx", "val_ppl_at_4x_ctx", "niah_acc", "attn_flops_pruned",
               "train_tokens_per_s", "mfu"]
ACCURACY_METRICS = ("acc", "acc_norm")


def read_evals(paths: list[Path]) -> list[dict]:
    return [read_json(path) for path in paths]


def _metrics(lm_eval: dict | None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}}, with lm-eval's filter suffix (",none") and stderr entries dropped."""
    clean = {}
    for task, metrics in (lm_eval or {}).items():
        clean[task] = {name.split(",")[0]: value for name, value in metrics.items()
                       if "_stderr" not in name and isinstance(value, int | float)
                       and not isinstance(value, bool)}
    return clean


def _param_count(params) -> int | None:
    """The papers' count (non-embedding + LM head) where the evaluation gives several."""
    if isinstance(params, dict):
        return params.get("paper", params.get("total"))
    return params


def _other_task_columns(evals: list[dict]) -> list[tuple[str, str]]:
    paper = {(task, metric) for task, metric in PAPER_TASKS.values()}
    paper_tasks = {task for task, _ in paper}
    found = {(task, metric) for ev in evals for task, metrics in _metrics(ev.get("lm_eval")).items()
             for metric in metrics if task not in paper_tasks}
    return sorted(found)


def columns(evals: list[dict]) -> list[str]:
    """The table's columns: grid (with `variant`, the paper's row name, when a run is a Table 3 variant), the
    papers' tasks and avg_acc, other tasks' <task>_<metric>, ours."""
    others = [f"{task}_{metric}" for task, metric in _other_task_columns(evals)]
    grid = GRID_COLUMNS
    if any(ev.get("grid", {}).get("variant") for ev in evals):
        after_block = GRID_COLUMNS.index("block") + 1
        grid = GRID_COLUMNS[:after_block] + ["variant"] + GRID_COLUMNS[after_block:]
    return grid + list(PAPER_TASKS) + ["avg_acc"] + others + OUR_COLUMNS


def row(ev: dict, other_tasks: list[tuple[str, str]]) -> dict:
    """One table row; None where nothing was measured."""
    grid, metrics = ev.get("grid", {}), _metrics(ev.get("lm_eval"))
    out = {"run": ev.get("run"), "model": grid.get("model"), "block": grid.get("block"),
           "variant": variant_label(grid["model"], grid["block"], grid.get("variant", "")) if grid else None,
           "size": grid.get("size"),
           "params": _param_count(ev.get("params")), "tokens": ev.get("tokens"),
           "train_ctx": ev.get("train_ctx", grid.get("context")), "acp": ev.get("acp", grid.get("acp"))}
    for column, (task, metric) in PAPER_TASKS.items():
        out[column] = metrics.get(task, {}).get(metric)
    accuracies = [out[c] for c, (_, metric) in PAPER_TASKS.items() if metric in ACCURACY_METRICS]
    for task, metric in other_tasks:
        out[f"{task}_{metric}"] = metrics.get(task, {}).get(metric)
    # one accuracy per other task: acc where the task reports it (the local tasks' measure), else acc_norm
    for task in sorted({task for task, _ in other_tasks}):
        task_metrics = metrics.get(task, {})
        accuracies.append(task_metrics.get("acc", task_metrics.get("acc_norm")))
    measured = [a for a in accuracies if a is not None]
    out["avg_acc"] = sum(measured) / len(measured) if measured else None
    acp_stats = ev.get("acp_stats") or {}
    out.update({"val_loss": ev.get("val_loss"), "val_ppl_at_train_ctx": ev.get("val_ppl_at_train_ctx"),
                "val_ppl_at_4x_ctx": ev.get("val_ppl_at_4x_ctx"),
                "niah_acc": (ev.get("niah") or {}).get("mean_acc"),
                "attn_flops_pruned": acp_stats.get("pruned_fraction"),
                "train_tokens_per_s": ev.get("train_tokens_per_s"), "mfu": ev.get("mfu")})
    return out


def _order(config: dict, evals: list[dict]) -> list[dict]:
    """Rows in the config's grid order; runs the config does not name follow in input order."""
    rank = {run: i for i, run in enumerate(run_ids(config))}
    return sorted(evals, key=lambda ev: rank.get(ev.get("run"), len(rank)))


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def _md_value(column: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return _csv_value(value)  # true/false, as in the config, the CSV and MLflow
    if column.endswith(("_acc", "_acc_norm")) or column in ("niah_acc", "attn_flops_pruned", "mfu"):
        return f"{100 * value:.1f}"
    if column == "params":
        return _si(value)
    if column == "tokens":
        return f"{value / 2**30:.3g}B" if value >= 2**30 else f"{value / 2**20:.3g}M"
    if isinstance(value, float):
        if abs(value) >= 1e5:
            return f"{value:.3g}"
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def _si(count: int) -> str:
    """A count to four significant digits: 148100 -> 148.1K, 759214080 -> 759.2M."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= factor:
            return f"{count / factor:.4g}{suffix}"
    return str(count)


def markdown(rows: list[dict], names: list[str]) -> str:
    """Table 1 as Markdown; columns empty in every row are left out (the CSV keeps them)."""
    shown = [c for c in names if any(r[c] is not None for r in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_md_value(c, r[c]) for c in shown) + " |" for r in rows]
    hidden = [c for c in names if c not in shown]
    note = ("Accuracies, NIAH, pruned attention FLOPs and MFU in % (fractions in table1.csv); params: the papers' "
            "count (non-embedding + LM head); ppl = perplexity (lower is better).")
    if hidden:
        note += f" Not measured in this grid: {', '.join(hidden)}."
    return "\n".join(lines) + "\n\n" + note + "\n"


def table(config: dict, eval_paths: list[Path], out: Path) -> list[dict]:
    """Write out (table1.csv) and its Markdown twin (table1.md) from the evaluation JSONs; returns rows."""
    evals = _order(config, read_evals(eval_paths))
    names, other_tasks = columns(evals), _other_task_columns(evals)
    rows = [row(ev, other_tasks) for ev in evals]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    writer.writerows([[_csv_value(r[c]) for c in names] for r in rows])
    out = Path(out)
    write_atomic(out, buffer.getvalue())
    write_atomic(out.with_suffix(".md"), markdown(rows, names))
    print(f"[fox] {out}: {len(rows)} rows, {len(names)} columns")
    return rows
