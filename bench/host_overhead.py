"""Host time against GPU time per call: fox's forward and forward+backward, dense and with ACP (sharp gates, the
eps threshold), beside SDPA's cuDNN backend.

bench/attention.py times each call from an event before it to one after it, with only the L2 flush queued ahead,
so a call whose Python work (launches, allocations, descriptors) outlasts that flush is timed with the GPU idle
while the host prepares it. The fixed cost this adds does not shrink with the shape, and weighs most on short
calls (16x4096x12x64's forward: ~1.2 ms) and on ACP's, whose ratio to its ideal it raises. Per candidate this
prints and writes (JSON, bench/results/):
- call ms: attention.py's time (alternate: L2 flushed, events around the call);
- gpu ms: events around the same call queued behind a sleep kernel long enough for the host to enqueue all of it,
  so the events see only the GPU's work;
- host ms: the host's time in the call (perf_counter, the GPU kept busy by that sleep, so launches never wait).

    python bench/host_overhead.py [--shapes 16x4096x12x64 4x16384x24x64] [--out FILE]
    python bench/host_overhead.py --python-profile 50 --shapes 16x4096x12x64   # where fox's host time goes
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (  # noqa: E402
    acp_threshold,
    alternate,
    environment,
    forward_backward,
    make_inputs,
    sdpa_fn,
    shape_arg,
)
from fox_kernels import forgetting_attention  # noqa: E402
from provenance import record_path, write_record  # noqa: E402

SLEEP_CYCLES = 20_000_000
"""The sleep ahead of each call for gpu ms and host ms: about 10 ms at the H200's clocks, longer than any
candidate's host time."""


def queued_behind_sleep(fn, rounds: int) -> tuple[float, float]:
    """(gpu ms, host ms) medians of fn called behind a sleep kernel, L2 flushed before the sleep."""
    driver = triton.runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    gpu, host = [], []
    for _ in range(rounds):
        driver.clear_cache(cache)
        torch.cuda._sleep(SLEEP_CYCLES)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        began = time.perf_counter()
        fn()
        host.append((time.perf_counter() - began) * 1e3)
        stop.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(stop))
    return statistics.median(gpu), statistics.median(host)


def shape_calls(shape: str) -> dict:
    """{(impl, pass): call} of fox (dense and with ACP) and SDPA's cuDNN backend, forward and forward+backward, on
    one shape's inputs (sharp gates; SDPA in its own (B, H, T, D) layout)."""
    batch, length, heads, dim = (int(x) for x in shape.split("x"))
    q, k, v, log_f, do = make_inputs(batch, length, heads, dim, "sharp")
    fox = partial(forgetting_attention, q, k, v, log_f)
    fox_acp = partial(forgetting_attention, q, k, v, log_f, acp_threshold=acp_threshold(batch, length, heads, dim))
    q_t, k_t, v_t, do_t = (x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)
                           for x in (q, k, v, do))
    cudnn = sdpa_fn(q_t, k_t, v_t, "CUDNN_ATTENTION")
    return {("fox", "fwd"): fox, ("fox", "fwd+bwd"): partial(forward_backward, fox, [q, k, v, log_f], do),
            ("fox_acp", "fwd"): fox_acp,
            ("fox_acp", "fwd+bwd"): partial(forward_backward, fox_acp, [q, k, v, log_f], do),
            ("sdpa_cudnn", "fwd"): cudnn,
            ("sdpa_cudnn", "fwd+bwd"): partial(forward_backward, cudnn, [q_t, k_t, v_t], do_t)}


def measure_shape(shape: str, rounds: int) -> list[dict]:
    calls = shape_calls(shape)
    per_call = alternate(calls, seconds=3.0)
    rows = []
    for (impl, kind), fn in calls.items():
        gpu_ms, host_ms = queued_behind_sleep(fn, rounds)
        rows.append({"shape": shape, "impl": impl, "pass": kind, "call_ms": per_call[impl, kind], "gpu_ms": gpu_ms,
                     "host_ms": host_ms})
        print(f"  {shape:>15} {impl:<11} {kind:<8} call {per_call[impl, kind]:8.3f} ms  gpu {gpu_ms:8.3f} ms  "
              f"host {host_ms:7.3f} ms", flush=True)
    return rows


def profile_host(shape: str, calls: int) -> None:
    """Print the Python functions fox's forward and forward+backward, dense and with ACP, spend their host time in
    (cProfile over `calls` calls, each queued behind a sleep kernel so that no launch waits for the GPU)."""
    fox_calls = {(impl, kind): fn for (impl, kind), fn in shape_calls(shape).items() if impl.startswith("fox")}
    for (impl, kind), fn in fox_calls.items():
        fn()
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        for _ in range(calls):
            torch.cuda._sleep(SLEEP_CYCLES)
            profiler.runcall(fn)
            torch.cuda.synchronize()
        print(f"== {shape} {impl} {kind}: host time by function over {calls} calls", flush=True)
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["16x4096x12x64", "4x16384x24x64", "8x8192x16x128"],
                        type=shape_arg)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser.add_argument("--python-profile", type=int, default=0, metavar="CALLS",
                        help="instead, print where fox's host time goes (cProfile over CALLS calls)")
    args = parser.parse_args()
    if args.python_profile:
        for shape in args.shapes:
            profile_host(shape, args.python_profile)
        return
    env = environment()
    print(json.dumps(env), flush=True)
    out = record_path("host_overhead", args.out, env["date"])
    rows = []
    for shape in args.shapes:
        rows += measure_shape(shape, args.rounds)
        write_record(out, {"env": env, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
