"""Where ACP's time over the ideal goes, stage by stage: the gate cumsum, the pruning map, the forward kernel and the
backward kernels, each timed on its own inputs, dense and with ACP maps (sharp gates' and nothing pruned), and the
forward also on launch.GLUON_FWD_SHORT's tile (not the split forward; at D=128 persistent); all the calls alternate one
by one (bench/attention.py's alternate: shuffled rounds, L2 flushed before each call, medians). Prints a table, writes
bench/results/acp_overhead_*.json.

    python bench/acp_overhead.py [--shapes 8x8192x16x128 ...] [--kernels] [--fit] [--out FILE]

"ideal" = the dense stage's time x (1 - pruned); "x dense" = the stage's time / the dense stage's.
--kernels also splits each forward and backward into its GPU kernels (torch.profiler, the kernels' own durations
averaged over a few calls, back to back): which kernel of the backward (dq, dk/dv, the gate's sums) is
over its ideal.
--fit also times the forward and the backward at thresholds that keep from all tiles to few and fits each stage's
time to a + b x kept (kept: the fraction of tiles visited): a is the part of the time that no pruning removes (each
query or key tile's fixed cost: its start, its last tile, its stores; per call: launches), and ACP's time over its
ideal is then (a + b x kept) / ((a + b) x kept) where a is not zero.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import acp_threshold, alternate, environment, make_inputs, shape_arg  # noqa: E402
from fox_kernels import launch  # noqa: E402
from provenance import record_path, write_record  # noqa: E402


class ShapeInputs:
    """One shape's inputs with sharp gates (seed 1), their gate cumsum c and the eps threshold."""

    def __init__(self, shape: str):
        self.batch, self.time, self.heads, self.dim = (int(x) for x in shape.split("x"))
        self.q, self.k, self.v, self.log_f, self.do = (
            x.detach() for x in make_inputs(self.batch, self.time, self.heads, self.dim, "sharp", seed=1))
        self.scale = 1 / math.sqrt(self.dim)
        self.c = launch.gate_cumsum(self.log_f)
        self.threshold = acp_threshold(self.batch, self.time, self.heads, self.dim)

    def kept(self, acp) -> float:
        """The fraction of causal tiles that acp's map visits."""
        visited, total = launch.tile_stats(acp.kept, self.time, self.time, self.heads)
        return (visited.sum() / total.sum()).item()

    def forward(self, acp, config=None):
        return launch.attention_forward(self.q, self.k, self.v, self.c, self.scale, acp, config=config)

    def backward_call(self, acp):
        """The backward on acp's forward outputs, as a call."""
        o, lse = self.forward(acp)
        return lambda: launch.attention_backward(self.do, self.q, self.k, self.v, o, lse, self.c, self.scale, acp)


def stage_calls(x: ShapeInputs) -> tuple[dict, float]:
    """{name: call} of every stage and map, and the fraction of tiles that sharp gates' map prunes."""
    maps = {"dense": None, "acp_none": launch.acp_map(x.c, torch.full_like(x.threshold, -math.inf), x.time),
            "acp_sharp": launch.acp_map(x.c, x.threshold, x.time)}
    short_tile = launch.GLUON_FWD_SHORT[x.dim]
    calls = {"cumsum": lambda: launch.gate_cumsum(x.log_f),
             "map": lambda: launch.acp_map(x.c, x.threshold, x.time)}
    for name, acp in maps.items():
        calls[f"fwd {name}"] = partial(x.forward, acp)
        calls[f"fwd {name} short-tile"] = partial(x.forward, acp, short_tile)
        calls[f"bwd {name}"] = x.backward_call(acp)
    return calls, 1 - x.kept(maps["acp_sharp"])


def measure(shape: str, calls: dict, pruned: float, seconds: float) -> list[dict]:
    times = alternate(calls, seconds)
    rows = []
    for name, ms in times.items():
        stage, _, version = name.partition(" ")
        row = {"shape": shape, "call": name, "ms": ms, "pruned": pruned}
        if version:
            dense = times[f"{stage} dense" + (" short-tile" if version.endswith("short-tile") else "")]
            row["x_dense"] = ms / dense
            if version.startswith("acp_sharp"):
                row["x_ideal"] = ms / (dense * (1 - pruned))
        rows.append(row)
    return rows


FIT_SCALES = (None, 4.0, 2.0, 1.5, 1.0, 0.7, 0.45, 0.3)
"""--fit's thresholds: acp_threshold's scaled by these (None: -inf, nothing pruned); nearer 0 prunes more."""


