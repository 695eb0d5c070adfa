"""Backward Forgetting Attention kernels (`@triton.jit` only; launched from launch.py).

With P = softmax(s), dS = P * (dP - delta), delta_i = rowsum(dO_i * O_i):
    dq = sm_scale dS k,   dk = sm_scale dS^T q,   dv = P^T dO,
    dc_j = -sum_i dS_ij (column sums), and the row sums sum_j dS_ij = delta_i - delta_i sum_j P_ij = 0.
So the gate gradient needs only the column sums, which the dk/dv kernel has in hand, and neither kernel needs
the other's partial gate gradient: d log f = reverse_cumsum(-colsum(dS)) (the cumsum kernel in _acp.py). The dq
kernel runs first and also writes delta, from the dO tile it loads anyway (a separate pass over O and dO cost
0.18 ms at 8x8192x16x128, 2% of a sharp ACP step); the dk/dv kernel reads it. In finite precision
the kernels' row sums are not zero: delta comes from the 16-bit output, so sum_j P_ij (dP_ij - delta_i) is
delta_i's rounding error. The dq kernel returns those row sums (one tl.sum per tile, in the same pass) and
they are added before the reverse cumsum: that turns d log f[t] into sum_{i >= t, j < t} dS_ij, in which the
rounding of delta is weighted by the attention mass across t instead of being summed over the whole suffix.

P is recomputed from the stored log2-domain lse: P_ij = exp2(q.k * qk_scale + (c_i - c_j) log2e - lse_i),
with c split around a per-tile reference point so the large cumsums cancel before the exp2.
Rows outside [q_offset, seqlen) load q = dO = 0 and lse = +inf, so they contribute P = 0 without a score mask.
"""

import triton
import triton.language as tl

