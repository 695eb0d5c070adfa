"""PyTorch reference Forgetting Attention with ACP: the test oracle and the CPU path.

Shapes (T time, H heads, D head dim):
    q (B, Tq, H, D), k and v (B, Tk, H_kv, D) with H a multiple of H_kv (GQA), log_fgate (B, Tk, H) fp32.
With Tq < Tk the queries are the last Tq positions of the Tk-long sequence (prefill against a cache).

ACP semantics, shared with the Triton kernels: time is cut into blocks of ACP_BLOCK positions. For a query
block starting at position i0 the leading key blocks whose corner score bias c[i0] - c[last key of block]
is below the threshold are pruned, and pair (i, j) is dropped iff j lies in a pruned key block of i's
query block. Because c is non-increasing, that corner is the largest bias in the tile, so every dropped
pair has c_i - c_j < threshold and the dropped attention mass per query is at most exp(threshold + 2U) * Tk.
"""

from __future__ import annotations

import math

import torch

ACP_BLOCK = 64
"""Granularity of the pruning map: one start key block per 64 queries (the kernels' smallest tile)."""

LOG_EPS = -10.0
"""ln of the attention mass ACP may drop per query (the ACP paper's eps = e^-10)."""


def acp_threshold_from_norms(q: torch.Tensor, k: torch.Tensor, sm_scale: float | None = None,
                             log_eps: float = LOG_EPS) -> torch.Tensor:
    """Threshold per (batch, head) from the actual q/k norms: -2 s max|q| max|k| - ln Tk + ln eps."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    groups = q.shape[2] // k.shape[2]
    q_max = q.float().norm(dim=-1).amax(dim=1)                                  # (B, H)
    k_max = k.float().norm(dim=-1).amax(dim=1).repeat_interleave(groups, dim=1)  # (B, H)
    bound = scale * q_max * k_max
    return -2.0 * bound - math.log(k.shape[1]) + log_eps


def acp_threshold_from_gains(q_gain: torch.Tensor, k_gain: torch.Tensor, num_keys: int,
                             log_eps: float = LOG_EPS) -> torch.Tensor:
    """Threshold per head from QK-norm gains (H, D): with RMS-normalised q, k no data pass is needed.

    |s q.k| <= s * (sqrt(D) max|g_q|) * (sqrt(D) max|g_k|) = max|g_q| max|g_k| sqrt(D) for s = 1/sqrt(D).
    """
    head_dim = q_gain.shape[-1]
    g_q, g_k = q_gain.detach().float().abs().amax(-1), k_gain.detach().float().abs().amax(-1)
    bound = g_q * g_k * math.sqrt(head_dim)
    return -2.0 * bound - math.log(num_keys) + log_eps


def _key_start(c_q: torch.Tensor, c_k: torch.Tensor, q_offset: int, threshold: torch.Tensor) -> torch.Tensor:
    """First visited key position per query position, from the block pruning map.

    c_q (B, Tq, H) and c_k (B, Tk, H) are gate cumsums at query and key positions; threshold (B, H).
    Returns (B, Tq, H) int64: keys before it are pruned for that query.
    """
    batch, tq, heads = c_q.shape
    tk = c_k.shape[1]
    qpos = torch.arange(tq, device=c_q.device) + q_offset
    q_block_first = (qpos // ACP_BLOCK) * ACP_BLOCK                              # absolute position
    first_row = (q_block_first - q_offset).clamp(min=0)
    # a query block that starts before the first query (Tq < Tk) takes its corner at the first query row:
    # c of the missing rows is unknown here, and rows that exist are all that is computed
    c_corner_q = c_q[:, first_row]                                               # (B, Tq, H)
    key_block_last = (torch.arange(0, tk, ACP_BLOCK, device=c_q.device) + ACP_BLOCK - 1).clamp(max=tk - 1)
    c_corner_k = c_k[:, key_block_last]                                          # (B, nK, H)
    bias = c_corner_q[:, :, None, :] - c_corner_k[:, None, :, :]                 # (B, Tq, nK, H)
    pruned = bias < threshold[:, None, None, :]
    # never prune the query's own block, so each query keeps at least itself
    own_block = (qpos // ACP_BLOCK)[None, :, None, None]
    kblock = torch.arange(key_block_last.numel(), device=c_q.device)[None, None, :, None]
    pruned &= kblock < own_block
    return pruned.sum(dim=2) * ACP_BLOCK


def _attend_one(q, k, v, log_fgate, sm_scale, threshold, chunk_size):
    """One sequence batch (no varlen). Returns output (B, Tq, H, D) and, with ACP, (visited, total) tiles."""
    batch, tq, heads, dim = q.shape
    tk = k.shape[1]
    groups = heads // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = torch.cumsum(log_fgate.to(compute), dim=1)                               # (B, Tk, H)
    q_offset = tk - tq
    c_q, c_k = c[:, q_offset:], c
    start = _key_start(c_q, c_k, q_offset, threshold) if threshold is not None else None

    kpos = torch.arange(tk, device=q.device)
    outs = []
    for lo in range(0, tq, chunk_size):
        hi = min(lo + chunk_size, tq)
        qc = q[:, lo:hi].to(compute)
        scores = torch.einsum("bqhd,bkhd->bhqk", qc, k.to(compute)) * sm_scale
        bias = c_q[:, lo:hi].transpose(1, 2)[..., None] - c_k.transpose(1, 2)[:, :, None]
        qpos = torch.arange(lo, hi, device=q.device) + q_offset
        keep = kpos[None, :] <= qpos[:, None]                                   # (q, k) causal
        keep = keep[None, None]
        if start is not None:
            keep = keep & (kpos[None, None, None, :] >= start[:, lo:hi].transpose(1, 2)[..., None])
        scores = (scores + bias).masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        outs.append(torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute)))
    out = torch.cat(outs, dim=1).to(q.dtype)

    stats = None
    if start is not None:
        stats = _tile_counts(start, q_offset, tq, tk)
    return out, stats


def _tile_counts(start: torch.Tensor, q_offset: int, tq: int, tk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Visited and total causal (ACP_BLOCK x ACP_BLOCK) tiles per (batch, head)."""
    first_q_block = q_offset // ACP_BLOCK
    last_q_block = (tk - 1) // ACP_BLOCK
    q_blocks = torch.arange(first_q_block, last_q_block + 1, device=start.device)
    rows = ((q_blocks * ACP_BLOCK) - q_offset).clamp(min=0)
    causal = (q_blocks + 1).to(torch.float64)                                    # key blocks 0..qb
    skipped = (start[:, rows] // ACP_BLOCK).to(torch.float64)                   # (B, nQ, H)
    total = causal.sum().expand(start.shape[0], start.shape[2]).clone()
    visited = (causal[None, :, None] - skipped).sum(dim=1)
    return visited, total


def forgetting_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_fgate: torch.Tensor,
                                   *, sm_scale: float | None = None,
                                   acp_threshold: torch.Tensor | float | str | None = None,
                                   cu_seqlens: torch.Tensor | None = None, return_stats: bool = False,
                                   chunk_size: int = 1024):
    """Forgetting Attention in PyTorch, differentiable through autograd; see the module docstring.

    acp_threshold: None (dense), a float, a (B, H) tensor (per sequence and head with cu_seqlens), or "auto"
    (from the q/k norms). cu_seqlens (N+1,) int32 packs N sequences into batch 1 along time; the gate sum
    restarts at each boundary and no query sees another sequence. Computes in float64 for float64 inputs,
    float32 otherwise, and returns q's dtype. With return_stats also returns (visited, total) tiles
    (B or N, H).
    """
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens is None:
        segments = [(q, k, v, log_fgate)]
    else:
        if q.shape[0] != 1 or q.shape[1] != k.shape[1]:
            raise ValueError("cu_seqlens needs batch 1 and as many queries as keys")
        bounds = cu_seqlens.tolist()
        segments = [(q[:, a:b], k[:, a:b], v[:, a:b], log_fgate[:, a:b])
                    for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    outs, visited, total = [], [], []
    for index, (qs, ks, vs, gs) in enumerate(segments):
        threshold = _threshold_for(acp_threshold, qs, ks, scale, index, cu_seqlens is not None)
        out, stats = _attend_one(qs, ks, vs, gs, scale, threshold, chunk_size)
        outs.append(out)
        if stats is not None:
            visited.append(stats[0])
            total.append(stats[1])
    out = torch.cat(outs, dim=1)
    if not return_stats:
        return out
    if not visited:
        return out, None
    return out, (torch.cat(visited), torch.cat(total))


def _threshold_for(acp_threshold, q, k, scale, index, varlen) -> torch.Tensor | None:
    if acp_threshold is None:
        return None
    if isinstance(acp_threshold, str):
        if acp_threshold != "auto":
            raise ValueError(f"acp_threshold={acp_threshold!r}: allowed are None, a float, a tensor or "
                             "'auto'")
        return acp_threshold_from_norms(q, k, scale)
    batch, heads = q.shape[0], q.shape[2]
    if not torch.is_tensor(acp_threshold):
        return torch.full((batch, heads), float(acp_threshold), device=q.device)
    threshold = acp_threshold.to(q.device, torch.float32)
    if threshold.dim() == 1:                                                     # per head
        return threshold[None].expand(batch, heads)
    return threshold[index:index + 1] if varlen else threshold
