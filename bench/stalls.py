"""Where the attention kernels' cycles go, from Nsight Compute's hardware counters: per kernel of one fwd+bwd,
the issue rate, how busy each pipe is (tensor, MUFU exp2 "xu", FMA, ALU), the stall reasons per issued
instruction, and the SASS lines with the most stall samples.

    python bench/stalls.py [--shape 1x16384x24x64] [--gate sharp] [--acp [eps|nothing]] [--forward-only] [--out FILE]
    python bench/stalls.py --from-csv RAW.csv [SOURCE_<kernel>.csv ...]      # summarise exported reports

Timing says how long a kernel takes; this says what holds it back. A kernel whose tensor and xu pipes are each
~40% busy overlaps them poorly (the 2026-12-02 record, docs/PERFORMANCE.md). A line stalled on
"long_scoreboard" waits for a global load. Needs Nsight Compute's `ncu`. The GPU clocks are left as they run
(--clock-control none). Writes JSON (bench/results/stalls_<date>.json by default) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PIPES = {"tensor": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
         "xu": "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
         "fma": "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
         "alu": "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active"}
"""Busy share (% of peak, while the SM is active) of the pipes an attention tile loads: wgmma, exp2, FMA/ALU."""
ISSUE = "sm__inst_executed.avg.per_cycle_active"
"""Instructions issued per active cycle per SM (four schedulers: at most 4)."""
DURATION = "gpu__time_duration.sum"
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3, "nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0,
         "second": 1e3}
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
SECTIONS = ["SpeedOfLight", "ComputeWorkloadAnalysis", "WarpStateStats", "SourceCounters"]
WARM_STEPS = 2
KERNELS = {False: ("regex:_attn_", 3), True: ("regex:_attn_fwd", 1)}
"""ncu's kernel filter and the matching launches of one fwd+bwd, all kernels or the forward only (the Gluon
kernels and the portable ones: forward, dq and dk/dv, or forward, delta and the fused backward)."""


def _number(text: str) -> float:
    return float(text.replace(",", "") or 0)


def _to_ms(unit: str) -> float:
    if unit not in TO_MS:
        raise ValueError(f"ncu reported {DURATION} in {unit!r}; this reader knows {sorted(TO_MS)}")
    return TO_MS[unit]


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """'1x16384x24x64' -> (B, T, H, D)."""
    parts = text.split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--shape {text!r}: want BxTxHxD, four positive integers")
    return tuple(int(p) for p in parts)


def parse_raw(text: str) -> dict[str, dict]:
    """`ncu --page raw --csv` (header row, units row, one row per kernel) -> per kernel name: duration, issue
    and pipe shares, stall reasons (warps stalled per issued instruction, largest first)."""
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0]
    column = {name: i for i, name in enumerate(header)}
    kernels = {}
    for row in rows[2:]:
        if len(row) != len(header):
            continue
        stalls = {name[len(STALL_PREFIX):-len(STALL_SUFFIX)]: _number(row[i]) for name, i in column.items()
                  if name.startswith(STALL_PREFIX) and name.endswith(STALL_SUFFIX)}
        kernels[row[column["Kernel Name"]]] = {
            "duration_ms": _number(row[column[DURATION]]) * _to_ms(rows[1][column[DURATION]]),
            "issued_ipc": _number(row[column[ISSUE]]) if ISSUE in column else None,
            "pipes_pct": {pipe: _number(row[column[metric]]) for pipe, metric in PIPES.items() if metric in column},
            "stalls": dict(sorted(stalls.items(), key=lambda item: -item[1])),
        }
    return kernels


def parse_source(text: str, top: int = 12) -> list[dict]:
    """`ncu --page source --csv --print-source sass` for one kernel -> its `top` SASS lines by stall samples:
    the instruction, its share of all samples and the reasons (at least a tenth each) that make up its own."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), None)
    if start is None:
        raise ValueError("not an ncu source page: no \"Address\" header row (export it with --page source --csv "
                         "--print-source sass)")
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    samples = "Warp Stall Sampling (All Samples)"
    total = sum(_number(row[samples]) for row in rows) or 1.0
    reasons = [name for name in rows[0] if name.startswith("stall_") and "Not Issued" not in name]
    hot = []
    for row in sorted(rows, key=lambda row: -_number(row[samples]))[:top]:
        own = _number(row[samples]) or 1.0
        mix = {name[len("stall_"):]: round(_number(row[name]) / own, 2) for name in reasons
               if _number(row[name]) >= 0.1 * own}
        other = 1 - sum(_number(row[name]) for name in reasons) / own    # reasons the source view has no column
        if other >= 0.1:                                                  # for (waiting on a wgmma: "gmma")
            mix["other"] = round(other, 2)
        hot.append({"sass": row["Source"].strip(), "share": round(_number(row[samples]) / total, 4),
                    "reasons": dict(sorted(mix.items(), key=lambda item: -item[1]))})
    return hot


