"""Causal attention fwd+bwd benchmark: fox's Forgetting Attention kernels (dense and ACP) side by side with
PyTorch SDPA FlashAttention-2 (no gate: the ceiling), FlexAttention with a FoX score_mod (ACP as a block mask)
and fla's parallel_forgetting_attn when installed. One run prints a table and writes bench/results/*.json.

    python bench/attention.py [--shapes 4x16384x24x64 ...] [--gates sharp mild] [--no-others] [--repeats 3]
                              [--out FILE]
    python bench/attention.py --sweep [fwd dkdv dq]     block configurations per kernel
    python bench/attention.py --sweep --acp             the same with ACP maps (sharp, mild, threshold -inf)
    python bench/attention.py --sweep dq --acp --configs 64x64x4x2   only these configurations
    python bench/attention.py --profile                 per-kernel device time, dense and ACP
    python bench/attention.py --variants portable tma tma_ws [--check]   kernel variants (launch.VARIANTS) and
                                                        SDPA FLASH/cuDNN, all alternating call by call
    FOX_KERNELS=tma_ws python bench/attention.py --sweep ...   sweep that variant's tiles

TFLOP/s count causal FLOPs: forward 4*B*H*T*T*D/2, forward+backward 3.5x that (DESIGN.md section 2).
Inputs: q, k RMS-normalised; per-head memory length L log-uniform in the gate range, log f = -1/L;
ACP threshold -(2*sqrt(D) + ln T) - 10 (the eps bound for RMS-normalised q and k).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from fox_kernels import forgetting_attention, launch  # noqa: E402
from provenance import commit, launch_settings, record_path, write_record  # noqa: E402

SHAPES = ["4x16384x24x64", "8x8192x16x128", "16x4096x12x64", "1x65536x12x64"]
GATES = {"mild": (16.0, 16384.0), "sharp": (8.0, 512.0)}


def make_inputs(batch, time, heads, dim, gate, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(batch, time, heads, dim, generator=gen, device="cuda") for _ in range(4))
    q = q / q.pow(2).mean(-1, keepdim=True).sqrt()
    k = k / k.pow(2).mean(-1, keepdim=True).sqrt()
    lo, hi = (math.log(x) for x in GATES[gate])
    memory = (lo + (hi - lo) * torch.rand(heads, generator=gen, device="cuda")).exp()
    log_f = (-1.0 / memory).expand(batch, time, heads).contiguous()
    bf = torch.bfloat16
    return [x.to(bf).requires_grad_() for x in (q, k, v)] + [log_f.requires_grad_(), do.to(bf)]


def acp_threshold(batch, time, heads, dim):
    """(B, H) threshold -(2 sqrt(D) + ln T) - 10: the eps bound for RMS-normalised q and k."""
    return torch.full((batch, heads), -(2 * math.sqrt(dim) + math.log(time)) - 10, device="cuda")


def acp_case(batch, time, heads, dim, gate):
    """Inputs with `gate` forget gates (seed 1), the eps threshold and the fraction of tiles ACP prunes there."""
    q, k, v, log_f, do = make_inputs(batch, time, heads, dim, gate, seed=1)
    threshold = acp_threshold(batch, time, heads, dim)
    _, (visited, total) = forgetting_attention(q, k, v, log_f, acp_threshold=threshold, return_stats=True)
    return q, k, v, log_f, do, threshold, 1 - (visited.sum() / total.sum()).item()


def time_fwd_bwd(fn, inputs, do):
    """(forward ms, forward+backward ms) of one implementation (time_interleaved: how)."""
    return time_interleaved({"only": (fn, inputs)}, do, seconds=2.0)["only"]


def time_interleaved(candidates, do, seconds=6.0, seed=0):
    """(forward ms, forward+backward ms) per name of candidates {name: (fn, leaves) or (fn, leaves, do)}: medians
    over single calls that alternate between all the candidates, each once per round in a shuffled order, L2
    flushed before each. A candidate's own do is for an output of another layout (SDPA's (B, H, T, D)).

    The H100's clocks drift by several percent over seconds (its power limit): timed in 300 ms blocks of their
    own, the same dense kernels read up to 5% apart (bench/results/ab_2026-11-23_blocks_3616190.json); alternating
    call by call puts each drift on every candidate alike, and the shuffle gives none a fixed predecessor."""
    calls = {}
    for name, (fn, leaves, *own_do) in candidates.items():
        calls[name, "fwd"] = fn
        calls[name, "fwd+bwd"] = partial(forward_backward, fn, leaves, own_do[0] if own_do else do)
    times = alternate(calls, seconds, seed)
    return {name: (times[name, "fwd"], times[name, "fwd+bwd"]) for name in candidates}


def forward_backward(fn, leaves, grad):
    """One forward and backward call of fn, the leaves' gradients cleared first."""
    for x in leaves:
        x.grad = None
    fn().backward(grad)


