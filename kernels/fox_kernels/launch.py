"""Host side of the Triton kernels: checks, allocation, grids and autotuning.

Shapes: q (B, T_q, H, D), k and v (B, T_k, H_kv, D), log_fgate (B, T_k, H) fp32; with varlen B = 1 and
cu_seqlens (N + 1,) int32. Internal buffers: c, dc (B, H, T_k) fp32; lse, delta (B, H, T_q) fp32 (log2);
ACP maps start, qend (B*H or N*H, n_blocks) int32 in ACP blocks.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton

from . import _acp, _bwd, _fwd, _hopper
from .api import register_flop_formulas
from .reference import ACP_BLOCK

register_flop_formulas()

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128, 256)
INTERPRETED = not isinstance(_fwd._attn_fwd, triton.runtime.JITFunction)
"""True when TRITON_INTERPRET=1 was set before this module was imported (CPU tests)."""

# Block configurations (BLOCK_M, BLOCK_N, warps, stages) per head dim, from `bench/attention.py --sweep [--acp]`
# on an H100 (bench/results/attention_sweep*_2026-11-23.json). Fixed by default: the same inputs always run the
# same code, and a new sequence length costs no tuning pass (FOX_AUTOTUNE=1 tunes instead).
DEFAULT_FWD = {32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}
DEFAULT_DKDV = {32: (32, 128, 4, 3), 64: (32, 128, 4, 3), 128: (64, 128, 8, 2), 256: (32, 64, 4, 2)}
DEFAULT_DQ = {32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}
# With ACP at D=128 the forward takes 64-row query tiles: one ACP block, so a tile has one first kept key and
# no partly pruned key tile to mask, and two 4-warp programs share an SM.
ACP_FWD = {**DEFAULT_FWD, 128: (64, 64, 4, 3)}
_TABLES = {"fwd": (DEFAULT_FWD, ACP_FWD), "dkdv": (DEFAULT_DKDV, DEFAULT_DKDV), "dq": (DEFAULT_DQ, DEFAULT_DQ)}


# The Hopper variants (_hopper.py): "tma" launches the portable tiles. "tma_ws" warp-specialises the forward and
# dk/dv kernels with 4-warp programs, on the tiles for which Triton 3.6's pass compiles (bench/kernel_resources.py
# lists them: at 128 keys per dk/dv program, 128x128 forward tiles and every dq tiling with ACP the pass fails),
# and runs the dq kernel as "tma". Unmeasured starting points: `bench/attention.py --variants` times them against
# the portable kernels and sweeps other tiles. Neither is a default anywhere: on an H200 tma was no faster than the
# portable kernels and tma_ws slower (docs/PERFORMANCE.md).
TMA_WS_FWD = {32: (128, 64, 4, 2), 64: (128, 64, 4, 2), 128: (128, 64, 4, 2), 256: (64, 32, 4, 2)}
TMA_WS_DKDV = {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (32, 64, 4, 2), 256: (32, 64, 4, 2)}
WARP_SPECIALIZED = ("fwd", "dkdv")
# "gluon": _gluon.py's kernels where their scope allows (dense or ACP, no varlen, T_q == T_k a multiple of the
# tiles, D 64 or 128 on sm_90), the portable kernels elsewhere: the forward (FlashAttention-3's overlap of softmax
# and wgmma), dk/dv, and dq at D=128 (at D=64 the portable dq kernel was faster: 10.2 against 12.7 ms at 4x16384x24x64).
# Tiles from `FOX_KERNELS=gluon bench/attention.py --sweep` on an H200 (bench/results/*gluon*_2026-12-02_h200_*);
# at D=64, with the gate bias by matmul, 4 key/value stages ran the dense forward 1-2% faster than 3 and ACP's
# equal (bench/results/ab_fwd_stages_2026-12-03_h200_d358344+four+s4.json).
GLUON_FWD = {64: (256, 64, 17, 4), 128: (128, 64, 9, 4)}
GLUON_DQ = {128: (64, 64, 4, 2)}
GLUON_DKDV = {64: (64, 64, 4, 2), 128: (64, 64, 4, 2)}
# A forward tile of 4n+1 warps runs _gluon's split forward (n consumer warpgroups of 64 query rows, one ACP block
# each, and a producer warp that fills their shared key/value slots). At D=128 its 9-warp tile (one program per SM,
# the consumers at 240 registers, Q in their registers: GLUON_FWD_Q_REGISTERS) ran the forward 0.88x the persistent
# 64x64 tile's time dense and with ACP 0.91x with sharp gates, 0.85x with nothing pruned at 8x8192x16x128 (0.93, 0.99
# and 0.90 at 16x4096x8x128), fwd+bwd 0.96-1.00x (bench/results/ab_split128_qreg_2026-12-03_h200_0519a65.json); with Q
# from shared memory it was no faster dense (ab_split128_2026-12-03_h200_0519a65.json). At D=64 its 17-warp tile, one
# program per SM, ran the forward 7-10% faster than the 8-warp tile (128, 64, 8, 4), dense and ACP, at 16x4096x12x64
# and 4x16384x24x64, fwd+bwd 2-4%: its consumers' loop has 281 SASS instructions per key tile against 342, with no TMA
# issue and no CTA barrier. Its 9-warp tile, two programs per SM, leaves the consumers 104-112 registers and spills,
# 1-4% faster than the 8-warp tile (bench/results/ab_split_2026-12-03_h200_1b3d968.json,
# ab_split_acp_2026-12-03_h200_1b3d968.json). It replaced FlashAttention-3's ping-pong forward (two consumer
# warpgroups taking turns on the tensor cores), which had run 1-8% slower than the default tiles dense and 11-28% with
# ACP (ab_pingpong_2026-12-03_h200_75ae571.json). With ACP at D=64 the forward adds the gate bias by matmul
# (GLUON_FWD_GATE_MMA): at 128 registers two 8-warp programs fit per SM, where the FMA path's ACP loops needed 138 and
# ran twice the portable kernel's time (bench/results/attention_sweep_gluon_acp_fwd_2026-12-02_h200_ec6dd0b.json).
# With P packed in pairs it ran 4% faster than the portable kernel with sharp gates, 7% with nothing pruned
# (ab_2026-12-03_h200_d358344+four.json).
GLUON_FWD_ACP = dict(GLUON_FWD)
GLUON_FWD_SHORT = {64: (128, 64, 8, 4), 128: (64, 64, 4, 3)}
"""The forward's tile where T is not a multiple of GLUON_FWD's query tile but is of this one's (dense and ACP)."""
GLUON_FUSED_BWD: dict[int, int] = {64: 4}
"""Head dims at which one warp-specialised Gluon kernel (_gluon_fused) computes the whole backward, 5 matmuls per
tile pair where the dq and dk/dv kernels take 7, with its query slots' STAGES. It adds dq and the gate's row sums
by TMA reduce-add and atomics, in an order that varies from run to run: under torch.use_deterministic_algorithms
the dq and dk/dv kernels run instead. On an H200 it ran fwd+bwd at 0.92-0.93x their time dense and 0.97x with
sharp gates at 4x16384x24x64, 0.98x at 16x4096x12x64 (bench/results/ab_fused_*_2026-12-02_h200_*.json); its
persistent programs another 0.97x at 16x4096x12x64 and 0.99x at 1x16384x24x64
(bench/results/ab_fused_persistent_dynamic_2026-12-03_h200_b3d806f+persistent.json)."""
GLUON_VECTORS_BY_TMA = {"fwd": (128,), "dq": (128,), "dkdv": (128,)}
"""Per Gluon kernel, the head dims at which the per-tile vectors (the keys' or queries' gate cumsums, lse, delta)
arrive by TMA into shared memory with their tile, instead of by global loads in the loop whose latency stalls
the exp2s. Where measured faster on an H200 (bench/results/ab_tma_vectors_2026-12-02_h200_2053b48.json): the
D=128 forward 4-5% and dq, 2.5% on fwd+bwd. The D=64 forward ran 6% slower (its 8-warp tile is bound by
shared-memory traffic, which the copies add to), and D=64's dk/dv 2.4% faster dense but 1-2% slower with ACP.
D=128's dk/dv ran fwd+bwd 1.4-1.6% faster with ACP (sharp gates and nothing pruned) and dense within 0.6% at
8x8192x16x128 and 16x4096x8x128, with identical outputs (ab_dkdv_loads_2026-12-04_h200_c057d8e.json), where on
2026-12-02's kernels it had moved ACP by 0.2-0.7%.
The forward's setting matters only where it adds the gate bias by FMA (not GLUON_FWD_GATE_MMA); the split forward
then always takes the cumsums by TMA."""
GLUON_FWD_GATE_MMA = (64, 128)
"""Head dims at which the Gluon forward, dense and ACP, has the tensor cores add the gate bias
(_gluon._attn_fwd_hopper's and _attn_fwd_split's GATE_MMA): the scores are [q, q_gate] . [k, k_gate], one more
wgmma K step of 16 per key tile, with 16-column gate operands built from the gate cumsums before the kernel
(_gluon.gate_operands), so that the loop spends nothing on the bias and each probability is one FMA and one exp2.
On an H200 the D=64 kernel ran 3-5% faster (bench/results/fwd_gate_mma_2026-12-03_h200_5f5cda9+gate.json), the
D=128 split forward 10-15% faster than with the bias by FMA (ab_split128_2026-12-03_h200_0519a65.json,
ab_split128_qreg_2026-12-03_h200_0519a65.json). The 64x64 tiles at D=128 (GLUON_FWD_SHORT's, where T is not a
multiple of 128) had run 12-32% slower with it (fwd_gate_stages_d128_2026-12-03_h200_d358344+four.json)."""
GLUON_FWD_Q_REGISTERS = (128,)
"""Head dims at which the split forward's consumers hold Q in registers for q.k (_gluon._attn_fwd_split's
Q_REGISTERS) instead of reading it from shared memory at every key tile: at D=128 the shared-memory reads of
Q, K and V per 64-key tile are about what an SM's shared memory delivers while the tensor cores work, and Q in
registers took the forward from 0.99-1.00x to 0.88-0.89x the persistent tile's time at 8x8192x16x128
(ab_split128_qreg_2026-12-03_h200_0519a65.json). At D=64 the consumers' 112-120 registers cannot hold it (480 B
spilled)."""
GLUON_FWD_LAZY_RESCALE = ((64,), ())
"""Head dims at which the Gluon forward, dense and with ACP, rescales lazily (FlashAttention-4's conditional
rescaling; _gluon._lazy_max and _rescaled): the running max moves only in a warp where some row's scores rose more
than 8 (log2) above it, and elsewhere the loop branches over O's multiplies. On an H200
(bench/results/ab_2026-12-03_h200_f430a95+three.json) the dense D=64 forward ran 0.8-1.5% faster; the ACP forward
1.1-1.9% slower at D=64 (with sharp gates and with nothing pruned) and 3% at D=128, and the dense D=128 forward,
whose loop the matmuls bound, 4% slower. Eager, the ACP forward at D=64 ran 0.9-1.7% faster than lazily
(ab_lazy_acp_2026-12-03_h200_4eb84eb.json)."""
GLUON_FWD_PERSISTENT: tuple[dict[int, int], dict[int, int]] = ({128: 2}, {128: 2})
"""(dense, ACP): the head dims at which the Gluon forward's programs are persistent (_attn_fwd_hopper's PERSISTENT; at
D=128 that is GLUON_FWD_SHORT's tile: the split forward's setting is GLUON_FWD_SPLIT_PERSISTENT), and how many share
an SM: each takes query tiles one after another from a counter, the next tile's key/value loads in flight during one's
epilogue. On an H200 at D=128 the forward ran 5.3-5.5% faster dense and 1.7-2.4% with ACP, fwd+bwd 1.3% and 0.5%
(8x8192x16x128, bench/results/ab_persistent_o_in_q_2026-12-03_h200_*). At D=64, with O through a slot of its own and
the next Q loaded early too, the dense forward ran 1-1.5% slower and the ACP one, at 128 registers (register_cap), 3-5%
slower (ab_persistent_2026-12-03_h200_*): its two 8-warp programs per SM already hide each other's tile ends."""
GLUON_FWD_SPLIT_PERSISTENT: tuple[tuple[int, ...], tuple[int, ...]] = ((128,), (128,))
"""(dense, ACP): the head dims at which the split forward (GLUON_FWD's 4n+1-warp tiles) is persistent
(_gluon._attn_fwd_split's PERSISTENT): as many programs as fit the SMs take the query tiles in the grid's order,
each its first by its index and then the next untaken one from a counter, the next tile's Q and key/value loads in
flight while one ends. On an H200 at D=128, taking tiles pid, pid + programs, ..., the forward ran 2.9-3.4% faster
than a program per tile at 8x8192x16x128 and 3.7-6.7% at 16x4096x8x128, dense and with ACP (sharp gates and nothing
pruned), fwd+bwd 0.2-1.6% (bench/results/ab_split_persistent_2026-12-04_h200_a0c78d5+.json); from the counter it
ran another 0.5-2% faster dense and 6-11% with ACP and sharp gates, whose tiles differ most in length
(ab_split_dynamic_2026-12-04_h200_24c4b91_dyn.json). At D=64 (one 17-warp program per SM) the forward ran 3.6-7.2%
slower than a program per tile (ab_split_persistent_d64_2026-12-04_h200_a0c78d5+.json), and 0.7-1.9% slower with
the counter (ab_split_dynamic_d64_2026-12-04_h200_24c4b91.log)."""
GLUON_DQ_PERSISTENT: tuple[dict[int, int], dict[int, int]] = ({}, {})
"""(dense, ACP): the head dims at which the Gluon dq kernel's programs are persistent (_attn_bwd_dq_hopper's
PERSISTENT), and how many share an SM, as the forward's (GLUON_FWD_PERSISTENT): each takes query tiles from a
counter, the next tile's Q, dO and first key/value loads in flight during one's stores. Off: on an H200 with
{128: 2} fwd+bwd ran 0.2-0.4% slower dense and 0.6-1.5% with ACP at 8x8192x16x128 and 16x4096x8x128
(bench/results/ab_dq_persistent_2026-12-04_h200_24c4b91.json); its unmasked loop has 418 SASS instructions against
401 for a program per tile (triton 3.6)."""
GLUON_FUSED_GATE_MMA = True
"""Whether the fused backward has the tensor cores add the gate bias to its scores, as the D=64 forward does
(GLUON_FWD_GATE_MMA): one FMA per probability instead of two adds, and no per-step gate vectors. On an H200 the
D=64 fwd+bwd ran 1.5-4.0% faster, dense and ACP (bench/results/ab_2026-12-03_h200_d358344+four.json)."""
GLUON_GROUP_PROGRAMS = 1024
"""The Gluon forward, dq and dk/dv kernels go through the heads in groups of about this many programs, each
group's tiles longest first (_gluon.head_group), so that the grid ends on short tiles; 0: head by head. On an
H200 the dense forward ran 2.7% faster at 16x4096x12x64 and 4.4% at 1x16384x24x64, fwd+bwd at 8x8192x16x128
1.3% (bench/results/ab_group_2026-12-03_h200_64d7961+group.json). The fused backward's persistent programs take
their tiles head by head (one program per tile, grouped, it had run 0-1% slower)."""
GLUON = {"fwd": (GLUON_FWD, GLUON_FWD_ACP), "dq": (GLUON_DQ, GLUON_DQ), "dkdv": (GLUON_DKDV, GLUON_DKDV)}
"""Per kernel kind, (dense, ACP): the head dims that run a Gluon kernel on sm_90, and its tile."""
_GLUON_TABLES = {kind: tuple({**portable, **gluon} for portable, gluon in zip(_TABLES[kind], GLUON[kind], strict=True))
                 for kind in GLUON}
