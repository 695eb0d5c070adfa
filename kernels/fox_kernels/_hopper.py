"""Hopper variants of the Forgetting Attention kernels (`@triton.jit` only; launched from launch.py).

Same arguments, grid, walks and results as _fwd.py and _bwd.py (read those first); what differs is how tiles
move. The q/k/v/dO/o tiles are read, and o/dq/dk/dv written, through tensor descriptors made on the device
(`tl.make_tensor_descriptor`): on sm90+ each is one TMA bulk copy (`cp.async.bulk.tensor`) instead of a
per-thread address computation and a masked load. A descriptor is made per program with the program's own
sequence as its extent, so the masks on the tails, on the rows before the first query (T_q < T_k) and at the
end of a varlen sequence are done by the copy engine: rows outside read as zeros and are not written (except
the query tile that starts before the first query, which a bulk copy cannot write: _store_query_tile).
With WARP_SPECIALIZE the tiles are walked by one `tl.range(..., warp_specialize=True)` loop, which Triton 3.6
splits on sm90 into a producer warpgroup that issues the TMA copies and two consumer warpgroups of 64 rows each
(FlashAttention-3's layout) for 4-warp programs. Its pass takes only a kernel's single loop with no branch
inside it and no early return before it (a second loop, a loop nested in another, `if` in the body or
`return` before it: the compile fails or the loop is quietly left unsplit; bench/kernel_resources.py reports
which). So the warp-specialised kernels walk every tile, the unmasked bulk too, in one loop that always
applies the mask (in a bulk tile it keeps every key: key <= row, and with ACP key >= the row's first kept key,
hold there by construction), programs past their sequence's end run an empty loop instead of returning, and
the dk/dv kernel specialises only without GQA (its loop over a group's query heads would nest; launch.py runs
grouped heads on the two-walk kernel).

The per-row and per-key fp32 vectors (c, lse, delta) stay plain loads: a descriptor needs a 16-byte aligned base
and innermost offset, which a varlen sequence's first position is not, and their tails need the neutral values
of _fwd.py and _bwd.py (lse = +inf), not zeros.
"""

import triton
import triton.language as tl

