"""Triton kernels for the gate cumsum and the ACP pruning map (`@triton.jit` only; launched from launch.py).

Layouts: log_fgate and its gradient (B, T, H); the cumsum c and the column sums dc (B, H, T), so the
attention kernels read c for a tile of positions with one contiguous load. With varlen, B is 1 and the
program's sequence comes from CU_SEQLENS.

The pruning map: with c non-increasing, the corner bias of (query block qb, key block kb), kb < qb, is
c[first row of qb] - c[last key of kb], and the tile is pruned when it is below the threshold. For a fixed
query block the pruned key blocks are a prefix; for a fixed key block the pruning query blocks are a suffix. So
    START[qb] = number of pruned key blocks of qb         (the forward and dq loops start there)
    QEND[kb]  = number of query blocks that keep kb         (the dk/dv loop stops there)
are both counts of one predicate, computed for all blocks in parallel: no serial boundary walk. The same kernel
sums each head's kept tiles, from which _heavy_first ranks the heads into the kernels' launch ORDER.
"""

import triton
import triton.language as tl


@triton.jit
def _gate_cumsum(X, Y, CU_SEQLENS,                       # pointers
                 stride_xb, stride_xt, stride_xh,        # strides of X
                 stride_yb, stride_yt, stride_yh,        # strides of Y
                 T, H,                                   # sizes (T: time length, or unused with varlen)
                 SIGN: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK: tl.constexpr,
                 ROWS: tl.constexpr):
    """Y = SIGN * cumsum(X) over time (reverse cumsum with REVERSE), restarting at each sequence; fp32. ROWS
    blocks of BLOCK positions at a time, each summed on its own and then offset by the blocks before it: the loop
    waits for its loads once per ROWS blocks, and each running sum stays as short as a block's (one scan over
    8192 positions was ten times further from float64 than blocks of 1024)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    if IS_VARLEN:
        bos = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - bos
        b = b * 0
    else:
        bos = 0
        seqlen = T
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + bos.to(tl.int64) * stride_xt
    y_base = Y + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh + bos.to(tl.int64) * stride_yt
    carry = tl.zeros([1], dtype=tl.float32)
    for lo in range(0, seqlen, ROWS * BLOCK):
        offs = lo + tl.arange(0, ROWS)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = offs < seqlen
        t = seqlen - 1 - offs if REVERSE else offs
        x = tl.load(x_base + t * stride_xt, mask=mask, other=0.0).to(tl.float32)
        totals = tl.sum(x, 1)
        before = tl.cumsum(totals, 0) - totals + carry                    # the blocks before each row's
        y = tl.cumsum(x, 1) + before[:, None]
        carry += tl.sum(totals, 0)
        tl.store(y_base + t * stride_yt, SIGN * y, mask=mask)


@triton.jit
def _acp_map(C, THRESHOLD, CU_SEQLENS, START, QEND, WORK,    # pointers
             stride_cb, stride_ch, stride_map,           # strides (time stride of C is 1)
             T_q, T_k, H, GROUPS, N_Q,                   # sizes; N_Q = sequences x query heads
             IS_VARLEN: tl.constexpr, ACP_BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """START and QEND (in ACP blocks) for BLOCK_B query blocks and BLOCK_B key blocks of one (batch, head), and
    their kept tiles added to WORK[head] and WORK[N_Q + key/value head] (for the launch order)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % H
    b, bos, seqlen, q_offset = sequence_bounds(CU_SEQLENS, pid_bh // H, T_q, T_k, IS_VARLEN)
    n_blocks = tl.cdiv(seqlen, ACP_BLOCK)
    if pid * BLOCK_B >= n_blocks:
        return
    c_base = C + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + bos
    threshold = tl.load(THRESHOLD + pid_bh)

    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    # corners: a query block's first row (the first query if the block starts before it), a key block's last
    cq_rows = tl.load(c_base + tl.minimum(tl.maximum(rows * ACP_BLOCK, q_offset), seqlen - 1))
    ck_rows = tl.load(c_base + tl.minimum(rows * ACP_BLOCK + ACP_BLOCK - 1, seqlen - 1))
    n_pruned_k = tl.zeros([BLOCK_B], dtype=tl.int32)     # key blocks pruned for query block `rows`
    n_pruned_q = tl.zeros([BLOCK_B], dtype=tl.int32)     # query blocks pruning key block `rows`
    for lo in range(0, n_blocks, BLOCK_B):
        cols = lo + tl.arange(0, BLOCK_B)
        valid = cols < n_blocks
        cq_cols = tl.load(c_base + tl.minimum(tl.maximum(cols * ACP_BLOCK, q_offset), seqlen - 1))
        ck_cols = tl.load(c_base + tl.minimum(cols * ACP_BLOCK + ACP_BLOCK - 1, seqlen - 1))
        pruned_k = (cols[None, :] < rows[:, None]) & (cq_rows[:, None] - ck_cols[None, :] < threshold)
        pruned_q = (rows[:, None] < cols[None, :]) & (cq_cols[None, :] - ck_rows[:, None] < threshold)
        n_pruned_k += tl.sum((pruned_k & valid[None, :]).to(tl.int32), 1)
        n_pruned_q += tl.sum((pruned_q & valid[None, :]).to(tl.int32), 1)
    mask = rows < n_blocks
    tl.store(START + pid_bh.to(tl.int64) * stride_map + rows, n_pruned_k, mask=mask)
    tl.store(QEND + pid_bh.to(tl.int64) * stride_map + rows, n_blocks - n_pruned_q, mask=mask)
    has_queries = mask & (rows >= q_offset // ACP_BLOCK)
    kept = tl.sum(tl.where(has_queries, rows + 1 - n_pruned_k, 0), 0)
    tl.atomic_add(WORK + pid_bh, kept)
    tl.atomic_add(WORK + N_Q + pid_bh // GROUPS, kept)


@triton.jit
def _heavy_first(WORK, ORDER, N_Q, N_KV, BLOCK: tl.constexpr):
    """ORDER = the heads by descending WORK, ties in index order: query heads (axis 1 = 0, WORK[:N_Q]) or
    key/value heads (axis 1 = 1, WORK[N_Q:]). Each program ranks BLOCK heads by counting the heads before them."""
    kv = tl.program_id(1)
    base = kv * N_Q
    n = N_Q + kv * (N_KV - N_Q)
    if tl.program_id(0) * BLOCK >= n:
        return
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    work_i = tl.load(WORK + base + i, mask=i < n, other=0)
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    for lo in range(0, n, BLOCK):
        j = lo + tl.arange(0, BLOCK)
        work_j = tl.load(WORK + base + j, mask=j < n, other=-1)
        tie = (work_j[None, :] == work_i[:, None]) & (j[None, :] < i[:, None])
        before = (work_j[None, :] > work_i[:, None]) | tie
        rank += tl.sum(before.to(tl.int32), 1)
    tl.store(ORDER + base + rank, i, mask=i < n)


@triton.jit
def sequence_bounds(CU_SEQLENS, b, T_q, T_k, IS_VARLEN: tl.constexpr):
    """Where the attention kernels' sequence b lies: (its batch row, its first position there, its number of
    keys, the keys before its first query). Varlen: sequence b of the packed row 0, its queries its keys;
    otherwise batch row b, whose T_q queries are the last of its T_k keys."""
    if IS_VARLEN:
        bos = tl.load(CU_SEQLENS + b)
        seqlen_k = tl.load(CU_SEQLENS + b + 1) - bos
        q_offset = 0
        b = b * 0
    else:
        bos = 0
        seqlen_k = T_k
        q_offset = T_k - T_q
    return b, bos, seqlen_k, q_offset


@triton.jit
def program_head(ORDER, USE_ACP: tl.constexpr):
    """The (sequence, head) of this program: program_id(1) without ACP (heads cost the same), ORDER[program_id(1)]
    with it, heads with the most kept tiles first, so that the programs that finish the grid are short ones (in
    grid order a long-window head scheduled last keeps a few SMs busy while the others idle)."""
    pid = tl.program_id(1)
    if USE_ACP:
        pid = tl.load(ORDER + pid)
    return pid


@triton.jit
def kept_keys(offs_m, offs_n, start_row, USE_ACP: tl.constexpr):
    """(rows, keys) mask of the scores a masked tile keeps: key <= row and, with ACP, key >= the row's first
    kept key (start_row). Two signed compares: the one unsigned compare of both bounds made ptxas pack the
    mask into bit fields, +30% instructions per masked tile of the D=64 forward."""
    if USE_ACP:
        return (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] >= start_row[:, None])
    return offs_m[:, None] >= offs_n[None, :]


@triton.jit
def first_kept_key(map_base, m0, seqlen, BLOCK_M: tl.constexpr, ACP_BLOCK: tl.constexpr):
    """Per row of the query tile at m0: the first key that ACP keeps (START of the row's block, in keys).

    Built from one scalar load per ACP block of the tile and the row index, not gathered per row: from a
    gathered vector the compiler forms the (rows, keys) mask in the load's layout and converts it to the
    scores' layout, ~250 more instructions per masked tile (SASS of the D=64 forward)."""
    tl.static_assert(BLOCK_M % ACP_BLOCK == 0 or ACP_BLOCK % BLOCK_M == 0)
    rows = m0 + tl.arange(0, BLOCK_M)
    first_block = m0 // ACP_BLOCK
    start = tl.zeros([BLOCK_M], dtype=tl.int32) + tl.load(map_base + first_block, mask=m0 < seqlen, other=0)
    for i in tl.static_range(1, BLOCK_M // ACP_BLOCK):
        block = first_block + i
        start_i = tl.load(map_base + block, mask=block * ACP_BLOCK < seqlen, other=0)
        start = tl.where(rows >= block * ACP_BLOCK, start_i, start)
    return start * ACP_BLOCK


@triton.jit
def walk_start(lo, it, n_first, jump_to, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Start of tile `it` of a walk from lo in steps of BLOCK; the masked walk jumps to jump_to after its first
    n_first tiles (partly pruned tiles and the causal diagonal in one loop, so ACP adds no loop of its own)."""
    start = lo + it * BLOCK
    if MASKED:
        start += (it >= n_first).to(tl.int32) * (jump_to - lo - n_first * BLOCK)
    return tl.multiple_of(start, BLOCK)


@triton.jit
def query_tile_bounds(map_base, m0, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      ACP_BLOCK: tl.constexpr, USE_ACP: tl.constexpr):
    """(lo, mid) for the query tile starting at m0 (forward and dq kernels): key tiles before lo are pruned for
    every row, [lo, mid) for some rows (masked walk), [mid, m0) for none (unmasked bulk); (0, 0) without ACP."""
    mid = 0
    lo = 0
    if USE_ACP:
        last_row = tl.minimum(m0 + BLOCK_M, seqlen_k) - 1
        start_first = tl.load(map_base + m0 // ACP_BLOCK) * ACP_BLOCK
        start_last = tl.load(map_base + last_row // ACP_BLOCK) * ACP_BLOCK
        lo = (start_first // BLOCK_N) * BLOCK_N
        mid = tl.minimum(tl.cdiv(start_last, BLOCK_N) * BLOCK_N, m0)
    return lo, mid