def alternate(calls, seconds, seed=0):
    """Median ms of each of calls {key: fn} over rounds that run each once in an order shuffled by `seed` (L2 flushed
    before each call)."""
    driver = triton.runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    for fn in calls.values():                            # compile and warm up
        fn()
        fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for fn in calls.values():
        fn()
    end.record()
    torch.cuda.synchronize()
    rounds = max(10, int(seconds * 1e3 / begin.elapsed_time(end)))
    events = {key: [] for key in calls}
    shuffle = random.Random(seed).shuffle
    keys = list(calls)
    for _ in range(rounds):
        shuffle(keys)
        for key in keys:
            driver.clear_cache(cache)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[key]()
            stop.record()
            events[key].append((start, stop))
    torch.cuda.synchronize()
    return {key: statistics.median(start.elapsed_time(stop) for start, stop in pairs)
            for key, pairs in events.items()}


SDPA_BACKENDS = {"sdpa_fa2": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_default": None}


def sdpa_fn(q, k, v, backend="FLASH_ATTENTION"):
    """The ceiling in its own best layout: (B, H, T, D) contiguous leaves, no gate. FLASH_ATTENTION is
    FlashAttention-2; cuDNN and PyTorch's default choice are timed beside it for reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        if backend is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def flex_fn(q, k, v, log_f, start=None):
    """FlexAttention with score + c[q] - c[k]; the cumsum captured as two tensors (flex cannot differentiate
    one captured tensor indexed twice); ACP as a block mask from fox's start map."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, time, heads, _ = q.shape
    c = log_f.float().cumsum(1).transpose(1, 2).contiguous()
    c_q = c.detach().clone().requires_grad_()
    c_k = c.detach().clone().requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + c_q[b, h, q_idx] - c_k[b, h, kv_idx]

    if start is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        block_mask = create_block_mask(mask_mod, None, None, time, time)
    else:
        key_start = (start.view(batch, heads, -1) * 64).contiguous()

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (kv_idx >= key_start[b, h, q_idx // 64])
        block_mask = create_block_mask(mask_mod, batch, heads, time, time, _compile=True)   # not B*H*T*T
    compiled = torch.compile(flex_attention)

    def run():
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                        block_mask=block_mask).transpose(1, 2)
    return run, [c_q, c_k]


def fla_fn(q, k, v, log_f):
    from fla.ops.forgetting_attn import parallel_forgetting_attn

    return lambda: parallel_forgetting_attn(q, k, v, log_f)


def bench_shape(shape, gates, with_others=True, repeats=3):
    """Rows of fox (dense, ACP, ACP with nothing pruned) per gate and SDPA's backends, all in one alternation call
    by call (the first gate's; SDPA has no gate), `repeats` times over fresh copies of the inputs. A row's times
    are the medians over the repeats, its ratios (ACP over its ideal, fox over SDPA) the medians of each repeat's
    ratio, with their range: the same kernels read ~0.5% apart from one alternation to the next, as much as a
    bar's margin (docs/PERFORMANCE.md, session 29)."""
    batch, time, heads, dim = (int(x) for x in shape.split("x"))
    flops_fwd = 4 * batch * heads * time * time * dim / 2
    rows = []

    def add(name, gate, runs, pruned=None, ideal_ratios=None, over_sdpa=None):
        fwd_ms, both_ms = (statistics.median(run[i] for run in runs) for i in (0, 1))
        tflops = 3.5 * flops_fwd / both_ms * 1e-9
        row = {"shape": shape, "gate": gate, "impl": name, "fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms,
               "fwd_tflops": flops_fwd / fwd_ms * 1e-9, "fwd_bwd_tflops": tflops, "pruned_fraction": pruned,
               "acp_time_over_ideal": None if ideal_ratios is None else statistics.median(ideal_ratios),
               "repeats": [list(run) for run in runs]}
        note = "" if pruned is None else f"  pruned {pruned:.3f}"
        if ideal_ratios is not None:
            row["acp_time_over_ideal_range"] = [min(ideal_ratios), max(ideal_ratios)]
            over = "ideal" if pruned else "dense"
            note += f"  / {over} {row['acp_time_over_ideal']:.3f} ({min(ideal_ratios):.3f}-{max(ideal_ratios):.3f})"
        for backend, ratios in (over_sdpa or {}).items():      # {backend: [(fwd, fwd+bwd) speed ratio per repeat]}
            row[f"fwd_speed_x_{backend}"] = statistics.median(r[0] for r in ratios)
            row[f"fwd_bwd_speed_x_{backend}"] = statistics.median(r[1] for r in ratios)
            row[f"fwd_bwd_speed_x_{backend}_range"] = [min(r[1] for r in ratios), max(r[1] for r in ratios)]
        rows.append(row)
        print(f"  {shape:>15} {gate:>6} {name:<22} fwd {fwd_ms:8.3f} ms  fwd+bwd {both_ms:8.3f} ms  "
              f"{tflops:6.1f} TF/s{note}", flush=True)

    sdpa = {}
    q, k, v, _, do = make_inputs(batch, time, heads, dim, "sharp")
    q, k, v, do = (x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad) for x in (q, k, v, do))
    for name, backend in SDPA_BACKENDS.items():
        try:                                                            # a backend may not take the shape
            forward_backward(sdpa_fn(q, k, v, backend), [q, k, v], do)
            sdpa[name] = backend
        except RuntimeError as error:
            print(f"  {name} failed: {str(error)[:200]}", flush=True)
    sdpa_leaves = [q, k, v, do]
    for gate in gates:
        q, k, v, log_f, do, threshold, pruned = acp_case(batch, time, heads, dim, gate)
        fox_leaves = [q, k, v, log_f, do, threshold]
        with_sdpa = sdpa if gate == gates[0] else {}
        runs = []
        for repeat in range(repeats):
            q, k, v, log_f = (x.detach().clone().requires_grad_() for x in fox_leaves[:4])
            leaves = [q, k, v, log_f]
            do, threshold = (x.clone() for x in fox_leaves[4:])
            none = torch.full_like(threshold, float("-inf"))
            candidates = {
                "fox_dense": (partial(forgetting_attention, q, k, v, log_f), leaves),
                "fox_acp": (partial(forgetting_attention, q, k, v, log_f, acp_threshold=threshold), leaves),
                "fox_acp_nothing_pruned": (partial(forgetting_attention, q, k, v, log_f, acp_threshold=none), leaves),
            }
            if with_sdpa:                            # SDPA's copies only where it runs (the first gate)
                sq, sk, sv = (x.detach().clone().requires_grad_() for x in sdpa_leaves[:3])
                for name, backend in with_sdpa.items():
                    candidates[name] = (sdpa_fn(sq, sk, sv, backend), [sq, sk, sv], sdpa_leaves[3])
            runs.append(time_interleaved(candidates, do, seconds=2.0 * len(candidates), seed=repeat))
        for name in with_sdpa:
            add(name, "-", [run[name] for run in runs])
        speed = {name: [(run[name][0] / run["fox_dense"][0], run[name][1] / run["fox_dense"][1]) for run in runs]
                 for name in with_sdpa}
        add("fox_dense", gate, [run["fox_dense"] for run in runs], over_sdpa=speed)
        add("fox_acp", gate, [run["fox_acp"] for run in runs], pruned,
            [run["fox_acp"][1] / (run["fox_dense"][1] * (1 - pruned)) for run in runs])
        add("fox_acp_nothing_pruned", gate, [run["fox_acp_nothing_pruned"] for run in runs], 0.0,
            [run["fox_acp_nothing_pruned"][1] / run["fox_dense"][1] for run in runs])
        if not with_others or gate != gates[-1]:                         # others: one gate per shape
            continue
        leaves = [q, k, v, log_f]
        for name, start in [("flex_fox", None), ("flex_fox_acp", "acp")]:
            try:
                if start is not None:
                    c = launch.gate_cumsum(log_f.detach())
                    start = launch.acp_map(c, threshold, time).start
                fn, extra = flex_fn(q, k, v, log_f, start)
                add(name, gate, [time_fwd_bwd(fn, leaves + extra, do)], pruned if start is not None else None)
            except Exception as error:                                   # noqa: BLE001 (report, go on)
                print(f"  {name} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        try:
            add("fla", gate, [time_fwd_bwd(fla_fn(q, k, v, log_f), leaves, do)])
        except Exception as error:                                       # noqa: BLE001
            print(f"  fla failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        torch.cuda.empty_cache()
    return rows


def attend_with(variant, *args, **kwargs):
    """forgetting_attention on one kernel variant; its backward, run next, launches the same variant."""
    launch.KERNEL_VARIANT = variant
    return forgetting_attention(*args, **kwargs)


def compare_variants(shape, variants, gates, check=False):
    """fox's kernel variants, dense and ACP, alternating call by call with SDPA's FLASH_ATTENTION and cuDNN
    backends. With check: each variant's output and gradients against the first variant's first (relative
    norm of the difference, recorded; > 2e-2 is reported as a failure)."""
    batch, time, heads, dim = (int(x) for x in shape.split("x"))
    flops_fwd = 4 * batch * heads * time * time * dim / 2
    rows = []
    for gate in gates:
        q, k, v, log_f, do, threshold, pruned = acp_case(batch, time, heads, dim, gate)
        leaves = [q, k, v, log_f]
        sq, sk, sv, sdo = (x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)
                           for x in (q, k, v, do))
        candidates = {}
        for name in ("sdpa_fa2", "sdpa_cudnn"):
            fn = sdpa_fn(sq, sk, sv, SDPA_BACKENDS[name])
            try:
                fn()
                candidates[name] = (fn, [sq, sk, sv], sdo)
            except RuntimeError as error:                                # a backend may not take the shape
                print(f"  {name} failed: {str(error)[:200]}", flush=True)
        errors, reference = {}, {}
        for variant in variants:
            for impl, kwargs in (("fox_dense", {}), ("fox_acp", {"acp_threshold": threshold})):
                fn = partial(attend_with, variant, q, k, v, log_f, **kwargs)
                try:
                    if check:
                        errors[f"{impl}_{variant}"] = check_against(f"{impl}_{variant}", fn, leaves, do,
                                                                    reference.setdefault(impl, []))
                    candidates[f"{impl}_{variant}"] = (fn, leaves)
                except Exception as error:                               # noqa: BLE001 (report, go on)
                    print(f"  {impl}_{variant} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        times = time_interleaved(candidates, do)
        launch.KERNEL_VARIANT = variants[0]
        for name, (fwd_ms, both_ms) in times.items():
            row = {"shape": shape, "gate": "-" if name.startswith("sdpa") else gate, "impl": name,
                   "fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms, "fwd_tflops": flops_fwd / fwd_ms * 1e-9,
                   "fwd_bwd_tflops": 3.5 * flops_fwd / both_ms * 1e-9, "pruned_fraction": None,
                   "acp_time_over_ideal": None, "rel_diff": errors.get(name)}
            if name.startswith("fox_acp_"):
                dense = times.get(name.replace("fox_acp_", "fox_dense_"))
                row["pruned_fraction"] = pruned
                row["acp_time_over_ideal"] = both_ms / (dense[1] * (1 - pruned)) if dense else None
            rows.append(row)
            print(f"  {shape:>15} {row['gate']:>6} {name:<22} fwd {fwd_ms:8.3f} ms  fwd+bwd {both_ms:8.3f} ms  "
                  f"{row['fwd_bwd_tflops']:6.1f} TF/s", flush=True)
        torch.cuda.empty_cache()
    return rows


def check_against(name, fn, leaves, do, reference):
    """Largest relative difference of o, dq, dk, dv, d log f from reference's (the first variant's: filled on the
    first call)."""
    for x in leaves:
        x.grad = None
    out = fn()
    out.backward(do)
    got = [out.detach().float()] + [x.grad.float() for x in leaves]
    if not reference:
        reference.extend(got)
    worst = max(((x - y).norm() / y.norm().clamp_min(1e-6)).item() for x, y in zip(got, reference, strict=True))
    print(f"  check {name}: max relative difference {worst:.2e} {'ok' if worst <= 2e-2 else 'FAILED'}", flush=True)
    return worst


SWEEP_KERNELS = ("fwd", "dkdv", "dq")
SWEEP_CONFIGS = {  # (BLOCK_M, BLOCK_N, warps, stages); 4-warp tiles at 255 registers fit two programs per SM
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 32, 4, 3), (128, 32, 8, 3),
            (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3), (64, 128, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3),
             (32, 128, 4, 4), (64, 128, 8, 2), (16, 128, 4, 3), (32, 64, 4, 2), (32, 128, 8, 2), (16, 64, 4, 2)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3),
           (128, 32, 4, 4), (128, 64, 8, 2), (128, 16, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2)],
}