from ._acp import first_kept_key, kept_keys, program_head, query_tile_bounds, sequence_bounds, walk_start

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dkdv_inner(dk, dv, dc, k, v, b_col, offs_n, q_base, do_base, lse_base, delta_base, c_base, c_ref,
                map_base, stride_qt, stride_dot, lo, n_first, jump_to, n_tiles, q_offset, seqlen_k, qk_scale,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, ACP_BLOCK: tl.constexpr,
                MASKED: tl.constexpr, USE_ACP: tl.constexpr):
    """n_tiles query tiles from lo, jumping to jump_to after n_first (the masked walk: the causal diagonal,
    then the rows that prune part of this key tile)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for it in range(0, n_tiles):
        start_m = walk_start(lo, it, n_first, jump_to, BLOCK_M, MASKED)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = (offs_m >= q_offset) & (offs_m < seqlen_k)
        q_t = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        c_q = tl.load(c_base + offs_m, mask=row_ok, other=0.0)
        a_row = (c_q - c_ref) * LOG2E - lse
        s_t = tl.dot(k, q_t) * qk_scale + b_col[:, None] + a_row[None, :]    # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t)
        if MASKED:
            keep = offs_m[None, :] >= offs_n[:, None]
            if USE_ACP:
                keep = keep & (offs_n[:, None] >= first_kept_key(map_base, start_m, seqlen_k, BLOCK_M,
                                                                  ACP_BLOCK)[None, :])
            p_t = tl.where(keep, p_t, 0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None],
                     other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk)
        dc += tl.sum(ds_t, 1)
    return dk, dv, dc


@triton.jit
def _attn_bwd_dkdv(Q, K, V, C, DO, LSE, DELTA, DK, DV, DC, START, QEND, ORDER, CU_SEQLENS,   # pointers
                   stride_qb, stride_qt, stride_qh,          # q and do share strides
                   stride_kb, stride_kt, stride_kh,          # k and dk share strides
                   stride_vb, stride_vt, stride_vh,          # v and dv share strides
                   stride_cb, stride_ch, stride_lb, stride_lh, stride_map,   # c and dc; lse and delta
                   T_q, T_k, H_kv, GROUPS, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ACP_BLOCK: tl.constexpr, USE_ACP: tl.constexpr, IS_VARLEN: tl.constexpr):
    """One key tile of one key/value head: loops over the query heads of its group and their query tiles."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    tl.static_assert(BLOCK_N % ACP_BLOCK == 0)           # a key tile is whole ACP key blocks
    pid_n = tl.program_id(0)
    pid_bh = program_head(ORDER, USE_ACP)
    b = pid_bh // H_kv
    hk = pid_bh % H_kv
    b, bos, seqlen_k, q_offset = sequence_bounds(CU_SEQLENS, b, T_q, T_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < seqlen_k
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + bos.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + bos.to(tl.int64) * stride_vt
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    first_m = tl.maximum(n0, (q_offset // BLOCK_M) * BLOCK_M)           # no tile of only pre-query rows
    diag_end = tl.minimum(n0 + BLOCK_N, seqlen_k)

    for g in range(GROUPS):
        h = (hk * GROUPS + g).to(tl.int64)
        q_base = Q + b64 * stride_qb + h * stride_qh + (bos - q_offset).to(tl.int64) * stride_qt
        do_base = DO + b64 * stride_qb + h * stride_qh + (bos - q_offset).to(tl.int64) * stride_qt
        lse_base = LSE + b64 * stride_lb + h * stride_lh + bos - q_offset
        delta_base = DELTA + b64 * stride_lb + h * stride_lh + bos - q_offset
        c_base = C + b64 * stride_cb + h * stride_ch + bos
        map_base = START + (pid_bh * GROUPS + g).to(tl.int64) * stride_map
        c_ref = tl.load(c_base + n0)
        c_k = tl.load(c_base + offs_n, mask=key_ok, other=0.0)
        b_col = (c_ref - c_k) * LOG2E
        dc = tl.zeros([BLOCK_N], dtype=tl.float32)

        # rows [n0, n0 + BLOCK_N): causal diagonal; then the bulk up to the first query block that prunes part
        # of this key tile, then the ACP-masked rows up to the first query block that prunes all of it; the
        # diagonal and the ACP-masked rows are one masked walk
        bulk_end = seqlen_k
        acp_end = seqlen_k
        if USE_ACP:
            qend_base = QEND + (pid_bh * GROUPS + g).to(tl.int64) * stride_map
            keep_all = tl.load(qend_base + n0 // ACP_BLOCK) * ACP_BLOCK
            keep_any = tl.load(qend_base + (diag_end - 1) // ACP_BLOCK) * ACP_BLOCK
            bulk_end = tl.maximum((keep_all // BLOCK_M) * BLOCK_M, diag_end)
            acp_end = tl.minimum(keep_any, seqlen_k)
        bulk_start = tl.maximum(diag_end, first_m)
        n_bulk = tl.cdiv(tl.maximum(bulk_end - bulk_start, 0), BLOCK_M)
        dk, dv, dc = _dkdv_inner(dk, dv, dc, k, v, b_col, offs_n, q_base, do_base, lse_base, delta_base,
                                 c_base, c_ref, map_base, stride_qt, stride_qt, bulk_start, n_bulk, bulk_start,
                                 n_bulk, q_offset, seqlen_k, qk_scale, BLOCK_M, HEAD_DIM, ACP_BLOCK, False,
                                 USE_ACP)
        n_diag = tl.cdiv(tl.maximum(diag_end - first_m, 0), BLOCK_M)
        acp_start = tl.maximum(bulk_end, first_m)
        n_acp = 0
        if USE_ACP:
            n_acp = tl.cdiv(tl.maximum(acp_end - acp_start, 0), BLOCK_M)
        dk, dv, dc = _dkdv_inner(dk, dv, dc, k, v, b_col, offs_n, q_base, do_base, lse_base, delta_base,
                                 c_base, c_ref, map_base, stride_qt, stride_qt, first_m, n_diag, acp_start,
                                 n_diag + n_acp, q_offset, seqlen_k, qk_scale, BLOCK_M, HEAD_DIM, ACP_BLOCK, True,
                                 USE_ACP)
        dc_base = DC + b64 * stride_cb + h * stride_ch + bos
        tl.store(dc_base + offs_n, -dc, mask=key_ok)

    dk_base = DK + b64 * stride_kb + hk.to(tl.int64) * stride_kh + bos.to(tl.int64) * stride_kt
    dv_base = DV + b64 * stride_vb + hk.to(tl.int64) * stride_vh + bos.to(tl.int64) * stride_vt
    tl.store(dk_base + offs_n[:, None] * stride_kt + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=key_ok[:, None])
    tl.store(dv_base + offs_n[:, None] * stride_vt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=key_ok[:, None])


@triton.jit
def _dq_inner(dq, dr, q, do, a_row, delta, k_base, v_base, c_base, c_ref, m0, offs_m, map_base,
              stride_kt, stride_vt, lo, n_first, jump_to, n_tiles, seqlen_k, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ACP_BLOCK: tl.constexpr,
              MASKED: tl.constexpr, USE_ACP: tl.constexpr):
    """The forward's walk (_fwd.py: _fwd_inner): n_tiles key tiles from lo, jumping to jump_to after n_first."""
    offs_d = tl.arange(0, HEAD_DIM)
    start_row = offs_m                                   # with ACP: the first kept key of each row
    if MASKED and USE_ACP:
        start_row = first_kept_key(map_base, m0, seqlen_k, BLOCK_M, ACP_BLOCK)
    for it in range(0, n_tiles):
        start_n = walk_start(lo, it, n_first, jump_to, BLOCK_N, MASKED)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            kmask = offs_n < seqlen_k
            k_t = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :],
                          other=0.0)
            v_t = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=kmask[None, :],
                          other=0.0)
            c_k = tl.load(c_base + offs_n, mask=kmask, other=0.0)
        else:
            k_t = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None])
            v_t = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None])
            c_k = tl.load(c_base + offs_n)
        s = tl.dot(q, k_t) * qk_scale + a_row[:, None] + ((c_ref - c_k) * LOG2E)[None, :]
        p = tl.math.exp2(s)
        if MASKED:
            keep = kept_keys(offs_m, offs_n, start_row, USE_ACP)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq)
        dr += tl.sum(ds, 1)
    return dq, dr


