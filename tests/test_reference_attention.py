"""The PyTorch reference Forgetting Attention (fox_kernels.reference) against a naive dense float64 version.

The naive version builds the full (Tq, Tk) score matrix with the explicit bias c_i - c_j and a causal mask;
ACP's pruned pairs are rebuilt here from the reference's documented block semantics.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fox_kernels import ACP_BLOCK, LOG_EPS, acp_threshold_from_norms, forgetting_attention_reference


def naive_attention(q, k, v, log_fgate, scale, pruned=None):
    """Dense softmax(s q.k + c_i - c_j) over causal (and, with pruned (B, H, Tq, Tk), unpruned) pairs.

    Returns the output (B, Tq, H, D) and the probabilities (B, H, Tq, Tk).
    """
    tq, tk = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    c = log_fgate.cumsum(dim=1).transpose(1, 2)  # (B, H, Tk)
    c_q = c[:, :, tk - tq:]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale + c_q[..., :, None] - c[..., None, :]
    qpos = torch.arange(tq) + tk - tq
    keep = torch.arange(tk)[None, :] <= qpos[:, None]  # (Tq, Tk)
    keep = keep if pruned is None else keep & ~pruned
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v), probs


def pruned_pairs(log_fgate, tq, threshold):
    """(B, H, Tq, Tk) pairs that ACP drops: key block kb < query block qb is dropped for all queries of qb
    when c[first row of qb] - c[last key of kb] < threshold (the first row is the first query if Tq < Tk)."""
    c = log_fgate.cumsum(dim=1)  # (B, Tk, H)
    batch, tk, heads = c.shape
    offset = tk - tq
    pruned = torch.zeros(batch, heads, tq, tk, dtype=torch.bool)
    for i in range(tq):
        q_block = (i + offset) // ACP_BLOCK
        corner = max(q_block * ACP_BLOCK, offset)
        for k_block in range(q_block):
            last = min(k_block * ACP_BLOCK + ACP_BLOCK - 1, tk - 1)
            cut = c[:, corner] - c[:, last] < threshold  # (B, H)
            pruned[:, :, i, k_block * ACP_BLOCK:last + 1] |= cut[..., None]
    return pruned


def tile_counts(pruned, tq, tk):
    """(visited, total) causal ACP_BLOCK-square tiles per (B, H), from the first row of each query block."""
    offset = tk - tq
    visited = torch.zeros(pruned.shape[:2], dtype=torch.float64)
    total = 0
    for q_block in range(offset // ACP_BLOCK, (tk - 1) // ACP_BLOCK + 1):
        row = max(q_block * ACP_BLOCK, offset) - offset
        skipped = pruned[:, :, row, : q_block * ACP_BLOCK : ACP_BLOCK].sum(dim=-1)
        visited += q_block + 1 - skipped
        total += q_block + 1
    return visited, torch.full_like(visited, float(total))


def make_inputs(batch, tq, tk, heads, kv_heads, dim, gate_shift=0.0, seed=0):
    """float64 leaves; sharp gates (gate_shift < 0) make ACP prune."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tq, heads, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, tk, kv_heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, tk, kv_heads, dim, generator=gen, dtype=torch.float64)
    gate_logits = torch.randn(batch, tk, heads, generator=gen, dtype=torch.float64) + 2.0 + gate_shift
    log_fgate = F.logsigmoid(gate_logits)
    return [t.requires_grad_() for t in (q, k, v, log_fgate)]


def grads(out, inputs, seed=1):
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, d_out)


def assert_close_with_grads(out, ref_out, inputs):
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for grad, ref_grad in zip(grads(out, inputs), grads(ref_out, inputs), strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)


SHAPES = [  # batch, Tq, Tk, H, H_kv, D
    (2, 1, 1, 2, 2, 16),
    (1, 17, 17, 2, 2, 16),
    (2, 100, 100, 4, 2, 16),  # T not a multiple of 64, GQA
    (1, 37, 150, 2, 2, 32),  # Tq < Tk: queries are the last 37 positions
]


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matches_naive(shape):
    q, k, v, log_fgate = inputs = make_inputs(*shape)
    scale = shape[-1] ** -0.5
    out = forgetting_attention_reference(q, k, v, log_fgate, sm_scale=scale, chunk_size=16)
    ref_out, _ = naive_attention(q, k, v, log_fgate, scale)
    assert_close_with_grads(out, ref_out, inputs)


@pytest.mark.parametrize("shape", [(2, 300, 300, 2, 2, 16), (1, 70, 260, 4, 2, 16)])
def test_acp_matches_naive_and_bounds_pruned_mass(shape):
    q, k, v, log_fgate = inputs = make_inputs(*shape, gate_shift=-3.0)
    tq, tk, scale = shape[1], shape[2], shape[-1] ** -0.5
    threshold = acp_threshold_from_norms(q.detach(), k.detach(), scale).double()  # (B, H)
    out, (visited, total) = forgetting_attention_reference(q, k, v, log_fgate, sm_scale=scale,
                                                           acp_threshold=threshold, return_stats=True)
    pruned = pruned_pairs(log_fgate.detach(), tq, threshold)
    assert pruned.any(), "sharp gates must prune something, else the test proves nothing"
    ref_out, _ = naive_attention(q, k, v, log_fgate, scale, pruned)
    assert_close_with_grads(out, ref_out, inputs)

    _, dense_probs = naive_attention(q, k, v, log_fgate, scale)
    dropped_mass = (dense_probs * pruned).sum(dim=-1)  # (B, H, Tq)
    assert dropped_mass.max() <= math.exp(LOG_EPS)

    ref_visited, ref_total = tile_counts(pruned, tq, tk)
    torch.testing.assert_close(visited.double(), ref_visited)
    torch.testing.assert_close(total.double(), ref_total)
    assert (visited < total).any()


def test_acp_auto_threshold_is_the_norm_bound():
    q, k, v, log_fgate = make_inputs(1, 200, 200, 2, 2, 16, gate_shift=-3.0)
    threshold = acp_threshold_from_norms(q, k)
    auto = forgetting_attention_reference(q, k, v, log_fgate, acp_threshold="auto")
    explicit = forgetting_attention_reference(q, k, v, log_fgate, acp_threshold=threshold)
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("acp", [False, True])
def test_varlen_restarts_the_gate_at_each_sequence(acp):
    bounds = [0, 150, 170, 400]
    q, k, v, log_fgate = inputs = make_inputs(1, 400, 400, 2, 2, 16, gate_shift=-3.0 if acp else 0.0)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    out = forgetting_attention_reference(q, k, v, log_fgate, cu_seqlens=cu_seqlens,
                                         acp_threshold="auto" if acp else None)
    ref_parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        segment = [t[:, a:b] for t in (q, k, v, log_fgate)]
        pruned = None
        if acp:
            threshold = acp_threshold_from_norms(segment[0].detach(), segment[1].detach()).double()
            pruned = pruned_pairs(segment[3].detach(), b - a, threshold)
        ref_parts.append(naive_attention(*segment, 16**-0.5, pruned)[0])
    assert_close_with_grads(out, torch.cat(ref_parts, dim=1), inputs)