GLUON_SWEEP_FWD = {64: [(256, 64, 17, 4), (256, 64, 17, 3), (128, 64, 9, 4), (128, 64, 9, 3)],
                   128: [(128, 64, 9, 4), (128, 64, 9, 3), (128, 64, 9, 5)]}
"""Under FOX_KERNELS=gluon the forward sweep also times these at their head dims: the split forward (4n+1 warps:
n consumer warpgroups of 64 query rows and a producer warp; the gate bias as launch.GLUON_FWD_GATE_MMA says)."""


SWEEP_SECONDS = 8.0
"""Per kernel kind, the time the sweep's configurations are timed for, all in one interleaved run."""


def sweep(shape, kernels=SWEEP_KERNELS, acp=False, configs=None):
    """Time each kernel alone over block configurations (fixed, no autotune); prints the best per kernel. The
    configurations of a kernel are timed call by call in one run (`alternate`), so that clock drift does not
    rank them. With acp: each config with the ACP maps of sharp gates, mild gates and a threshold of -inf, and
    its time over the ideal: the default dense config's time (in the same run) x (1 - pruned)."""
    batch, time, heads, dim = (int(x) for x in shape.split("x"))
    scale = dim ** -0.5
    flops = 4 * batch * heads * time * time * dim / 2
    cases = {}                                           # gate -> (inputs, ACP map, pruned)
    for gate in (["sharp", "mild", "none"] if acp else ["mild"]):      # none: mild gates, threshold -inf
        q, k, v, log_f, do = make_inputs(batch, time, heads, dim, "mild" if gate == "none" else gate, seed=1)
        q, k, v, do = (x.detach() for x in (q, k, v, do))
        c = launch.gate_cumsum(log_f.detach())
        acp_map = None
        pruned = 0.0
        if acp:
            threshold = acp_threshold(batch, time, heads, dim)
            acp_map = launch.acp_map(c, threshold.fill_(-math.inf) if gate == "none" else threshold, time)
            visited, total = launch.tile_stats(acp_map.kept, time, time, heads)
            pruned = 1 - (visited.sum() / total.sum()).item()
        o, lse = launch.attention_forward(q, k, v, c, scale, acp_map)
        cases[gate] = ((q, k, v, do, o, lse, c), acp_map, pruned)

    variant = launch.kernel_variant(cases[next(iter(cases))][0][0])       # FOX_KERNELS: the tiles of which

    def run(kind, cfg, gate, use_acp=True):
        (q, k, v, do, o, lse, c), acp_map, _ = cases[gate]
        acp_map = acp_map if use_acp else None
        if kind == "fwd":
            return partial(launch.attention_forward, q, k, v, c, scale, acp_map, config=cfg)
        configs = {"config_dkdv": launch.variant_config("dkdv", dim, False, variant),
                   "config_dq": launch.variant_config("dq", dim, False, variant), f"config_{kind}": cfg}
        return partial(launch.attention_backward, do, q, k, v, o, lse, c, scale, acp_map, **configs)

    out = []
    for kind in kernels:
        calls = {}                                       # (config or "dense default", gate) -> call
        if acp:
            default = launch.variant_config(kind, dim, False, variant)
            calls.update({("dense default", gate): run(kind, default, gate, False) for gate in cases})
        extra = GLUON_SWEEP_FWD.get(dim, []) if variant == "gluon" and kind == "fwd" else []
        for cfg in configs or SWEEP_CONFIGS[kind] + extra:
            try:
                for gate in cases:
                    call = run(kind, tuple(cfg), gate)
                    call()                               # compiles it; a config that cannot run is reported
                    calls[tuple(cfg), gate] = call
            except Exception as error:                                   # noqa: BLE001 (report, go on)
                print(kind, cfg, "failed", type(error).__name__, str(error)[:120], flush=True)
                for gate in cases:
                    calls.pop((tuple(cfg), gate), None)
        swept = list(dict.fromkeys(key[0] for key in calls if key[0] != "dense default"))
        if not swept:
            continue
        times = alternate(calls, seconds=SWEEP_SECONDS)
        for cfg in swept:
            row = {"shape": shape, "kernel": kind, "config": list(cfg), "acp": acp, "variant": variant}
            for gate, (_, _, pruned) in cases.items():
                row[f"{gate}_ms"] = times[cfg, gate]
                if acp:
                    dense = times["dense default", gate]
                    row.update({f"{gate}_pruned": pruned, f"{gate}_dense_default_ms": dense,
                                f"{gate}_over_ideal": times[cfg, gate] / (dense * (1 - pruned))})
            out.append(row)
    first = next(iter(cases))
    for row in sorted(out, key=lambda r: (r["kernel"], r[f"{first}_ms"])):
        ms = row[f"{first}_ms"]
        mult = 1.0 if row["kernel"] == "fwd" else 2.5
        extra = "".join(f"  {g} {row[f'{g}_ms']:7.3f} ms / ideal {row[f'{g}_over_ideal']:.3f}"
                        for g in cases if acp)
        print(f"  sweep {shape} {row['kernel']:<5} {tuple(row['config'])}  {ms:8.3f} ms  "
              f"{mult * flops / ms * 1e-9:6.1f} TF/s{extra}", flush=True)
    return out