def step(shape: str, gate: str, acp: str | None, forward_only: bool = False) -> None:
    """The profiled program: WARM_STEPS fwd+bwd (or forwards) to compile and warm up, then the one ncu records.
    acp: None (dense), "eps" (ACP's eps threshold) or "nothing" (ACP with a threshold that prunes nothing)."""
    import math

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from attention import acp_threshold, make_inputs
    from fox_kernels import forgetting_attention

    batch, time, heads, dim = parse_shape(shape)
    q, k, v, log_f, do = make_inputs(batch, time, heads, dim, gate, seed=1)
    kwargs = {}
    if acp is not None:
        threshold = acp_threshold(batch, time, heads, dim)
        kwargs["acp_threshold"] = threshold if acp == "eps" else torch.full_like(threshold, -math.inf)
    for _ in range(WARM_STEPS + 1):
        if forward_only:
            with torch.no_grad():
                forgetting_attention(q, k, v, log_f, **kwargs)
        else:
            for x in (q, k, v, log_f):
                x.grad = None
            forgetting_attention(q, k, v, log_f, **kwargs).backward(do)
    torch.cuda.synchronize()


def profile(shape: str, gate: str, acp: str | None, ncu: str, forward_only: bool = False) -> dict[str, dict]:
    """Run `step` under ncu (the last step's attention kernels, KERNELS: all or the forward) and summarise the
    report's raw and source pages."""
    pattern, per_step = KERNELS[forward_only]
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "stalls")
        command = [ncu, "--clock-control", "none", "-k", pattern, "--launch-skip", str(per_step * WARM_STEPS),
                   "--launch-count", str(per_step), *(f"--section={s}" for s in SECTIONS),
                   "--metrics", ",".join([ISSUE, *PIPES.values()]), "-o", report,
                   sys.executable, __file__, "--step", "--shape", shape, "--gate", gate,
                   *(["--acp", acp] if acp else []), *(["--forward-only"] * forward_only)]
        subprocess.run(command, check=True)
        export = [ncu, "--import", report + ".ncu-rep"]
        raw = subprocess.run([*export, "--page", "raw", "--csv"], capture_output=True, text=True, check=True).stdout
        kernels = parse_raw(raw)
        for name, kernel in kernels.items():
            source = subprocess.run([*export, "-k", name, "--page", "source", "--csv", "--print-source", "sass"],
                                    capture_output=True, text=True, check=True).stdout
            kernel["hot_lines"] = parse_source(source)
    return kernels


def summarise(raw: str, sources: dict[str, str]) -> dict[str, dict]:
    """parse_raw's kernels, each with parse_source's hot lines from sources {kernel name: source page}."""
    kernels = parse_raw(raw)
    unknown = sorted(set(sources) - set(kernels))
    if unknown:
        raise ValueError(f"source pages for {unknown}, which the raw page does not list (it has {sorted(kernels)});"
                         " name them source_<kernel>.csv")
    for name, text in sources.items():
        kernels[name]["hot_lines"] = parse_source(text)
    return kernels


def print_table(kernels: dict[str, dict]) -> None:
    def cell(value, digits=0):
        return "-" if value is None else f"{value:.{digits}f}"

    print("\n| kernel | ms | issued IPC (of 4) | tensor % | xu % | fma % | top stalls (warps per issue) |")
    print("|---|---|---|---|---|---|---|")
    for name, k in kernels.items():
        pipes = [cell(k["pipes_pct"].get(pipe)) for pipe in ("tensor", "xu", "fma")]
        stalls = ", ".join(f"{reason} {value:.2f}" for reason, value in list(k["stalls"].items())[:4])
        print(f"| {name} | {k['duration_ms']:.3f} | {cell(k['issued_ipc'], 2)} | {' | '.join(pipes)} | {stalls} |")
    for name, k in kernels.items():
        for line in k.get("hot_lines", [])[:5]:
            print(f"  {name}: {100 * line['share']:5.2f}% {line['sass'][:60]:60s} {line['reasons']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1x16384x24x64", help="BxTxHxD (T and H as in bench/attention.py)")
    parser.add_argument("--gate", default="sharp", choices=["sharp", "mild"])
    parser.add_argument("--acp", nargs="?", const="eps", choices=["eps", "nothing"], default=None,
                        help="with ACP: its eps threshold (eps, the default), or one that prunes nothing")
    parser.add_argument("--forward-only", action="store_true", help="profile the forward kernel alone")
    parser.add_argument("--from-csv", nargs="+", metavar="CSV",
                        help="summarise exported CSVs (raw first, then source_<kernel>.csv) instead of profiling")
    parser.add_argument("--step", action="store_true", help=argparse.SUPPRESS)       # the program ncu runs
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/stalls_<date>.json)")
    args = parser.parse_args()
    parse_shape(args.shape)
    if args.step:
        step(args.shape, args.gate, args.acp, args.forward_only)
        return
    if args.from_csv:
        raw, *source_files = (Path(p) for p in args.from_csv)
        sources = {p.stem.removeprefix("source_"): p.read_text() for p in source_files}
        try:
            kernels = summarise(raw.read_text(), sources)
        except ValueError as error:
            raise SystemExit(f"--from-csv: {error}") from error
        env = {"from": [str(p) for p in args.from_csv]}
    else:
        ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
        if not Path(ncu).exists():
            raise SystemExit("bench/stalls.py needs Nsight Compute's ncu on PATH (or /usr/local/cuda/bin/ncu)")
        from attention import environment

        env = {**environment(), "shape": args.shape, "gate": args.gate, "acp": args.acp,
               "forward_only": args.forward_only}
        kernels = profile(args.shape, args.gate, args.acp, ncu, args.forward_only)
    date = env.get("date", datetime.date.today().isoformat())
    from provenance import record_path, write_record

    out = record_path("stalls", args.out, date)
    write_record(out, {"env": env, "kernels": kernels})
    print_table(kernels)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