@triton.jit
def _attn_bwd_dq(Q, K, V, C, DO, O, LSE, DELTA, DQ, DR, START, ORDER, CU_SEQLENS,   # pointers
                 stride_qb, stride_qt, stride_qh,            # q, do and dq share strides
                 stride_ob, stride_ot, stride_oh,
                 stride_kb, stride_kt, stride_kh,
                 stride_vb, stride_vt, stride_vh,
                 stride_cb, stride_ch, stride_lb, stride_lh, stride_map,
                 T_q, T_k, H, GROUPS, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 ACP_BLOCK: tl.constexpr, USE_ACP: tl.constexpr, IS_VARLEN: tl.constexpr):
    """One query tile: dq, the row sums of dS, and delta = rowsum(dO * O) for the dk/dv kernel launched after it
    (computed here from the dO tile this kernel loads anyway, instead of in a pass of its own)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = program_head(ORDER, USE_ACP)
    b = pid_bh // H
    h = pid_bh % H
    b, bos, seqlen_k, q_offset = sequence_bounds(CU_SEQLENS, b, T_q, T_k, IS_VARLEN)
    m0 = (q_offset // BLOCK_M) * BLOCK_M + pid_m * BLOCK_M
    if m0 >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    row_shift = (bos - q_offset).to(tl.int64) * stride_qt
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + row_shift
    do_base = DO + b64 * stride_qb + h.to(tl.int64) * stride_qh + row_shift
    k_base = K + b64 * stride_kb + (h // GROUPS).to(tl.int64) * stride_kh + bos.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + (h // GROUPS).to(tl.int64) * stride_vh + bos.to(tl.int64) * stride_vt
    c_base = C + b64 * stride_cb + h.to(tl.int64) * stride_ch + bos
    lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + bos - q_offset
    delta_base = DELTA + b64 * stride_lb + h.to(tl.int64) * stride_lh + bos - q_offset

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m >= q_offset) & (offs_m < seqlen_k)
    do = tl.load(do_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + (bos - q_offset).to(tl.int64) * stride_ot
    o = tl.load(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_base + offs_m, delta, mask=row_ok)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    c_ref = tl.load(c_base + m0)
    c_q = tl.load(c_base + offs_m, mask=row_ok, other=0.0)
    a_row = (c_q - c_ref) * LOG2E - lse
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dr = tl.zeros([BLOCK_M], dtype=tl.float32)

    map_base = START + pid_bh.to(tl.int64) * stride_map
    lo, mid = query_tile_bounds(map_base, m0, seqlen_k, BLOCK_M, BLOCK_N, ACP_BLOCK, USE_ACP)
    n_bulk = (m0 - mid) // BLOCK_N
    dq, dr = _dq_inner(dq, dr, q, do, a_row, delta, k_base, v_base, c_base, c_ref, m0, offs_m, map_base,
                       stride_kt, stride_vt, mid, n_bulk, mid, n_bulk, seqlen_k, qk_scale,
                       BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK, False, USE_ACP)
    n_partly_pruned = (mid - lo) // BLOCK_N
    n_diag = tl.cdiv(tl.minimum(m0 + BLOCK_M, seqlen_k) - m0, BLOCK_N)
    dq, dr = _dq_inner(dq, dr, q, do, a_row, delta, k_base, v_base, c_base, c_ref, m0, offs_m, map_base,
                       stride_kt, stride_vt, lo, n_partly_pruned, m0, n_partly_pruned + n_diag, seqlen_k,
                       qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK, True, USE_ACP)
    dq_base = DQ + b64 * stride_qb + h.to(tl.int64) * stride_qh + row_shift
    tl.store(dq_base + offs_m[:, None] * stride_qt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(DR + b64 * stride_lb + h.to(tl.int64) * stride_lh + bos - q_offset + offs_m, dr, mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, T, H,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) for one tile of query rows of one head (O and dO laid out alike): the pass the dq
    kernel makes otherwise, for the fused backward (_gluon_fused, launch.GLUON_FUSED_BWD)."""
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_ot
            + offs_d[None, :])
    row_ok = offs_m < T
    o = tl.load(O + rows, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + rows, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m, tl.sum(o * do, 1),
             mask=row_ok)


@triton.jit
def _dq_from_sums(DQ_SUM, DQ, scale, ROWS, T, H, stride_qb, stride_qt, stride_qh,
                  HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """dq = scale * dq_sum in dq's dtype for BLOCK_R (batch, time, head) rows: the fused backward's fp32 sums
    (contiguous) into dq (any strides). Torch's mixed-dtype multiply ran unvectorized, at 1.5x the memory time."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)[None, :]
    inside = (rows < ROWS)[:, None]
    sums = tl.load(DQ_SUM + rows[:, None] * HEAD_DIM + cols, mask=inside)
    h = rows % H
    t = rows // H % T
    b = rows // H // T
    out = (b * stride_qb + t * stride_qt + h * stride_qh)[:, None] + cols
    tl.store(DQ + out, (sums * scale).to(DQ.dtype.element_ty), mask=inside)