def profile(shape, gate="sharp", steps=5):
    """Per-kernel device time of one forward+backward, dense and ACP (torch.profiler), and the step's elapsed
    time: what the ACP overhead over the ideal and the gap to SDPA are made of."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch, time, heads, dim = (int(x) for x in shape.split("x"))
    q, k, v, log_f, do = make_inputs(batch, time, heads, dim, gate, seed=1)
    leaves = [q, k, v, log_f]
    threshold = acp_threshold(batch, time, heads, dim)
    rows = []
    for impl, kwargs in [("fox_dense", {}), ("fox_acp", {"acp_threshold": threshold}),
                         ("fox_acp_nothing_pruned", {"acp_threshold": torch.full_like(threshold, -math.inf)})]:
        def step(kwargs=kwargs):
            for x in leaves:
                x.grad = None
            forgetting_attention(q, k, v, log_f, **kwargs).backward(do)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            begin.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize()
        elapsed = begin.elapsed_time(end) / steps
        kernels = []
        for event in prof.key_averages():
            device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
            if device_us > 0:
                kernels.append((event.key, device_us / 1e3 / steps, event.count // steps))
        kernels.sort(key=lambda item: -item[1])
        busy = sum(ms for _, ms, _ in kernels)
        print(f"  {shape} {gate} {impl}: elapsed {elapsed:.3f} ms per fwd+bwd, kernels {busy:.3f} ms", flush=True)
        for name, ms, count in kernels:
            print(f"      {ms:8.3f} ms  x{count:<3} {name[:90]}", flush=True)
        rows.append({"shape": shape, "gate": gate, "impl": impl, "elapsed_ms": elapsed, "kernels_ms": busy,
                     "kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in kernels]})
    return rows


def environment():
    """Date, device, versions, commit and launch settings of this run."""
    try:
        import fla
        fla_version = fla.__version__
    except ImportError:
        fla_version = None
    return {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version, "commit": commit(),
            "autotune": launch.AUTOTUNE, "kernels": launch.KERNEL_VARIANT, "gluon_tiles": launch.GLUON,
            "gluon_fused_bwd": launch.GLUON_FUSED_BWD, "gluon_vectors_by_tma": launch.GLUON_VECTORS_BY_TMA,
            "gluon_settings": launch_settings(launch)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, type=shape_arg)
    parser.add_argument("--gates", nargs="+", default=list(GATES))
    parser.add_argument("--sweep", nargs="*", choices=SWEEP_KERNELS, default=None,
                        help="time block configs of these kernels (all when none named) instead")
    parser.add_argument("--acp", action="store_true",
                        help="with --sweep: ACP maps of sharp gates, mild gates and threshold -inf")
    parser.add_argument("--configs", nargs="+", default=None, metavar="BMxBNxWARPSxSTAGES",
                        help="with --sweep: these block configurations instead of the built-in lists")
    parser.add_argument("--profile", action="store_true", help="per-kernel device times (torch.profiler) instead")
    parser.add_argument("--no-others", action="store_true", help="skip FlexAttention and fla")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="alternations per shape and gate, over fresh copies of the inputs (medians reported)")
    parser.add_argument("--variants", nargs="+", choices=launch.VARIANTS, default=None,
                        help="time these kernel variants against each other and SDPA instead")
    parser.add_argument("--check", action="store_true",
                        help="with --variants: check each variant against the first before timing")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/attention_<date>.json)")
    args = parser.parse_args()
    env = environment()
    print(json.dumps(env), flush=True)
    out = record_path("attention", args.out, env["date"])
    rows = []
    for shape in args.shapes:                            # written after each shape: a cut-off run keeps them
        if args.profile:
            rows += profile(shape)
        elif args.variants:
            rows += compare_variants(shape, args.variants, args.gates, args.check)
        elif args.sweep is not None:
            configs = args.configs and [parse_config(c) for c in args.configs]
            rows += sweep(shape, args.sweep or SWEEP_KERNELS, args.acp, configs)
        else:
            rows += bench_shape(shape, args.gates, not args.no_others, args.repeats)
        write_record(out, {"env": env, "rows": rows})
    if args.sweep is None and not args.profile:
        print_table(rows)
    print(f"wrote {out}")


def shape_arg(text: str) -> str:
    """--shapes: each BxTxHxD, four positive integers (argparse names the bad value and this rule)."""
    parts = text.split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: want BxTxHxD, four positive integers")
    return text


def positive_int(text: str) -> int:
    """--repeats: a positive integer (argparse names the bad value and this rule)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want a positive integer")
    return int(text)


