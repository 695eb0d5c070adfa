"""Public entry point: Forgetting Attention with optional ACP; Triton on CUDA, the PyTorch reference elsewhere.

Dispatch: CUDA tensors in bf16/fp16 run the Triton kernels (launch.py); anything else (CPU, fp32, fp64) runs
reference.py, which is the CPU training path and the test oracle. The Triton modules are imported on first
use, so importing fox_kernels never compiles or queries CUDA.
"""

from __future__ import annotations

import torch

from .reference import acp_threshold_from_norms, forgetting_attention_reference


class _ForgettingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_fgate, sm_scale, threshold, cu_seqlens, max_seqlen):
        from . import launch

        c = launch.gate_cumsum(log_fgate, cu_seqlens)                        # (B, H, T_k) fp32
        acp = None
        if threshold is not None:
            acp = launch.acp_map(c, threshold, q.shape[1], q.shape[2] // k.shape[2], cu_seqlens, max_seqlen)
        # no host sync on the map: with nothing pruned the ACP kernels walk the dense kernels' loops (no
        # partly pruned tiles in the masked walk, one extra compare on the diagonal tile)
        o, lse = launch.attention_forward(q, k, v, c, sm_scale, acp, cu_seqlens, max_seqlen)
        ctx.save_for_backward(q, k, v, o, lse, c, cu_seqlens, *(acp or ()))
        ctx.sm_scale, ctx.max_seqlen = sm_scale, max_seqlen
        kept = acp.kept if acp is not None else torch.empty(0, device=q.device, dtype=torch.int32)
        ctx.mark_non_differentiable(kept)
        return o, kept

    @staticmethod
    def backward(ctx, do, _dkept):
        from . import launch

        q, k, v, o, lse, c, cu_seqlens, *acp = ctx.saved_tensors
        acp = launch.AcpMap(*acp) if acp else None
        dq, dk, dv, dlog_fgate = launch.attention_backward(do, q, k, v, o, lse, c, ctx.sm_scale, acp, cu_seqlens,
                                                           ctx.max_seqlen)
        return dq, dk, dv, dlog_fgate, None, None, None, None


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
        bounds = cu_seqlens.tolist()                     # a host sync, needed only to slice per sequence
        return torch.cat([acp_threshold_from_norms(q[:, a:b], k[:, a:b], sm_scale)
                          for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    if not torch.is_tensor(acp_threshold):
        return torch.full((n_seq, heads), float(acp_threshold), device=q.device)
    threshold = acp_threshold.detach().to(q.device, torch.float32)
    if threshold.dim() == 1:                                                     # per head
        threshold = threshold[None]
    return threshold.expand(n_seq, heads).contiguous()


def forgetting_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_fgate: torch.Tensor, *,
                         sm_scale: float | None = None,
                         acp_threshold: torch.Tensor | float | str | None = None,
                         cu_seqlens: torch.Tensor | None = None, return_stats: bool = False):
    """Causal softmax attention with the forget-gate bias c_i - c_j, c = cumsum(log_fgate) over time.

    q (B, T_q, H, D) and k, v (B, T_k, H_kv, D): bf16 or fp16 on CUDA for the Triton kernels (D in 32, 64,
    128, 256), any float dtype for the reference. H a multiple of H_kv (GQA); T_q <= T_k, the queries being
    the last T_q positions (prefill against a cache). log_fgate (B, T_k, H) float32, the log forget gate.
    sm_scale: default 1/sqrt(D). acp_threshold: None (dense), a float, (H,) or (B, H) (with cu_seqlens
    (N, H)) tensor, or "auto" (from the max q/k norms); see reference.py for the pruning semantics.
    cu_seqlens (N + 1,) int32 packs N sequences along time in batch 1 (T_q == T_k); the gate sum restarts at
    each boundary. Returns o like q; with return_stats also (visited, total): causal 64x64 tiles computed and
    in all, float64 (B or N, H), or None when ACP is off.
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
    max_seqlen = None
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    threshold = _threshold(acp_threshold, q, k, scale, cu_seqlens)
    out, kept = _ForgettingAttention.apply(q, k, v, log_fgate, scale, threshold, cu_seqlens, max_seqlen)
    if not return_stats:
        return out
    if threshold is None:
        return out, None
    return out, launch.tile_stats(kept, q.shape[1], k.shape[1], q.shape[2], cu_seqlens)