_VARIANT_TABLES = {"portable": _TABLES, "tma": _TABLES, "gluon": _GLUON_TABLES,
                   "tma_ws": {**_TABLES, "fwd": (TMA_WS_FWD, TMA_WS_FWD), "dkdv": (TMA_WS_DKDV, TMA_WS_DKDV)}}

VARIANTS = ("auto", "portable", "tma", "tma_ws", "gluon")
KERNEL_VARIANT = os.environ.get("FOX_KERNELS", "auto")
"""Which kernels launch (FOX_KERNELS): "auto" (the default: "gluon" on sm_90 GPUs where Triton has Gluon,
"portable" elsewhere), "portable" (_fwd.py, _bwd.py: any GPU, the interpreter), "gluon" (_gluon.py's Hopper
kernels where their scope allows, the portable ones otherwise), or the experimental "tma" (_hopper.py:
tensor-descriptor copies) and "tma_ws" (tma with warp-specialised loops). On an H200 (triton 3.6, 2026-12-02)
gluon ran dense fwd+bwd 1.10x portable at 4x16384x24x64 and 1.30x at 8x8192x16x128 and the 760M FoX (Pro) step
4.4% faster; tma_ws ran 1.5-1.7x slower than portable and tma was no faster (docs/PERFORMANCE.md). Read at every
launch, so a benchmark can alternate variants call by call. Inputs whose pointers or strides TMA cannot take (not
16-byte aligned) always run the portable kernels."""
if KERNEL_VARIANT not in VARIANTS:
    raise ValueError(f"FOX_KERNELS={KERNEL_VARIANT!r}: allowed are {', '.join(VARIANTS)}")