def parse_config(text: str) -> tuple[int, int, int, int]:
    """'64x64x4x2' -> (BLOCK_M, BLOCK_N, warps, stages)."""
    parts = text.split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--configs {text!r}: want BLOCK_MxBLOCK_NxWARPSxSTAGES, four positive integers")
    return tuple(int(p) for p in parts)


def print_table(rows):
    sdpa_ms = {(r["impl"], r["shape"]): r["fwd_bwd_ms"] for r in rows if r["impl"].startswith("sdpa")}

    def ratio(impl, row):
        if f"fwd_bwd_speed_x_{impl}" in row:                   # the median of the repeats' ratios
            return f"{row[f'fwd_bwd_speed_x_{impl}']:.2f}"
        ms = sdpa_ms.get((impl, row["shape"]))
        return "" if ms is None else f"{ms / row['fwd_bwd_ms']:.2f}"

    print("\n| shape | gate | impl | fwd ms | fwd+bwd ms | TFLOP/s | x SDPA FA2 | x SDPA cuDNN | pruned | "
          "ACP / ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pruned = "" if r["pruned_fraction"] is None else f"{r['pruned_fraction']:.3f}"
        ideal = "" if r["acp_time_over_ideal"] is None else f"{r['acp_time_over_ideal']:.3f}"
        print(f"| {r['shape']} | {r['gate']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
              f"{r['fwd_bwd_tflops']:.0f} | {ratio('sdpa_fa2', r)} | {ratio('sdpa_cudnn', r)} | {pruned} | "
              f"{ideal} |")


if __name__ == "__main__":
    main()
