"""Forward Forgetting Attention kernel (`@triton.jit` only; launched from launch.py).

Shape legend: B batch, T time, H query heads, H_kv key/value heads, D head dim; positions are absolute within
a sequence, queries are the last T_q of T_k positions (q_offset = T_k - T_q), so query and key tiles share the
causal diagonal. Scores live in the log2 domain: s = q.k * sm_scale * log2(e) + (c_i - c_j) * log2(e).
Only the column part of the bias is computed per tile, relative to c at the tile's first row (c_ref): the
row part c_i - c_ref is the same for every key and cancels in the softmax, and it is added back in the stored
log-sum-exp so that the backward kernels can use their own reference point.

The key loop has three stages (tutorial 06's split): an ACP-masked stage (keys of partly pruned tiles, only
with USE_ACP), the unmasked bulk, and the causal diagonal.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
MODE_BULK = tl.constexpr(0)
MODE_ACP = tl.constexpr(1)
MODE_DIAG = tl.constexpr(2)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, c_base, c_ref, offs_m, start_row,
               stride_kt, stride_vt, lo, hi, seqlen_k, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MODE: tl.constexpr, USE_ACP: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MODE == MODE_DIAG:                            # only the diagonal can reach past the last key
            kmask = offs_n < seqlen_k
            k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :],
                        other=0.0)
            c_k = tl.load(c_base + offs_n, mask=kmask, other=0.0)
        else:
            k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None])
            c_k = tl.load(c_base + offs_n)
        qk = tl.dot(q, k)                                # (BLOCK_M, BLOCK_N)
        s = qk * qk_scale + ((c_ref - c_k) * LOG2E)[None, :]
        if MODE == MODE_DIAG:
            keep = offs_m[:, None] >= offs_n[None, :]
            if USE_ACP:
                keep = keep & (offs_n[None, :] >= start_row[:, None])
            s = tl.where(keep, s, float("-inf"))
        elif MODE == MODE_ACP:
            s = tl.where(offs_n[None, :] >= start_row[:, None], s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MODE == MODE_DIAG:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kmask[:, None],
                        other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, C, O, LSE, START, CU_SEQLENS,               # pointers
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
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if IS_VARLEN:
        bos = tl.load(CU_SEQLENS + b)
        seqlen_k = tl.load(CU_SEQLENS + b + 1) - bos
        q_offset = 0
        b = b * 0
    else:
        bos = 0
        seqlen_k = T_k
        q_offset = T_k - T_q
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

    # ACP: keys before START of a row's block are pruned; tiles before the first row's START are skipped
    mid = 0
    start_row = offs_m
    if USE_ACP:
        map_base = START + pid_bh.to(tl.int64) * stride_map
        last_row = tl.minimum(m0 + BLOCK_M, seqlen_k) - 1
        start_first = tl.load(map_base + m0 // ACP_BLOCK) * ACP_BLOCK
        start_last = tl.load(map_base + last_row // ACP_BLOCK) * ACP_BLOCK
        start_row = tl.load(map_base + offs_m // ACP_BLOCK, mask=offs_m < seqlen_k, other=0) * ACP_BLOCK
        lo = (start_first // BLOCK_N) * BLOCK_N
        mid = tl.minimum(tl.cdiv(start_last, BLOCK_N) * BLOCK_N, m0)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, c_base, c_ref, offs_m, start_row,
                                   stride_kt, stride_vt, lo, mid, seqlen_k, qk_scale,
                                   BLOCK_N, HEAD_DIM, MODE_ACP, USE_ACP)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, c_base, c_ref, offs_m, start_row,
                               stride_kt, stride_vt, mid, m0, seqlen_k, qk_scale,
                               BLOCK_N, HEAD_DIM, MODE_BULK, USE_ACP)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, c_base, c_ref, offs_m, start_row,
                               stride_kt, stride_vt, m0, tl.minimum(m0 + BLOCK_M, seqlen_k), seqlen_k,
                               qk_scale, BLOCK_N, HEAD_DIM, MODE_DIAG, USE_ACP)

    # epilogue: lse in the log2 domain with the row bias added back, relative to nothing
    c_row = tl.load(c_base + offs_m, mask=offs_m < seqlen_k, other=0.0)
    lse = m_i + tl.math.log2(l_i) + (c_row - c_ref) * LOG2E
    tl.store(lse_base + offs_m, lse, mask=row_ok)
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