def fit_rows(shape: str, x: ShapeInputs, seconds: float) -> list[dict]:
    """Forward and backward times at FIT_SCALES' thresholds (sharp gates), and per stage the least-squares line
    time = a + b x kept through them."""
    calls, kept = {}, {}
    for factor in FIT_SCALES:
        threshold = torch.full_like(x.threshold, -math.inf) if factor is None else x.threshold * factor
        acp = launch.acp_map(x.c, threshold, x.time)
        name = "none" if factor is None else f"x{factor:g}"
        kept[name] = x.kept(acp)
        calls[f"fwd {name}"] = partial(x.forward, acp)
        calls[f"bwd {name}"] = x.backward_call(acp)
    times = alternate(calls, seconds)
    rows = [{"shape": shape, "call": f"{name} kept {kept[name.split()[1]]:.3f}", "ms": ms,
             "kept": kept[name.split()[1]]} for name, ms in times.items()]
    for stage in ("fwd", "bwd"):
        points = [(kept[name.split()[1]], ms) for name, ms in times.items() if name.startswith(stage)]
        xs = torch.tensor([x for x, _ in points], dtype=torch.float64)
        ys = torch.tensor([y for _, y in points], dtype=torch.float64)
        slope = (((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()).item()
        fixed = ys.mean().item() - slope * xs.mean().item()
        worst = max(abs(y - fixed - slope * x) / y for x, y in points)
        rows.append({"shape": shape, "call": f"{stage} fit: fixed {fixed:.3f} ms + {slope:.3f} ms x kept "
                     f"(fixed / dense {fixed / (fixed + slope):.3f}, worst residual {worst:.1%})", "ms": fixed,
                     "fixed_ms": fixed, "per_kept_ms": slope, "worst_residual": worst})
    return rows


def kernel_rows(shape: str, calls: dict, pruned: float, repeats: int = 10) -> list[dict]:
    """Each fwd/bwd call's GPU kernels: mean device ms per call, and x dense / x ideal against the dense call's kernel
    of the same name."""
    from torch.profiler import ProfilerActivity, profile

    per_call = {}
    for name, fn in calls.items():
        if name.split(" ")[0] not in ("fwd", "bwd"):
            continue
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize()
        per_call[name] = {event.key: _device_ms(event) / repeats for event in prof.key_averages()
                          if _device_ms(event) > 0}
    rows = []
    for name, kernels in per_call.items():
        stage, _, version = name.partition(" ")
        dense = per_call[f"{stage} dense" + (" short-tile" if version.endswith("short-tile") else "")]
        for kernel, ms in sorted(kernels.items(), key=lambda item: -item[1]):
            row = {"shape": shape, "call": f"{name}: {kernel[:60]}", "ms": ms, "pruned": pruned}
            if kernel in dense and version != "dense":
                row["x_dense"] = ms / dense[kernel]
                if version.startswith("acp_sharp"):
                    row["x_ideal"] = ms / (dense[kernel] * (1 - pruned))
            rows.append(row)
    return rows


def _device_ms(event) -> float:
    """An averaged profiler event's total device time in ms (device_time_total, cuda_time_total before torch 2.4)."""
    return getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)) / 1e3


def print_rows(rows: list[dict]) -> None:
    print("| shape | call | ms | x dense | x ideal |\n|---|---|---|---|---|")
    for row in rows:
        x_dense = f"{row['x_dense']:.3f}" if "x_dense" in row else ""
        x_ideal = f"{row['x_ideal']:.3f}" if "x_ideal" in row else ""
        print(f"| {row['shape']} | {row['call']} | {row['ms']:.3f} | {x_dense} | {x_ideal} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8x8192x16x128"], type=shape_arg)
    parser.add_argument("--seconds", type=float, default=12.0, help="timing per shape, all calls together")
    parser.add_argument("--kernels", action="store_true", help="also each call's GPU kernels (torch.profiler)")
    parser.add_argument("--fit", action="store_true", help="also time against the fraction kept (module docstring)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/acp_overhead_<date>.json)")
    args = parser.parse_args()
    env = environment()
    out = record_path("acp_overhead", args.out, env["date"])
    rows = []
    for shape in args.shapes:
        inputs = ShapeInputs(shape)
        calls, pruned = stage_calls(inputs)
        shape_rows = measure(shape, calls, pruned, args.seconds)
        shape_rows += kernel_rows(shape, calls, pruned) if args.kernels else []
        shape_rows += fit_rows(shape, inputs, args.seconds) if args.fit else []
        print_rows(shape_rows)
        rows += shape_rows
        write_record(out, {"env": env, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