HAS_TENSOR_DESCRIPTORS = hasattr(triton.language, "make_tensor_descriptor")


def block_config(kernel: str, head_dim: int, use_acp: bool) -> tuple[int, int, int, int]:
    """The fixed (BLOCK_M, BLOCK_N, warps, stages) that `kernel` ("fwd", "dkdv", "dq") launches with."""
    return variant_config(kernel, head_dim, use_acp, "portable")


def variant_config(kernel: str, head_dim: int, use_acp: bool, variant: str) -> tuple[int, int, int, int]:
    """block_config of one kernel variant ("portable", "tma", "tma_ws")."""
    return _VARIANT_TABLES[variant][kernel][use_acp][head_dim]


def kernel_variant(*tensors: torch.Tensor) -> str:
    """The variant a launch on these tensors runs: KERNEL_VARIANT ("auto" resolved for their device), or
    "portable" wherever TMA cannot address the tensors (base or row stride not a multiple of 16 bytes)."""
    variant = KERNEL_VARIANT
    if variant == "auto":
        variant = "gluon" if _is_hopper(tensors[0]) and not isinstance(_gluon_module(), ImportError) else "portable"
    if variant != "portable" and not all(_tma_addressable(x) for x in tensors):
        variant = "portable"
    return variant


def _is_hopper(x: torch.Tensor) -> bool:
    return not INTERPRETED and x.is_cuda and _compute_capability(x.device.index) == (9, 0)


