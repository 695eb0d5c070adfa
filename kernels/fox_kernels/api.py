"""Public entry point: Forgetting Attention with optional ACP; Triton on CUDA, the PyTorch reference elsewhere.

Dispatch: CUDA tensors in bf16/fp16 run the Triton kernels (launch.py); anything else (CPU, fp32, fp64) runs
reference.py, which is the CPU training path and the test oracle. The Triton modules are imported on first
use, so importing fox_kernels never compiles or queries CUDA.

The kernels are registered as two opaque PyTorch operators, `fox_kernels::attention_forward` and
`fox_kernels::attention_backward`, with fake (shape-only) implementations and an autograd formula: under
torch.compile the code around them fuses with no graph break, and nothing traces into the Triton kernels.
Eager calls run the same two functions through an autograd.Function (_EagerAttention), which costs the host
less than the operators' dispatch. Operators are global by name, so the namespace is the package's: a copy of
fox_kernels imported under another name (bench/ab.py's versions) registers operators of its own instead of
replacing these.
"""

from __future__ import annotations

import torch

from .reference import ACP_BLOCK, LOG_EPS, acp_threshold_from_norms, forgetting_attention_reference

OPERATORS = __package__
"""The namespace of this package's operators: "fox_kernels", or a copy's own package name."""
_NO_MAP = 0
"""Leading dimension of the empty ACP map tensors that the dense operator returns (ops cannot return None)."""


def _map_shapes(q, k, cu_seqlens, max_seqlen) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Shapes of the ACP map (start and qend stacked), the launch order and the kept tiles per head."""
    heads, heads_kv = q.shape[2], k.shape[2]
    n_seq = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    span = k.shape[1] if cu_seqlens is None else max_seqlen
    return (2, n_seq * heads, -(-span // ACP_BLOCK)), (n_seq * (heads + heads_kv),), (n_seq * heads,)


def attention_kernels(device: torch.device | str) -> str:
    """Which implementation bf16/fp16 inputs on `device` run: "reference" off CUDA, else launch.py's kernel
    variant (FOX_KERNELS, "auto" resolved for this GPU). For run records: the variants differ in rounding."""
    device = torch.device(device)
    if device.type != "cuda":
        return "reference"
    from . import launch

    return launch.kernel_variant(torch.empty(0, device=device))


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_fgate: torch.Tensor,
                       sm_scale: float, threshold: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                       max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    """(o, lse, c, maps, order, kept): the output, what the backward needs, and the ACP map with its kept
    tiles per (sequence, head) (empty tensors when threshold is None). max_seqlen: the longest sequence with
    cu_seqlens, else unused."""
    from . import launch

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    varlen_len = max_seqlen if cu_seqlens is not None else None
    c = launch.gate_cumsum(log_fgate, cu_seqlens)                                # (B, H, T_k) fp32
    acp = None
    if threshold is not None:
        acp = launch.acp_map(c, threshold, q.shape[1], q.shape[2] // k.shape[2], cu_seqlens, varlen_len)
    # no host sync on the map: with nothing pruned the ACP kernels walk the dense kernels' loops
    o, lse = launch.attention_forward(q, k, v, c, sm_scale, acp, cu_seqlens, varlen_len)
    if acp is None:
        empty = torch.empty(_NO_MAP, device=q.device, dtype=torch.int32)
        return o, lse, c, empty, empty.clone(), empty.clone()
    return o, lse, c, acp.maps, acp.order, acp.kept


attention_forward_op = torch.library.custom_op(f"{OPERATORS}::attention_forward", mutates_args=())(
    _attention_forward)


@attention_forward_op.register_fake
def _(q, k, v, log_fgate, sm_scale, threshold, cu_seqlens, max_seqlen):
    batch, t_q, heads, _ = q.shape
    o = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads, t_q), dtype=torch.float32)
    c = q.new_empty((batch, heads, k.shape[1]), dtype=torch.float32)
    if threshold is None:
        empty = q.new_empty(_NO_MAP, dtype=torch.int32)
        return o, lse, c, empty, empty.clone(), empty.clone()
    return o, lse, c, *(q.new_empty(shape, dtype=torch.int32) for shape in _map_shapes(q, k, cu_seqlens,
                                                                                        max_seqlen))


def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, c: torch.Tensor, maps: torch.Tensor, order: torch.Tensor,
                        kept: torch.Tensor, sm_scale: float, cu_seqlens: torch.Tensor | None,
                        max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and d log_fgate (B, T_k, H) fp32, from the forward's saved outputs."""
    from . import launch

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    acp = None
    if maps.numel():
        acp = launch.AcpMap(maps, order, kept)
    varlen_len = max_seqlen if cu_seqlens is not None else None
    return launch.attention_backward(do, q, k, v, o, lse, c, sm_scale, acp, cu_seqlens, varlen_len)


