"""`fox plot`: the papers' figures from the evaluation JSONs, one line (or panel) per run.

    loss_by_position.png   per-token loss vs position, moving average of 101, training length marked (FoX Fig. 2)
    ppl_by_length.png      perplexity vs evaluation length (length extrapolation)
    niah.png               needle-in-a-haystack accuracy (%), length x depth, one heat map per run
    acp_pruned.png         ACP: attention pruned (%) per layer and head, one heat map per ACP run
A figure whose data no run has says so in its panel instead of being left out, so the set of files is fixed.
Shares are drawn in percent, as table1.md shows them. An ACP run is drawn dashed with markers under its solid
dense twin, so that two curves that coincide (ACP's error bound) both stay visible.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from fox.files import atomic_path  # noqa: E402

PLOTS = ("loss_by_position", "ppl_by_length", "niah", "acp_pruned")


def _colors(evals: list[dict]) -> dict[str, tuple]:
    """One colour per run, the same in every figure."""
    cmap = plt.get_cmap("tab10" if len(evals) <= 10 else "tab20")
    return {ev["run"]: cmap(i % cmap.N) for i, ev in enumerate(evals)}


SMALL_SIZES = ("tiny", "small")
"""Sizes far below the papers' 125M-760M: needle retrieval is not expected of them."""


def _style(ev: dict) -> dict:
    """Line style of a run: ACP runs (which with ACP's error bound often lie on their dense twin) wide, dashed,
    marked and drawn first; dense runs thin, solid and on top."""
    if ev.get("acp"):
        return {"linestyle": (0, (5, 3)), "linewidth": 2.4, "marker": "o", "markersize": 4, "markevery": 0.1,
                "markerfacecolor": "none", "zorder": 2}
    return {"linestyle": "-", "linewidth": 1.3, "zorder": 3}