@functools.cache
def _compute_capability(index: int) -> tuple[int, int]:
    """Per device, asked once: every launch checks it."""
    return torch.cuda.get_device_capability(index)


@functools.cache
def _gluon_module():
    """_gluon, or the ImportError of a Triton without the Gluon dialect it is written in (3.6 and 3.9 have it).
    Imported on first use: Gluon adds start-up time."""
    try:
        from . import _gluon
    except ImportError as error:
        return error
    return _gluon


def _tma_addressable(x: torch.Tensor) -> bool:
    size = x.element_size()
    return x.data_ptr() % 16 == 0 and all(stride * size % 16 == 0 for stride in x.stride()[:-1])


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for the descriptors the Hopper kernels make on the device (128 bytes each per program)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _configs(choices):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in choices]


def _keep_fwd(configs, named_args, **kwargs):
    """Drop configs too big for shared memory at large head dims."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
    kept = [c for c in configs if head_dim <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return kept or configs[-1:]


_FWD_TUNE = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)]
_DKDV_TUNE = [(32, 128, 4, 3), (32, 128, 4, 4), (64, 128, 8, 2), (32, 64, 4, 3), (32, 64, 4, 2)]
_DQ_TUNE = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 4, 2)]
_TUNE_KEY = ["T_k", "HEAD_DIM", "USE_ACP", "IS_VARLEN"]

if INTERPRETED:
    _fwd_kernel, _dkdv_kernel, _dq_kernel = _fwd._attn_fwd, _bwd._attn_bwd_dkdv, _bwd._attn_bwd_dq
else:
    _prune = {"early_config_prune": _keep_fwd}
    _fwd_kernel = triton.autotune(_configs(_FWD_TUNE), key=_TUNE_KEY, prune_configs_by=_prune)(_fwd._attn_fwd)
    _dkdv_kernel = triton.autotune(_configs(_DKDV_TUNE), key=_TUNE_KEY, prune_configs_by=_prune)(
        _bwd._attn_bwd_dkdv)
    _dq_kernel = triton.autotune(_configs(_DQ_TUNE), key=_TUNE_KEY, prune_configs_by=_prune)(
        _bwd._attn_bwd_dq)
_KERNELS = {"fwd": (_fwd_kernel, _fwd._attn_fwd), "dkdv": (_dkdv_kernel, _bwd._attn_bwd_dkdv),
            "dq": (_dq_kernel, _bwd._attn_bwd_dq)}
_TMA_KERNELS = {"fwd": _hopper._attn_fwd_tma, "dkdv": _hopper._attn_bwd_dkdv_tma, "dq": _hopper._attn_bwd_dq_tma}

AUTOTUNE = os.environ.get("FOX_AUTOTUNE") == "1" and not INTERPRETED
"""True (FOX_AUTOTUNE=1): tune each kernel over the *_TUNE lists on the first call per (T_k, D, ACP, varlen)
instead of launching the fixed configurations (on another GPU than an H100, say). Tuning picks by a few
timings, so two processes may pick differently."""
POISON = False
"""Tests set True: every output and scratch buffer starts as NaN, so an unwritten element fails the check."""


def _empty_like(x, **kwargs):
    out = torch.empty_like(x, **kwargs)
    return out.fill_(float("nan")) if POISON else out


def _launch(kernel, grid, args, meta_const, config, variant="portable"):
    """Launch the autotuned portable kernel (AUTOTUNE), or the variant's with `config` or its fixed one."""
    tuned, plain = _KERNELS[kernel]
    if variant == "portable" and AUTOTUNE and config is None:
        tuned[grid](*args, **meta_const)
        return
    bm, bn, warps, stages = config or variant_config(kernel, meta_const["HEAD_DIM"], meta_const["USE_ACP"], variant)
    meta = {"BLOCK_M": bm, "BLOCK_N": bn}
    if not INTERPRETED:
        meta.update(num_warps=warps, num_stages=stages)
    if variant != "portable":
        plain = _TMA_KERNELS[kernel]
        meta["WARP_SPECIALIZE"] = variant == "tma_ws" and kernel in WARP_SPECIALIZED
        if not INTERPRETED:                              # a context variable: set in the thread that launches
            triton.set_allocator(_tma_scratch)
    plain[grid](*args, **meta_const, **meta)