attention_backward_op = torch.library.custom_op(f"{OPERATORS}::attention_backward", mutates_args=())(
    _attention_backward)


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, c, maps, order, kept, sm_scale, cu_seqlens, max_seqlen):
    batch, t_k, heads = q.shape[0], k.shape[1], q.shape[2]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty((batch, t_k, heads), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, _, sm_scale, _, cu_seqlens, max_seqlen = inputs
    o, lse, c, maps, order, kept = output
    ctx.save_for_backward(q, k, v, o, lse, c, maps, order, kept, cu_seqlens)
    ctx.sm_scale, ctx.max_seqlen = sm_scale, max_seqlen
    ctx.mark_non_differentiable(lse, c, maps, order, kept)


def _backward(ctx, do, *_):
    q, k, v, o, lse, c, maps, order, kept, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dlog_fgate = attention_backward_op(do, q, k, v, o, lse, c, maps, order, kept, ctx.sm_scale,
                                                   cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, dlog_fgate, None, None, None, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The operators' forward and backward for eager calls, without their dispatch: a call through a custom
    operator took ~32 us of host time (measured on a CPU), twice per layer and step, which the GPU waits out
    where a call is short. torch.compile traces the operators instead (forgetting_attention picks)."""

    @staticmethod
    def forward(ctx, q, k, v, log_fgate, sm_scale, threshold, cu_seqlens, max_seqlen):
        output = _attention_forward(q, k, v, log_fgate, sm_scale, threshold, cu_seqlens, max_seqlen)
        _setup_context(ctx, (q, k, v, log_fgate, sm_scale, threshold, cu_seqlens, max_seqlen), output)
        return output

    @staticmethod
    def backward(ctx, do, *_):
        q, k, v, o, lse, c, maps, order, kept, cu_seqlens = ctx.saved_tensors
        grads = _attention_backward(do, q, k, v, o, lse, c, maps, order, kept, ctx.sm_scale, cu_seqlens,
                                    ctx.max_seqlen)
        return *grads, None, None, None, None


def _forward_flops(q_shape, k_shape, *_, **__) -> int:
    """Matmul FLOPs of a dense causal forward (QK^T and PV): an upper bound with ACP or packed sequences."""
    batch, t_q, heads, dim = q_shape
    t_k = k_shape[1]
    pairs = t_q * (t_k - t_q) + t_q * (t_q + 1) // 2
    return 4 * batch * heads * dim * pairs


def _backward_flops(_do_shape, q_shape, k_shape, *_, **__) -> int:
    """QK^T recomputed, dP, dV, dQ and dK: five matmuls to the forward's two."""
    return 5 * _forward_flops(q_shape, k_shape) // 2


def register_flop_formulas() -> None:
    """Give the two operators FLOP counts (torch.utils.flop_counter). Why: the compiler's activation-memory-budget
    solver ranks what to recompute by FLOPs, and an operator without a formula counts as free, so it would
    recompute the attention forward before cheap elementwise work. Called when launch.py is imported (the
    Triton path): flop_counter imports Triton, which importing fox_kernels must not (TRITON_INTERPRET is read
    when triton.language is first imported)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    operators = getattr(torch.ops, OPERATORS)
    for op, formula in ((operators.attention_forward, _forward_flops),
                        (operators.attention_backward, _backward_flops)):
        if op not in flop_registry:
            register_flop_formula(op)(formula)


def _threshold(acp_threshold, q, k, sm_scale, cu_seqlens) -> torch.Tensor | None:
    """Threshold as (n_seq, H) fp32 on q's device, or None for dense attention."""
    if acp_threshold is None:
        return None
    heads = q.shape[2]
    n_seq = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if isinstance(acp_threshold, str):
        if acp_threshold != "auto":
            raise ValueError(f"acp_threshold={acp_threshold!r}: allowed are None, a float, a tensor or "
                             "'auto'")
        if cu_seqlens is None:
            return acp_threshold_from_norms(q, k, sm_scale)
        return _varlen_threshold_from_norms(q, k, sm_scale, cu_seqlens)
    if not torch.is_tensor(acp_threshold):
        return torch.full((n_seq, heads), float(acp_threshold), device=q.device)
    threshold = acp_threshold.detach().to(q.device, torch.float32)
    if threshold.dim() == 1:                                                     # per head
        threshold = threshold[None]
    return threshold.expand(n_seq, heads).contiguous()


def _varlen_threshold_from_norms(q, k, sm_scale, cu_seqlens, log_eps: float = LOG_EPS) -> torch.Tensor:
    """acp_threshold_from_norms of each packed sequence, (N, H), without a host sync: each token's sequence
    from the boundaries, and the largest norms per sequence by a scatter."""
    time, heads = q.shape[1], q.shape[2]
    n_seq = cu_seqlens.numel() - 1
    sequence = torch.searchsorted(cu_seqlens[1:], torch.arange(time, device=q.device), right=True)
    sequence = sequence.clamp(max=n_seq - 1)[:, None].expand(time, heads)

    def largest_norms(x):
        norms = x[0].float().norm(dim=-1).repeat_interleave(heads // x.shape[2], dim=1)       # (T, H)
        return norms.new_zeros(n_seq, heads).scatter_reduce(0, sequence, norms, "amax", include_self=False)

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1).float()[:, None]
    return -2.0 * sm_scale * largest_norms(q) * largest_norms(k) - lengths.log() + log_eps


def forgetting_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_fgate: torch.Tensor, *,
                         sm_scale: float | None = None,
                         acp_threshold: torch.Tensor | float | str | None = None,
                         cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                         return_stats: bool = False):
    """Causal softmax attention with the forget-gate bias c_i - c_j, c = cumsum(log_fgate) over time.

    q (B, T_q, H, D) and k, v (B, T_k, H_kv, D): bf16 or fp16 on CUDA for the Triton kernels (D in 32, 64,
    128, 256), any float dtype for the reference. H a multiple of H_kv (GQA); T_q <= T_k, the queries being
    the last T_q positions (prefill against a cache). log_fgate (B, T_k, H) float32, the log forget gate.
    sm_scale: default 1/sqrt(D). acp_threshold: None (dense), a float, (H,) or (B, H) (with cu_seqlens
    (N, H)) tensor, or "auto" (from the max q/k norms); see reference.py for the pruning semantics.
    cu_seqlens (N + 1,) int32 packs N sequences along time in batch 1 (T_q == T_k); the gate sum restarts at
    each boundary; max_seqlen, the longest of them, is read from cu_seqlens (a host sync) unless given.
    Returns o like q; with return_stats also (visited, total): causal 64x64 tiles computed and in all,
    float64 (B or N, H), or None when ACP is off.
    """
    if log_fgate.dtype != torch.float32:
        raise TypeError(f"log_fgate dtype {log_fgate.dtype}: must be torch.float32 (the gate cumsum over "
                        "thousands of steps loses the bias in 16-bit)")
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    use_triton = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    if not use_triton:
        return forgetting_attention_reference(q, k, v, log_fgate, sm_scale=scale, acp_threshold=acp_threshold,
                                              cu_seqlens=cu_seqlens, return_stats=return_stats)
    from . import launch

    launch.check_inputs(q, k, v, log_fgate, cu_seqlens)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    threshold = _threshold(acp_threshold, q, k, scale, cu_seqlens)
    attend = attention_forward_op if torch.compiler.is_compiling() else _EagerAttention.apply
    out, _, _, _, _, kept = attend(q, k, v, log_fgate, scale, threshold, cu_seqlens, max_seqlen or 0)
    if not return_stats:
        return out
    if threshold is None:
        return out, None
    return out, launch.tile_stats(kept, q.shape[1], k.shape[1], q.shape[2], cu_seqlens)