def _readable_log_axis(axis, values) -> None:
    """Plain-number ticks on a log axis: 1-2-5 steps over several decades, about six evenly chosen values
    within one decade (where log ticks would show nothing but 10^k)."""
    values = [v for v in values if v and v > 0 and np.isfinite(v)]
    if not values:
        return
    narrow = max(values) / min(values) < 10
    axis.set_major_locator(ticker.MaxNLocator(nbins=6) if narrow else ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _mark_train_ctx(ax, evals: list[dict]) -> None:
    for ctx in sorted({ev["train_ctx"] for ev in evals if ev.get("train_ctx")}):
        ax.axvline(ctx, color="0.3", linestyle="--", linewidth=1)
        ax.annotate(f"train length {ctx}", (ctx, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="0.3")


def _finish_lines(ax, drawn: list[dict], empty: str) -> None:
    """Training-length markers, legend and grid for the runs drawn, or a message when there are none."""
    if drawn:
        _mark_train_ctx(ax, drawn)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    else:
        _empty(ax, empty)


def moving_average(values, width: int = 101) -> np.ndarray:
    """Centred moving average over `width` positions, the window cut at both ends (the FoX paper's Figure 2
    smoothing of per-token loss)."""
    values = np.asarray(values, float)
    kernel = np.ones(width)
    return np.convolve(values, kernel, "same") / np.convolve(np.ones_like(values), kernel, "same")


def plot_loss_by_position(evals: list[dict], colors: dict) -> plt.Figure:
    """Per-token validation loss against token position, smoothed with a centred moving average of width 101,
    the training length marked: as the FoX paper's Figure 2 (left)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = [ev for ev in evals if (ev.get("loss_by_position") or {}).get("positions")]
    for ev in drawn:
        positions, loss = ev["loss_by_position"]["positions"], ev["loss_by_position"]["loss"]
        ax.plot(positions, moving_average(loss), label=ev["run"], color=colors[ev["run"]], **_style(ev))
    _finish_lines(ax, drawn, "no run has per-position losses")
    ax.set(title="Per-token validation loss by position (centred moving average, width 101)",
           xlabel="token position", ylabel="loss (nats/token)")
    return fig


def plot_ppl_by_length(evals: list[dict], colors: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = [ev for ev in evals if (ev.get("ppl_by_length") or {}).get("lengths")]
    for ev in drawn:
        ax.plot(ev["ppl_by_length"]["lengths"], ev["ppl_by_length"]["ppl"], label=ev["run"], color=colors[ev["run"]],
                **(_style(ev) | {"marker": "o", "markevery": 1}))
    if drawn:
        lengths = sorted({n for ev in drawn for n in ev["ppl_by_length"]["lengths"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_yscale("log")
        _readable_log_axis(ax.yaxis, [p for ev in drawn for p in ev["ppl_by_length"]["ppl"]])
    _finish_lines(ax, drawn, "no run has perplexity by length")
    ax.set(title="Validation perplexity vs evaluation length", xlabel="evaluation length (tokens)",
           ylabel="perplexity")
    return fig


def _heat_maps(items: list[tuple[str, np.ndarray, dict]], title: str, empty: str, cbar: str) -> plt.Figure:
    """One annotated heat map of percentages per (panel title, matrix of fractions, axis labels) in a grid of
    panels."""
    if not items:
        fig, ax = plt.subplots(figsize=(6, 4))
        _empty(ax, empty)
        ax.set_title(title)
        return fig
    cols = min(3, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax, (name, matrix, labels) in zip(axes.flat, items, strict=False):
        percent = 100 * matrix
        image = ax.imshow(percent, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="lower")
        ax.set_title(name, fontsize=9)
        ax.set(xlabel=labels["x"], ylabel=labels["y"])
        ax.set_xticks(range(matrix.shape[1]), labels.get("xticks", range(matrix.shape[1])), fontsize=7)
        ax.set_yticks(range(matrix.shape[0]), labels.get("yticks", range(matrix.shape[0])), fontsize=7)
        if matrix.size <= 120:
            for (i, j), value in np.ndenumerate(percent):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if value < 50 else "black")
        fig.colorbar(image, ax=ax, label=cbar, fraction=0.046)
    for ax in list(axes.flat)[len(items):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def plot_niah(evals: list[dict]) -> plt.Figure:
    items = []
    for ev in evals:
        niah = ev.get("niah") or {}
        if niah.get("acc"):
            matrix = np.asarray(niah["acc"], float)  # (lengths, depths) -> depths on the y axis
            mean = niah.get("mean_acc", float(np.nanmean(matrix)))
            title = f"{ev['run']} (mean {100 * mean:.0f}%)"
            if not matrix.any() and (ev.get("grid") or {}).get("size") in SMALL_SIZES:
                title += "\nall 0%: expected at this size (the papers: 760M)"
            items.append((title, matrix.T, {"x": "context length", "y": "needle depth", "xticks": niah["lengths"],
                                            "yticks": [f"{d:g}" for d in niah["depths"]]}))
    return _heat_maps(items, "Needle in a haystack: exact-match accuracy", "no run has NIAH results",
                      "accuracy (%)")


def plot_acp_pruned(evals: list[dict]) -> plt.Figure:
    items = []
    for ev in evals:
        stats = ev.get("acp_stats") or {}
        if stats.get("per_layer_head"):
            matrix = np.asarray(stats["per_layer_head"], float)  # (layers, heads)
            overall = stats.get("pruned_fraction", float(matrix.mean()))
            items.append((f"{ev['run']} (overall {100 * overall:.1f}%)", matrix, {"x": "head", "y": "layer"}))
    return _heat_maps(items, "ACP: attention pruned per layer and head", "no ACP run in this grid",
                      "pruned (%)")


def plot(config: dict, eval_paths: list[Path], out_dir: Path) -> list[Path]:
    """Write the four PNGs into out_dir (atomically) and attach them to every run's MLflow run."""
    from fox.config import resolve_run, run_ids
    from fox.report.table import _order, read_evals
    from fox.tracking import log_plots

    evals = _order(config, read_evals(eval_paths))
    colors = _colors(evals)
    figures = {"loss_by_position": plot_loss_by_position(evals, colors),
               "ppl_by_length": plot_ppl_by_length(evals, colors),
               "niah": plot_niah(evals), "acp_pruned": plot_acp_pruned(evals)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        paths.append(path)
    grid = set(run_ids(config))
    log_plots([resolve_run(config, ev["run"]) for ev in evals if ev["run"] in grid],
              {ev["run"]: ev for ev in evals}, paths)
    print(f"[fox] {out_dir}: {', '.join(p.name for p in paths)}")
    return paths