def check_inputs(q, k, v, log_fgate, cu_seqlens) -> None:
    """Shape, dtype and layout checks shared by every entry point; raises ValueError/TypeError."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (batch, time, heads, head_dim)")
    batch, t_q, heads, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, T_k, H_kv, D) with q's B, D")
    t_k, heads_kv = k.shape[1], k.shape[2]
    if heads % heads_kv:
        raise ValueError(f"query heads {heads} must be a multiple of key/value heads {heads_kv}")
    if t_q > t_k:
        raise ValueError(f"T_q={t_q} > T_k={t_k}: queries must be the last T_q of the T_k positions")
    if dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {dim} not supported by the Triton kernels (allowed: {HEAD_DIMS})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if log_fgate.shape != (batch, t_k, heads):
        raise ValueError(f"log_fgate {tuple(log_fgate.shape)} must be (B, T_k, H) = {(batch, t_k, heads)}")
    if log_fgate.dtype != torch.float32:
        raise TypeError(f"log_fgate dtype {log_fgate.dtype}: must be torch.float32")
    if cu_seqlens is not None and (batch != 1 or t_q != t_k):
        raise ValueError("cu_seqlens needs batch 1 and as many queries as keys")


def _layout(q, k, cu_seqlens, max_seqlen):
    """(n_seq, T_q, T_k) where T_k is the longest sequence with varlen."""
    if cu_seqlens is None:
        return q.shape[0], q.shape[1], k.shape[1]
    return cu_seqlens.numel() - 1, max_seqlen, max_seqlen


def _or_dummy(x, like):
    """A real int32 tensor in place of an absent optional pointer (the interpreter cannot take None), which the
    kernels never read."""
    return x if x is not None else _dummy(like.device)


@functools.cache
def _dummy(device: torch.device) -> torch.Tensor:
    """One per device, made once: a fresh zero tensor per pointer cost a fill kernel each, nine per forward and
    backward, and their launches the host's time."""
    return torch.zeros(1, device=device, dtype=torch.int32)