from ._acp import first_kept_key, kept_keys, program_head, query_tile_bounds, sequence_bounds, walk_start

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _rows(base, n_rows, stride_row, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Descriptor of an (n_rows, HEAD_DIM) matrix with rows stride_row apart, read and written BLOCK rows at a time."""
    return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1],
                                     block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _store_query_tile(desc, row0, stride_row, tile, m0, q_offset, offs_m, row_ok, HEAD_DIM: tl.constexpr):
    """Write a query tile through `desc` (rows from q_offset on): one bulk copy, except for the tile that starts
    before the first query (T_q < T_k). A bulk store whose box starts at a negative row is an illegal
    instruction (H200, triton 3.6; compute-sanitizer, 2026-12-04), though a bulk load there reads zeros, so that
    tile is written through masked stores at row0 (the first query's row)."""
    if m0 >= q_offset:
        desc.store([m0 - q_offset, 0], tile)
    else:
        cols = tl.arange(0, HEAD_DIM)
        tl.store(row0 + (offs_m - q_offset)[:, None] * stride_row + cols[None, :], tile, mask=row_ok[:, None])


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_desc, v_desc, c_base, c_ref, m0, offs_m, map_base,
               lo, n_first, jump_to, n_tiles, seqlen_k, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACP_BLOCK: tl.constexpr,
               MASKED: tl.constexpr, USE_ACP: tl.constexpr):
    """_fwd._fwd_inner with K and V through descriptors (keys past the sequence read as zeros)."""
    start_row = offs_m
    if MASKED and USE_ACP:
        start_row = first_kept_key(map_base, m0, seqlen_k, BLOCK_M, ACP_BLOCK)
    for it in range(0, n_tiles):
        start_n = walk_start(lo, it, n_first, jump_to, BLOCK_N, MASKED)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = k_desc.load([start_n, 0])                    # (BLOCK_N, HEAD_DIM)
        c_k = tl.load(c_base + offs_n, mask=offs_n < seqlen_k, other=0.0) if MASKED else tl.load(c_base + offs_n)
        s = tl.dot(q, k.T) * qk_scale + ((c_ref - c_k) * LOG2E)[None, :]
        if MASKED:
            s = tl.where(kept_keys(offs_m, offs_n, start_row, USE_ACP), s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _fwd_one_walk(acc, l_i, m_i, q, k_desc, v_desc, c_base, c_ref, offs_m, start_row, lo, end, seqlen_k, qk_scale,
                  BLOCK_N: tl.constexpr, USE_ACP: tl.constexpr):
    """Key tiles [lo, end) in one warp-specialised loop, each masked (module docstring: why)."""
    for start_n in tl.range(lo, end, BLOCK_N, warp_specialize=True):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = k_desc.load([start_n, 0])
        c_k = tl.load(c_base + offs_n, mask=offs_n < seqlen_k, other=0.0)
        s = tl.dot(q, k.T) * qk_scale + ((c_ref - c_k) * LOG2E)[None, :]
        s = tl.where(kept_keys(offs_m, offs_n, start_row, USE_ACP), s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tma(Q, K, V, C, O, LSE, START, ORDER, CU_SEQLENS,    # pointers (_fwd._attn_fwd's arguments)
                  stride_qb, stride_qt, stride_qh,
                  stride_kb, stride_kt, stride_kh,
                  stride_vb, stride_vt, stride_vh,
                  stride_ob, stride_ot, stride_oh,
                  stride_cb, stride_ch,
                  stride_lb, stride_lh, stride_map,
                  T_q, T_k, H, GROUPS, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  ACP_BLOCK: tl.constexpr, USE_ACP: tl.constexpr, IS_VARLEN: tl.constexpr,
                  WARP_SPECIALIZE: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    tl.static_assert(BLOCK_M % ACP_BLOCK == 0 or ACP_BLOCK % BLOCK_M == 0)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)    # longest rows first
    pid_bh = program_head(ORDER, USE_ACP)
    b = pid_bh // H
    h = pid_bh % H
    b, bos, seqlen_k, q_offset = sequence_bounds(CU_SEQLENS, b, T_q, T_k, IS_VARLEN)
    m0 = (q_offset // BLOCK_M) * BLOCK_M + pid_m * BLOCK_M
    if not WARP_SPECIALIZE:                              # noqa: SIM102 (a return before a loop stops its split)
        if m0 >= seqlen_k:
            return
    live = m0 < seqlen_k                                 # False only for varlen programs past their sequence

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kv64 = (h // GROUPS).to(tl.int64)
    bos64 = bos.to(tl.int64)
    # descriptors over this sequence's queries (rows q_offset.. of the keys' positions) and keys
    q_desc = _rows(Q + b64 * stride_qb + h64 * stride_qh + bos64 * stride_qt, seqlen_k - q_offset, stride_qt,
                   BLOCK_M, HEAD_DIM)
    o_row0 = O + b64 * stride_ob + h64 * stride_oh + bos64 * stride_ot
    o_desc = _rows(o_row0, seqlen_k - q_offset, stride_ot, BLOCK_M, HEAD_DIM)
    k_desc = _rows(K + b64 * stride_kb + kv64 * stride_kh + bos64 * stride_kt, seqlen_k, stride_kt, BLOCK_N,
                   HEAD_DIM)
    v_desc = _rows(V + b64 * stride_vb + kv64 * stride_vh + bos64 * stride_vt, seqlen_k, stride_vt, BLOCK_N,
                   HEAD_DIM)
    c_base = C + b64 * stride_cb + h64 * stride_ch + bos
    lse_base = LSE + b64 * stride_lb + h64 * stride_lh + bos - q_offset

    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = (offs_m >= q_offset) & (offs_m < seqlen_k)
    q = q_desc.load([m0 - q_offset, 0])                  # rows before the first query read as zeros
    c_ref = tl.load(c_base + m0, mask=live, other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    map_base = START + pid_bh.to(tl.int64) * stride_map
    lo, mid = query_tile_bounds(map_base, m0, seqlen_k, BLOCK_M, BLOCK_N, ACP_BLOCK, USE_ACP)
    if WARP_SPECIALIZE:
        start_row = offs_m
        if USE_ACP:
            start_row = first_kept_key(map_base, m0, seqlen_k, BLOCK_M, ACP_BLOCK)
        end = tl.where(live, tl.minimum(m0 + BLOCK_M, seqlen_k), lo)
        acc, l_i, m_i = _fwd_one_walk(acc, l_i, m_i, q, k_desc, v_desc, c_base, c_ref, offs_m, start_row, lo, end,
                                      seqlen_k, qk_scale, BLOCK_N, USE_ACP)
    else:
        n_bulk = (m0 - mid) // BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_desc, v_desc, c_base, c_ref, m0, offs_m, map_base,
                                   mid, n_bulk, mid, n_bulk, seqlen_k, qk_scale,
                                   BLOCK_M, BLOCK_N, ACP_BLOCK, False, USE_ACP)
        n_partly_pruned = (mid - lo) // BLOCK_N
        n_diag = tl.cdiv(tl.minimum(m0 + BLOCK_M, seqlen_k) - m0, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_desc, v_desc, c_base, c_ref, m0, offs_m, map_base,
                                   lo, n_partly_pruned, m0, n_partly_pruned + n_diag, seqlen_k, qk_scale,
                                   BLOCK_M, BLOCK_N, ACP_BLOCK, True, USE_ACP)

    c_row = tl.load(c_base + offs_m, mask=offs_m < seqlen_k, other=0.0)
    lse = m_i + tl.math.log2(l_i) + (c_row - c_ref) * LOG2E
    tl.store(lse_base + offs_m, lse, mask=row_ok)
    _store_query_tile(o_desc, o_row0, stride_ot, (acc / l_i[:, None]).to(O.dtype.element_ty), m0, q_offset, offs_m,
                      row_ok, HEAD_DIM)


@triton.jit
def _dkdv_inner(dk, dv, dc, k, v, b_col, offs_n, q_desc, do_desc, lse_base, delta_base, c_base, c_ref,
                map_base, lo, n_first, jump_to, n_tiles, q_offset, seqlen_k, qk_scale,
                BLOCK_M: tl.constexpr, ACP_BLOCK: tl.constexpr, MASKED: tl.constexpr, USE_ACP: tl.constexpr,
                ONE_WALK: tl.constexpr):
    """_bwd._dkdv_inner with q and dO through descriptors (rows outside the queries read as zeros; their lse
    stays +inf, so P is 0 there as in _bwd.py). ONE_WALK: the query tiles [lo, lo + n_tiles * BLOCK_M) in one
    warp-specialised loop, each masked (module docstring: why)."""
    for it in tl.range(0, n_tiles, warp_specialize=ONE_WALK):
        start_m = walk_start(lo, it, n_first, jump_to, BLOCK_M, MASKED and not ONE_WALK)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = (offs_m >= q_offset) & (offs_m < seqlen_k)
        q = q_desc.load([start_m - q_offset, 0])         # (BLOCK_M, HEAD_DIM)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        c_q = tl.load(c_base + offs_m, mask=row_ok, other=0.0)
        a_row = (c_q - c_ref) * LOG2E - lse
        s_t = tl.dot(k, q.T) * qk_scale + b_col[:, None] + a_row[None, :]        # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t)
        if MASKED:
            keep = offs_m[None, :] >= offs_n[:, None]
            if USE_ACP:
                keep = keep & (offs_n[:, None] >= first_kept_key(map_base, start_m, seqlen_k, BLOCK_M,
                                                                  ACP_BLOCK)[None, :])
            p_t = tl.where(keep, p_t, 0.0)
        do = do_desc.load([start_m - q_offset, 0])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, do.T)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
        dc += tl.sum(ds_t, 1)
    return dk, dv, dc


@triton.jit
def _dkdv_head(dk, dv, k, v, offs_n, n0, first_m, diag_end, g, pid_bh, b64, bos, q_offset, seqlen_k,
               Q, DO, C, LSE, DELTA, DC, START, QEND, stride_qb, stride_qt, stride_qh, stride_cb, stride_ch,
               stride_lb, stride_lh, stride_map, hk, GROUPS, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACP_BLOCK: tl.constexpr,
               USE_ACP: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """dk, dv and the column sums dc of one key tile from query head g of its group (_bwd._attn_bwd_dkdv's walks:
    the bulk, then the diagonal and the ACP-masked rows; with WARP_SPECIALIZE all of them in one loop)."""
    h = (hk * GROUPS + g).to(tl.int64)
    bos64 = bos.to(tl.int64)
    key_ok = offs_n < seqlen_k
    q_desc = _rows(Q + b64 * stride_qb + h * stride_qh + bos64 * stride_qt, seqlen_k - q_offset, stride_qt,
                   BLOCK_M, HEAD_DIM)
    do_desc = _rows(DO + b64 * stride_qb + h * stride_qh + bos64 * stride_qt, seqlen_k - q_offset, stride_qt,
                    BLOCK_M, HEAD_DIM)
    lse_base = LSE + b64 * stride_lb + h * stride_lh + bos - q_offset
    delta_base = DELTA + b64 * stride_lb + h * stride_lh + bos - q_offset
    c_base = C + b64 * stride_cb + h * stride_ch + bos
    map_base = START + (pid_bh * GROUPS + g).to(tl.int64) * stride_map
    c_ref = tl.load(c_base + n0, mask=n0 < seqlen_k, other=0.0)
    c_k = tl.load(c_base + offs_n, mask=key_ok, other=0.0)
    b_col = (c_ref - c_k) * LOG2E
    dc = tl.zeros([BLOCK_N], dtype=tl.float32)

    bulk_end = seqlen_k
    acp_end = seqlen_k
    if USE_ACP:
        qend_base = QEND + (pid_bh * GROUPS + g).to(tl.int64) * stride_map
        keep_all = tl.load(qend_base + n0 // ACP_BLOCK) * ACP_BLOCK
        keep_any = tl.load(qend_base + (diag_end - 1) // ACP_BLOCK) * ACP_BLOCK
        bulk_end = tl.maximum((keep_all // BLOCK_M) * BLOCK_M, diag_end)
        acp_end = tl.minimum(keep_any, seqlen_k)
    if WARP_SPECIALIZE:                                  # rows [first_m, acp_end): no tile is skipped in between
        n_rows = tl.where(n0 < seqlen_k, acp_end - first_m, 0)
        dk, dv, dc = _dkdv_inner(dk, dv, dc, k, v, b_col, offs_n, q_desc, do_desc, lse_base, delta_base, c_base,
                                 c_ref, map_base, first_m, 0, first_m, tl.cdiv(tl.maximum(n_rows, 0), BLOCK_M),
                                 q_offset, seqlen_k, qk_scale, BLOCK_M, ACP_BLOCK, True, USE_ACP, True)
    else:
        bulk_start = tl.maximum(diag_end, first_m)
        n_bulk = tl.cdiv(tl.maximum(bulk_end - bulk_start, 0), BLOCK_M)
        dk, dv, dc = _dkdv_inner(dk, dv, dc, k, v, b_col, offs_n, q_desc, do_desc, lse_base, delta_base,
                                 c_base, c_ref, map_base, bulk_start, n_bulk, bulk_start, n_bulk, q_offset,
                                 seqlen_k, qk_scale, BLOCK_M, ACP_BLOCK, False, USE_ACP, False)
        n_diag = tl.cdiv(tl.maximum(diag_end - first_m, 0), BLOCK_M)
        acp_start = tl.maximum(bulk_end, first_m)
        n_acp = 0
        if USE_ACP:
            n_acp = tl.cdiv(tl.maximum(acp_end - acp_start, 0), BLOCK_M)
        dk, dv, dc = _dkdv_inner(dk, dv, dc, k, v, b_col, offs_n, q_desc, do_desc, lse_base, delta_base,
                                 c_base, c_ref, map_base, first_m, n_diag, acp_start, n_diag + n_acp, q_offset,
                                 seqlen_k, qk_scale, BLOCK_M, ACP_BLOCK, True, USE_ACP, False)
    tl.store(DC + b64 * stride_cb + h * stride_ch + bos + offs_n, -dc, mask=key_ok)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_tma(Q, K, V, C, DO, LSE, DELTA, DK, DV, DC, START, QEND, ORDER, CU_SEQLENS,  # pointers
                       stride_qb, stride_qt, stride_qh,
                       stride_kb, stride_kt, stride_kh,
                       stride_vb, stride_vt, stride_vh,
                       stride_cb, stride_ch, stride_lb, stride_lh, stride_map,
                       T_q, T_k, H_kv, GROUPS, qk_scale, sm_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       ACP_BLOCK: tl.constexpr, USE_ACP: tl.constexpr, IS_VARLEN: tl.constexpr,
                       WARP_SPECIALIZE: tl.constexpr):
    """_bwd._attn_bwd_dkdv (one key tile of one key/value head). With WARP_SPECIALIZE the launcher guarantees
    GROUPS == 1 (one query head per key/value head: no loop around the warp-specialised one)."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    tl.static_assert(BLOCK_N % ACP_BLOCK == 0)
    pid_n = tl.program_id(0)
    pid_bh = program_head(ORDER, USE_ACP)
    b = pid_bh // H_kv
    hk = pid_bh % H_kv
    b, bos, seqlen_k, q_offset = sequence_bounds(CU_SEQLENS, b, T_q, T_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if not WARP_SPECIALIZE:                              # noqa: SIM102 (a return before a loop stops its split)
        if n0 >= seqlen_k:
            return
    b64 = b.to(tl.int64)
    bos64 = bos.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_row0 = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + bos64 * stride_kt
    v_row0 = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + bos64 * stride_vt
    k = _rows(k_row0, seqlen_k, stride_kt, BLOCK_N, HEAD_DIM).load([n0, 0])
    v = _rows(v_row0, seqlen_k, stride_vt, BLOCK_N, HEAD_DIM).load([n0, 0])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    first_m = tl.maximum(n0, (q_offset // BLOCK_M) * BLOCK_M)
    diag_end = tl.minimum(n0 + BLOCK_N, seqlen_k)
    if WARP_SPECIALIZE:
        dk, dv = _dkdv_head(dk, dv, k, v, offs_n, n0, first_m, diag_end, 0, pid_bh, b64, bos, q_offset, seqlen_k,
                            Q, DO, C, LSE, DELTA, DC, START, QEND, stride_qb, stride_qt, stride_qh, stride_cb,
                            stride_ch, stride_lb, stride_lh, stride_map, hk, GROUPS, qk_scale,
                            HEAD_DIM, BLOCK_M, BLOCK_N, ACP_BLOCK, USE_ACP, True)
    else:
        for g in range(GROUPS):
            dk, dv = _dkdv_head(dk, dv, k, v, offs_n, n0, first_m, diag_end, g, pid_bh, b64, bos, q_offset,
                                seqlen_k, Q, DO, C, LSE, DELTA, DC, START, QEND, stride_qb, stride_qt, stride_qh,
                                stride_cb, stride_ch, stride_lb, stride_lh, stride_map, hk, GROUPS, qk_scale,
                                HEAD_DIM, BLOCK_M, BLOCK_N, ACP_BLOCK, USE_ACP, False)
    dk_row0 = DK + b64 * stride_kb + hk.to(tl.int64) * stride_kh + bos64 * stride_kt
    dv_row0 = DV + b64 * stride_vb + hk.to(tl.int64) * stride_vh + bos64 * stride_vt
    _rows(dk_row0, seqlen_k, stride_kt, BLOCK_N, HEAD_DIM).store([n0, 0], (dk * sm_scale).to(DK.dtype.element_ty))
    _rows(dv_row0, seqlen_k, stride_vt, BLOCK_N, HEAD_DIM).store([n0, 0], dv.to(DV.dtype.element_ty))


@triton.jit
def _dq_inner(dq, dr, q, do, a_row, delta, k_desc, v_desc, c_base, c_ref, m0, offs_m, map_base,
              lo, n_first, jump_to, n_tiles, seqlen_k, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACP_BLOCK: tl.constexpr,
              MASKED: tl.constexpr, USE_ACP: tl.constexpr, ONE_WALK: tl.constexpr):
    """_bwd._dq_inner with K and V through descriptors. ONE_WALK: the key tiles [lo, lo + n_tiles * BLOCK_N) in
    one warp-specialised loop, each masked (module docstring: why)."""
    start_row = offs_m
    if MASKED and USE_ACP:
        start_row = first_kept_key(map_base, m0, seqlen_k, BLOCK_M, ACP_BLOCK)
    for it in tl.range(0, n_tiles, warp_specialize=ONE_WALK):
        start_n = walk_start(lo, it, n_first, jump_to, BLOCK_N, MASKED and not ONE_WALK)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = k_desc.load([start_n, 0])                    # (BLOCK_N, HEAD_DIM)
        v = v_desc.load([start_n, 0])
        c_k = tl.load(c_base + offs_n, mask=offs_n < seqlen_k, other=0.0) if MASKED else tl.load(c_base + offs_n)
        s = tl.dot(q, k.T) * qk_scale + a_row[:, None] + ((c_ref - c_k) * LOG2E)[None, :]
        p = tl.math.exp2(s)
        if MASKED:
            p = tl.where(kept_keys(offs_m, offs_n, start_row, USE_ACP), p, 0.0)
        dp = tl.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
        dr += tl.sum(ds, 1)
    return dq, dr


@triton.jit
def _attn_bwd_dq_tma(Q, K, V, C, DO, O, LSE, DELTA, DQ, DR, START, ORDER, CU_SEQLENS,   # pointers
                     stride_qb, stride_qt, stride_qh,
                     stride_ob, stride_ot, stride_oh,
                     stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh,
                     stride_cb, stride_ch, stride_lb, stride_lh, stride_map,
                     T_q, T_k, H, GROUPS, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     ACP_BLOCK: tl.constexpr, USE_ACP: tl.constexpr, IS_VARLEN: tl.constexpr,
                     WARP_SPECIALIZE: tl.constexpr):
    """_bwd._attn_bwd_dq (one query tile: dq, the row sums of dS, and delta for the dk/dv kernel)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = program_head(ORDER, USE_ACP)
    b = pid_bh // H
    h = pid_bh % H
    b, bos, seqlen_k, q_offset = sequence_bounds(CU_SEQLENS, b, T_q, T_k, IS_VARLEN)
    m0 = (q_offset // BLOCK_M) * BLOCK_M + pid_m * BLOCK_M
    if not WARP_SPECIALIZE:                              # noqa: SIM102 (a return before a loop stops its split)
        if m0 >= seqlen_k:
            return
    live = m0 < seqlen_k
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kv64 = (h // GROUPS).to(tl.int64)
    bos64 = bos.to(tl.int64)
    t_q = seqlen_k - q_offset
    q_row0 = b64 * stride_qb + h64 * stride_qh + bos64 * stride_qt      # q, dO and dq share strides
    k_desc = _rows(K + b64 * stride_kb + kv64 * stride_kh + bos64 * stride_kt, seqlen_k, stride_kt, BLOCK_N,
                   HEAD_DIM)
    v_desc = _rows(V + b64 * stride_vb + kv64 * stride_vh + bos64 * stride_vt, seqlen_k, stride_vt, BLOCK_N,
                   HEAD_DIM)
    c_base = C + b64 * stride_cb + h64 * stride_ch + bos
    lse_base = LSE + b64 * stride_lb + h64 * stride_lh + bos - q_offset
    delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + bos - q_offset

    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = (offs_m >= q_offset) & (offs_m < seqlen_k)
    do = _rows(DO + q_row0, t_q, stride_qt, BLOCK_M, HEAD_DIM).load([m0 - q_offset, 0])
    o = _rows(O + b64 * stride_ob + h64 * stride_oh + bos64 * stride_ot, t_q, stride_ot, BLOCK_M,
              HEAD_DIM).load([m0 - q_offset, 0])
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_base + offs_m, delta, mask=row_ok)
    q = _rows(Q + q_row0, t_q, stride_qt, BLOCK_M, HEAD_DIM).load([m0 - q_offset, 0])
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    c_ref = tl.load(c_base + m0, mask=live, other=0.0)
    c_q = tl.load(c_base + offs_m, mask=row_ok, other=0.0)
    a_row = (c_q - c_ref) * LOG2E - lse
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dr = tl.zeros([BLOCK_M], dtype=tl.float32)

    map_base = START + pid_bh.to(tl.int64) * stride_map
    lo, mid = query_tile_bounds(map_base, m0, seqlen_k, BLOCK_M, BLOCK_N, ACP_BLOCK, USE_ACP)
    if WARP_SPECIALIZE:                                  # keys [lo, end of the diagonal) in one loop
        n_keys = tl.where(live, tl.minimum(m0 + BLOCK_M, seqlen_k) - lo, 0)
        dq, dr = _dq_inner(dq, dr, q, do, a_row, delta, k_desc, v_desc, c_base, c_ref, m0, offs_m, map_base,
                           lo, 0, lo, tl.cdiv(n_keys, BLOCK_N), seqlen_k, qk_scale, BLOCK_M, BLOCK_N, ACP_BLOCK,
                           True, USE_ACP, True)
    else:
        n_bulk = (m0 - mid) // BLOCK_N
        dq, dr = _dq_inner(dq, dr, q, do, a_row, delta, k_desc, v_desc, c_base, c_ref, m0, offs_m, map_base,
                           mid, n_bulk, mid, n_bulk, seqlen_k, qk_scale, BLOCK_M, BLOCK_N, ACP_BLOCK, False,
                           USE_ACP, False)
        n_partly_pruned = (mid - lo) // BLOCK_N
        n_diag = tl.cdiv(tl.minimum(m0 + BLOCK_M, seqlen_k) - m0, BLOCK_N)
        dq, dr = _dq_inner(dq, dr, q, do, a_row, delta, k_desc, v_desc, c_base, c_ref, m0, offs_m, map_base,
                           lo, n_partly_pruned, m0, n_partly_pruned + n_diag, seqlen_k, qk_scale,
                           BLOCK_M, BLOCK_N, ACP_BLOCK, True, USE_ACP, False)
    dq_row0 = DQ + q_row0
    _store_query_tile(_rows(dq_row0, t_q, stride_qt, BLOCK_M, HEAD_DIM), dq_row0, stride_qt,
                      (dq * sm_scale).to(DQ.dtype.element_ty), m0, q_offset, offs_m, row_ok, HEAD_DIM)
    tl.store(DR + b64 * stride_lb + h64 * stride_lh + bos - q_offset + offs_m, dr, mask=row_ok)
