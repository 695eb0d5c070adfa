"""Forward Forgetting Attention kernel (`@triton.jit` only; launched from launch.py).

Shape legend: B batch, T time, H query heads, H_kv key/value heads, D head dim; positions are absolute within
a sequence, queries are the last T_q of T_k positions (q_offset = T_k - T_q), so query and key tiles share the
causal diagonal. Scores live in the log2 domain: s = q.k * sm_scale * log2(e) + (c_i - c_j) * log2(e).
Only the column part of the bias is computed per tile, relative to c at the tile's first row (c_ref): the
row part c_i - c_ref is the same for every key and cancels in the softmax, and it is added back in the stored
log-sum-exp so that the backward kernels can use their own reference point.

The key loop has two walks (tutorial 06's split): the unmasked bulk, and the masked tiles: those of the causal
diagonal and, with USE_ACP, the partly pruned ones, in the same loop so that the ACP kernel has the dense one's
loop structure (a third pipelined loop cost registers, spills and ~10% even with nothing pruned).
"""

import triton
import triton.language as tl

from ._acp import first_kept_key, kept_keys, program_head, query_tile_bounds, sequence_bounds, walk_start

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, c_base, c_ref, m0, offs_m, map_base,
               stride_kt, stride_vt, lo, n_first, jump_to, n_tiles, seqlen_k, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ACP_BLOCK: tl.constexpr,
               MASKED: tl.constexpr, USE_ACP: tl.constexpr):
    """n_tiles key tiles from lo; after the first n_first of them the walk jumps to jump_to (the masked walk:
    partly pruned tiles, then the causal diagonal, in one loop so that ACP adds no loop of its own)."""
    offs_d = tl.arange(0, HEAD_DIM)
    start_row = offs_m                                   # with ACP: the first kept key of each row
    if MASKED and USE_ACP:
        start_row = first_kept_key(map_base, m0, seqlen_k, BLOCK_M, ACP_BLOCK)
    for it in range(0, n_tiles):
        start_n = walk_start(lo, it, n_first, jump_to, BLOCK_N, MASKED)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:                                       # only the diagonal can reach past the last key
            kmask = offs_n < seqlen_k
            k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :],
                        other=0.0)
            c_k = tl.load(c_base + offs_n, mask=kmask, other=0.0)
        else:
            k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None])
            c_k = tl.load(c_base + offs_n)
        qk = tl.dot(q, k)                                # (BLOCK_M, BLOCK_N)
        s = qk * qk_scale + ((c_ref - c_k) * LOG2E)[None, :]
        if MASKED:
            keep = kept_keys(offs_m, offs_n, start_row, USE_ACP)
            s = tl.where(keep, s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kmask[:, None],
                        other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, C, O, LSE, START, ORDER, CU_SEQLENS,        # pointers
              stride_qb, stride_qt, stride_qh,                     # q and o strides (head dim stride is 1)
              stride_kb, stride_kt, stride_kh,
              stride_vb, stride_vt, stride_vh,
              stride_ob, stride_ot, stride_oh,
              stride_cb, stride_ch,                                # c (B, H, T_k) and lse (B, H, T_q)
              stride_lb, stride_lh, stride_map,
              T_q, T_k, H, GROUPS, qk_scale,                       # sizes; T_k is max_seqlen with varlen
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ACP_BLOCK: tl.constexpr, USE_ACP: tl.constexpr, IS_VARLEN: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)             # the diagonal starts on a key tile
    tl.static_assert(BLOCK_M % ACP_BLOCK == 0 or ACP_BLOCK % BLOCK_M == 0)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)    # longest rows first
    pid_bh = program_head(ORDER, USE_ACP)
    b = pid_bh // H
    h = pid_bh % H
    b, bos, seqlen_k, q_offset = sequence_bounds(CU_SEQLENS, b, T_q, T_k, IS_VARLEN)
    m0 = (q_offset // BLOCK_M) * BLOCK_M + pid_m * BLOCK_M
    if m0 >= seqlen_k:
        return

    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + (bos - q_offset).to(tl.int64) * stride_qt
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + (bos - q_offset).to(tl.int64) * stride_ot
    k_base = K + b64 * stride_kb + (h // GROUPS).to(tl.int64) * stride_kh + bos.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + (h // GROUPS).to(tl.int64) * stride_vh + bos.to(tl.int64) * stride_vt
    c_base = C + b64 * stride_cb + h.to(tl.int64) * stride_ch + bos
    lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + bos - q_offset

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m >= q_offset) & (offs_m < seqlen_k)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    c_ref = tl.load(c_base + m0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a row may see only masked keys in a tile
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # ACP: keys before START of a row's block are pruned; tiles before the first row's START are skipped.
    # Two walks: the unmasked bulk [mid, m0), and the masked tiles: [lo, mid) (partly pruned) then the diagonal
    map_base = START + pid_bh.to(tl.int64) * stride_map
    lo, mid = query_tile_bounds(map_base, m0, seqlen_k, BLOCK_M, BLOCK_N, ACP_BLOCK, USE_ACP)
    n_bulk = (m0 - mid) // BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, c_base, c_ref, m0, offs_m, map_base,
                               stride_kt, stride_vt, mid, n_bulk, mid, n_bulk, seqlen_k, qk_scale,
                               BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK, False, USE_ACP)
    n_partly_pruned = (mid - lo) // BLOCK_N
    n_diag = tl.cdiv(tl.minimum(m0 + BLOCK_M, seqlen_k) - m0, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, c_base, c_ref, m0, offs_m, map_base,
                               stride_kt, stride_vt, lo, n_partly_pruned, m0, n_partly_pruned + n_diag, seqlen_k,
                               qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK, True, USE_ACP)

    # epilogue: lse in the log2 domain with the row bias added back, relative to nothing
    c_row = tl.load(c_base + offs_m, mask=offs_m < seqlen_k, other=0.0)
    lse = m_i + tl.math.log2(l_i) + (c_row - c_ref) * LOG2E
    tl.store(lse_base + offs_m, lse, mask=row_ok)
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