def _contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def gate_cumsum(log_fgate, cu_seqlens=None, reverse=False, sign=1.0, out_layout="bht"):
    """c = cumsum(x) over time in fp32 (restarting at each sequence); x (B, T, H) -> (B, H, T), or the reverse
    direction (x (B, H, T) -> (B, T, H)) with reverse=True, used for d log f = reverse_cumsum(dc)."""
    if not reverse:
        batch, time, heads = log_fgate.shape
        out = _empty_like(log_fgate.transpose(1, 2), memory_format=torch.contiguous_format)
        sx, sy = (log_fgate.stride(0), log_fgate.stride(1), log_fgate.stride(2)), \
            (out.stride(0), out.stride(2), out.stride(1))
    else:
        batch, heads, time = log_fgate.shape
        out = _empty_like(log_fgate.transpose(1, 2), memory_format=torch.contiguous_format)
        sx, sy = (log_fgate.stride(0), log_fgate.stride(2), log_fgate.stride(1)), \
            (out.stride(0), out.stride(1), out.stride(2))
    n_seq = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    # up to 8 blocks of 1024 positions per step: a step waits for its loads and for the steps before it, and 8
    # steps of one block took 0.019 ms at 8x8192x16 on an H200, as long as the ACP map
    rows = min(triton.next_power_of_2(triton.cdiv(time, 1024)), 8)
    _acp._gate_cumsum[(n_seq * heads,)](log_fgate, out, _or_dummy(cu_seqlens, out), *sx, *sy, time, heads,
                                        SIGN=sign, REVERSE=reverse, IS_VARLEN=cu_seqlens is not None,
                                        BLOCK=1024, ROWS=rows, num_warps=max(4, 2 * rows))
    return out


def dq_from_sums(dq_sum, dq, scale: float) -> None:
    """dq = scale * dq_sum in dq's dtype and strides, from the fused backward's fp32 sums (contiguous, shaped as
    dq; _bwd._dq_from_sums, 64 rows of (batch, time, head) per program)."""
    batch, time, heads, dim = dq.shape
    rows = batch * time * heads
    _bwd._dq_from_sums[(triton.cdiv(rows, 64),)](dq_sum, dq, scale, rows, time, heads, dq.stride(0), dq.stride(1),
                                                 dq.stride(2), HEAD_DIM=dim, BLOCK_R=64)


class AcpMap(NamedTuple):
    """One step's pruning map, shared by the forward and the backward.

    maps (2, n_seq * H, n_blocks): start, pruned leading key blocks per query block, and qend, query blocks that
    keep each key block (a prefix, since the pruned ones are a suffix); one tensor, which the forward operator
    returns as it is for the backward. order (n_seq * H + n_seq * H_kv,): the launch order of the query heads,
    then of the key/value heads, by descending kept tiles (acp_map: why); kept (n_seq * H,): the kept causal
    tiles of each (sequence, query head), for the order and for tile_stats.
    """

    maps: torch.Tensor
    order: torch.Tensor
    kept: torch.Tensor

    @property
    def start(self) -> torch.Tensor:
        return self.maps[0]

    @property
    def qend(self) -> torch.Tensor:
        return self.maps[1]


def acp_map(c, threshold, t_q, groups=1, cu_seqlens=None, max_seqlen=None) -> AcpMap:
    """Pruning map from the gate cumsum c (B, H, T_k) and threshold (n_seq, H) fp32; groups = H / H_kv.

    The ACP kernels launch heads in `order`, the most kept tiles first: launched in index order, a head with a
    long memory that comes last keeps a few SMs busy while the others idle (sharp gates, 8x8192x16x128: 3.8%
    of the step, bench/results/ab_2026-11-23_hf_22b11f0.json). Two small kernels, no host sync.
    """
    batch, heads, t_k = c.shape
    n_seq = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    span = t_k if cu_seqlens is None else max_seqlen
    n_blocks = triton.cdiv(span, ACP_BLOCK)
    n_q, n_kv = n_seq * heads, n_seq * heads // groups
    maps = torch.empty(2, n_q, n_blocks, device=c.device, dtype=torch.int32)   # blocks past a sequence: unread
    work = torch.zeros(n_q + n_kv, device=c.device, dtype=torch.int32)
    order = torch.empty_like(work)
    threshold = threshold.to(device=c.device, dtype=torch.float32).contiguous()
    block_b = 64
    _acp._acp_map[(triton.cdiv(n_blocks, block_b), n_q)](
        c, threshold, _or_dummy(cu_seqlens, c), maps[0], maps[1], work, c.stride(0), c.stride(1), maps.stride(1),
        t_q, t_k, heads, groups, n_q, IS_VARLEN=cu_seqlens is not None, ACP_BLOCK=ACP_BLOCK, BLOCK_B=block_b)
    block = 128
    _acp._heavy_first[(triton.cdiv(n_q, block), 2)](work, order, n_q, n_kv, BLOCK=block)
    return AcpMap(maps, order, work[:n_q])


def tile_stats(kept, t_q, t_k, heads, cu_seqlens=None):
    """Visited and total causal ACP_BLOCK x ACP_BLOCK tiles per (sequence, head), each (n_seq, H) float64, from
    AcpMap.kept; the total in closed form (query blocks first..n-1 have 1..n causal tiles each). No host sync."""
    visited = kept.view(-1, heads).to(torch.float64)
    if cu_seqlens is None:
        n_blocks, first = triton.cdiv(t_k, ACP_BLOCK), (t_k - t_q) // ACP_BLOCK
        return visited, torch.full_like(visited, (n_blocks * (n_blocks + 1) - first * (first + 1)) / 2)
    n_blocks = ((cu_seqlens[1:] - cu_seqlens[:-1] + ACP_BLOCK - 1) // ACP_BLOCK).to(torch.float64)[:, None]
    return visited, (n_blocks * (n_blocks + 1) / 2).expand_as(visited)


def attention_forward(q, k, v, c, sm_scale, acp: AcpMap | None = None, cu_seqlens=None, max_seqlen=None,
                      config=None):
    """o (like q) and lse (B, H, T_q) fp32 in the log2 domain; ACP with a map from acp_map."""
    q, k, v = _contig(q), _contig(k), _contig(v)
    batch, _, heads, dim = q.shape
    n_seq, t_q, t_k = _layout(q, k, cu_seqlens, max_seqlen)
    o = _empty_like(q)
    lse = _empty_like(q[..., 0].transpose(1, 2), dtype=torch.float32, memory_format=torch.contiguous_format)
    use_acp = acp is not None
    variant = kernel_variant(q, k, v, o)
    gluon = None
    if variant == "gluon":
        variant = "portable"
        if cu_seqlens is None:
            gluon, config = _gluon_kernel(GLUON["fwd"][use_acp], config, q, k, v, GLUON_FWD_SHORT)
    with _on_device(q):
        if gluon is not None:
            gluon.forward(q, k, v, c, o, lse, sm_scale * LOG2E, config, acp, dim in GLUON_VECTORS_BY_TMA["fwd"],
                          GLUON_GROUP_PROGRAMS, dim in GLUON_FWD_GATE_MMA, dim in GLUON_FWD_LAZY_RESCALE[use_acp],
                          GLUON_FWD_PERSISTENT[use_acp].get(dim, 0), dim in GLUON_FWD_Q_REGISTERS,
                          dim in GLUON_FWD_SPLIT_PERSISTENT[use_acp])
            return o, lse
        start, order = (acp.start, acp.order) if use_acp else (None, None)
        q_first = t_k - t_q
        args = (q, k, v, c, o, lse, _or_dummy(start, q), _or_dummy(order, q), _or_dummy(cu_seqlens, q),
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                c.stride(0), c.stride(1), lse.stride(0), lse.stride(1), start.stride(0) if use_acp else 0,
                t_q, t_k, heads, heads // k.shape[2], sm_scale * LOG2E)
        const = {"HEAD_DIM": dim, "ACP_BLOCK": ACP_BLOCK, "USE_ACP": use_acp, "IS_VARLEN": cu_seqlens is not None}
        _launch("fwd", lambda meta: (triton.cdiv(t_k, meta["BLOCK_M"]) - q_first // meta["BLOCK_M"], n_seq * heads),
                args, const, config, variant)
    return o, lse


def _gluon_kernel(table, config, q, k, v, shorter=None):
    """(_gluon, its tile) where the head dim has a Gluon kernel in table and the inputs are in its scope (an sm_90
    GPU, _gluon.supported's layouts and lengths; without a config, the tile in `shorter` where T is not a multiple
    of the table's), else (None, config): the portable kernel runs, on config."""
    dim = q.shape[-1]
    if dim not in table or not _is_hopper(q):
        return None, config
    gluon = _gluon_module()
    if isinstance(gluon, ImportError):
        raise RuntimeError(f"FOX_KERNELS=gluon needs Triton's Gluon dialect (triton.experimental.gluon with "
                           f"Hopper wgmma, as in triton 3.6 and 3.9); triton {triton.__version__} lacks it: "
                           f"{gluon}") from gluon
    tiles = [config] if config else [tile for tile in (table[dim], (shorter or {}).get(dim)) if tile]
    tile = next((tile for tile in tiles if gluon.supported(q, k, v, max(tile[:2]))), None)
    return (gluon, tile) if tile else (None, config)


def _gluon_fused_backward(q, k, v, o, do):
    """_gluon_fused where its one kernel runs this backward (GLUON_FUSED_BWD has the head dim, no deterministic
    algorithms asked for, an sm_90 GPU with Gluon, the inputs in its scope), else None."""
    if (q.shape[-1] not in GLUON_FUSED_BWD or torch.are_deterministic_algorithms_enabled()
            or o.stride() != do.stride() or not _is_hopper(q) or isinstance(_gluon_module(), ImportError)):
        return None
    from . import _gluon_fused

    return _gluon_fused if _gluon_fused.supported(q, k, v) else None


def attention_backward(do, q, k, v, o, lse, c, sm_scale, acp: AcpMap | None = None, cu_seqlens=None,
                       max_seqlen=None, config_dkdv=None, config_dq=None):
    """dq, dk, dv (like q, k, v) and d log_fgate (B, T_k, H) fp32."""
    do = _contig(do)
    heads, dim = q.shape[2], q.shape[3]
    n_seq, t_q, t_k = _layout(q, k, cu_seqlens, max_seqlen)
    use_acp = acp is not None
    if do.stride() != q.stride():
        do = do.contiguous() if q.is_contiguous() else do.as_strided(q.shape, q.stride()).copy_(do)
    delta = _empty_like(lse)
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    dc = _empty_like(c)
    variant = kernel_variant(q, k, v, o, do, dq, dk, dv)
    gluon_dq = gluon_dkdv = gluon_fused = None
    if variant == "gluon":
        variant = "portable"
        if cu_seqlens is None and do.stride() == q.stride() and dk.stride() == dv.stride():
            gluon_fused = _gluon_fused_backward(q, k, v, o, do)
            if gluon_fused is None:
                gluon_dq, config_dq = _gluon_kernel(GLUON["dq"][use_acp], config_dq, q, k, v)
                gluon_dkdv, config_dkdv = _gluon_kernel(GLUON["dkdv"][use_acp], config_dkdv, q, k, v)
    with _on_device(q):
        dr = torch.zeros_like(lse) if gluon_fused is not None else _empty_like(lse)
        if gluon_fused is not None:
            _bwd._attn_bwd_delta[(triton.cdiv(t_q, 64), n_seq * heads)](
                o, do, delta, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), t_q, heads,
                HEAD_DIM=dim, BLOCK_M=64)
            dq_sum = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
            gluon_fused.backward(q, k, v, c, do, lse, delta, dk, dv, dc, dq_sum, dr, sm_scale * LOG2E, sm_scale,
                                 GLUON_FUSED_BWD[dim], acp, GLUON_FUSED_GATE_MMA)
            dq_from_sums(dq_sum, dq, sm_scale)
        else:
            _backward_dq_dkdv(do, q, k, v, o, lse, c, delta, dq, dk, dv, dc, dr, sm_scale, acp, cu_seqlens,
                              (n_seq, t_q, t_k), variant, gluon_dq, gluon_dkdv, config_dq, config_dkdv)
        dc[:, :, t_k - t_q if cu_seqlens is None else 0:] += dr   # row sums: zero up to rounding, see _bwd.py
        dlog_fgate = gate_cumsum(dc, cu_seqlens, reverse=True)
    return dq, dk, dv, dlog_fgate


def _backward_dq_dkdv(do, q, k, v, o, lse, c, delta, dq, dk, dv, dc, dr, sm_scale, acp, cu_seqlens, layout, variant,
                      gluon_dq, gluon_dkdv, config_dq, config_dkdv):
    """The backward in two kernels, dq (with delta and the row sums dr) then dk/dv (with the column sums dc): the
    Gluon ones where given, else the variant's."""
    n_seq, t_q, t_k = layout
    heads, heads_kv, dim = q.shape[2], k.shape[2], q.shape[3]
    use_acp = acp is not None
    start, qend, order = (acp.start, acp.qend, acp.order) if use_acp else (None, None, None)
    start_, qend_, cu_ = _or_dummy(start, q), _or_dummy(qend, q), _or_dummy(cu_seqlens, q)
    q_order = kv_order = _or_dummy(order, q)
    if use_acp:
        q_order, kv_order = order[:n_seq * heads], order[n_seq * heads:]
    map_stride = start.stride(0) if use_acp else 0
    const = {"HEAD_DIM": dim, "ACP_BLOCK": ACP_BLOCK, "USE_ACP": use_acp, "IS_VARLEN": cu_seqlens is not None}
    if gluon_dq is not None:
        gluon_dq.backward_dq(q, k, v, c, do, o, lse, delta, dq, dr, sm_scale * LOG2E, sm_scale, config_dq, acp,
                             dim in GLUON_VECTORS_BY_TMA["dq"], GLUON_GROUP_PROGRAMS,
                             GLUON_DQ_PERSISTENT[use_acp].get(dim, 0))
    else:
        args = (q, k, v, c, do, o, lse, delta, dq, dr, start_, q_order, cu_,
                q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), c.stride(0), c.stride(1), lse.stride(0), lse.stride(1),
                map_stride, t_q, t_k, heads, heads // heads_kv, sm_scale * LOG2E, sm_scale)
        q_first = t_k - t_q
        _launch("dq", lambda meta: (triton.cdiv(t_k, meta["BLOCK_M"]) - q_first // meta["BLOCK_M"],
                                    n_seq * heads), args, const, config_dq, variant)
    if gluon_dkdv is not None:
        gluon_dkdv.backward_dkdv(q, k, v, c, do, lse, delta, dk, dv, dc, sm_scale * LOG2E, sm_scale, config_dkdv,
                                 acp, dim in GLUON_VECTORS_BY_TMA["dkdv"], GLUON_GROUP_PROGRAMS)
        return
    if variant == "tma_ws" and heads != heads_kv:       # its loop over a group's heads cannot be specialised
        variant = "tma"
    args = (q, k, v, c, do, lse, delta, dk, dv, dc, start_, qend_, kv_order, cu_,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), c.stride(0), c.stride(1), lse.stride(0), lse.stride(1),
            map_stride, t_q, t_k, heads_kv, heads // heads_kv, sm_scale * LOG2E, sm_scale)
    _launch("dkdv", lambda meta: (triton.cdiv(t_k, meta["BLOCK_N"]), n_seq * heads_kv), args, const, config_dkdv,
            variant)


class _on_device:
    """torch.cuda.device(x) on CUDA, nothing on CPU (the interpreter)."""

    def __init__(self, x):
        self.ctx = torch.cuda.device(x.device) if x.is_cuda else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)

