"""The Hopper backward in one kernel, warp-specialised as FlashAttention-3's: dq, dk, dv and the gate's row and
column sums from one pass over the scores, 5 matmuls per tile pair where _gluon's dq and dk/dv kernels take 7.

A tile is 128 keys of one key/value head; its walk goes over its group's heads' queries from the diagonal on, 64
per step (with ACP, to the last step that keeps any of its keys). The programs are persistent, one per SM: each
takes its first tile by its index, then the next untaken one from a counter in global memory, so that programs
with long walks take fewer (a fixed share each left SMs idle: 1.06-1.23x the time), and one tile's end (its last
steps, the dk and dv stores) overlaps the next one's K and V loads, where a program per tile waited for its launch
and loads. Its warps:
- a producer warp: per tile its head (after ACP's ORDER, for the consumers) and K and V into one of two
  buffers, then per step Q with its gate cumsums and lse, and dO with delta, by TMA into STAGES slots, each
  refilled once both consumers are done with it;
- two consumer warpgroups, one per 64-key half (one ACP block each): S^T = K_half Q^T and dP^T = V_half dO^T,
  then dv += P^T dO and dk += dS^T Q with P^T and dS^T from registers, and the column sums of dS^T (this half's
  keys) from a matmul with 8 columns of ones. Each writes its half of dS^T to shared memory. The step's dq needs
  both halves: the warpgroups take turns at it, one step each, and the other goes on meanwhile. dq (dS k over
  the 128 keys, dS from shared memory) is added into fp32 rows by TMA, and the row sums, which would cross warps,
  come from an 8-column matmul with ones too and are added by atomics.

The scores, P, dS and the gate's column sums are those of _gluon's dk/dv kernel; dq and the row sums those of its
dq kernel. Both sums come from the same 16-bit dS, so that they cancel as _bwd.py's docstring says. The adds into
dq and the row sums come in an order that varies from run to run: launch.py runs the two deterministic kernels
instead under torch.use_deterministic_algorithms.

Scope: _gluon.supported with T a multiple of 128, D = 64 (at D=128 the tiles do not fit in shared memory).
"""

from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from . import _gluon
from ._gluon import (
    CONSUMER_REGISTERS,
    CTA_BARRIER,
    GATE_COLUMNS,
    LOG2E,
    PRODUCER_REGISTERS,
    TMA_LOAD,
    _barriers,
    _descriptor,
    _load_q_do,
    _pack_pairs,
    _query_slots,
    _vector_descriptor,
    _wgmma_layout,
)
from .reference import ACP_BLOCK


@builtin
def _tma_add_from_shared(desc, coord, src, _semantic=None):
    """Add a shared-memory tile into global memory by TMA (cp.reduce.async.bulk.tensor .add), as one bulk group
    that tma.store_wait counts: Gluon's tma.async_atomic_add, which Triton 3.6 has in its IR but does not name."""
    offsets = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, offsets, src.handle)


TMA_ADD = getattr(tma, "async_atomic_add", None) or _tma_add_from_shared
"""The TMA add from shared memory into global memory."""
ROW_SUM_COLUMNS = gl.constexpr(8)
"""The narrowest wgmma: the row sums come from a matmul of dS with this many columns of ones."""
KEYS = gl.constexpr(128)
"""Keys per program."""
HALF = gl.constexpr(64)
"""Keys per consumer warpgroup (one ACP block), and queries per step."""
assert HALF.value == ACP_BLOCK, "a consumer's keys are one ACP block: its query walk stops at that block's QEND"


@gluon.jit
def _walk(QEND, map_row, n0, T, USE_ACP: gl.constexpr):
    """One head's steps of HALF queries from the diagonal (step 0, at query n0): (n_bulk, n_steps, stop_first,
    stop_last). Steps 0 and 1 are the causal diagonal; with ACP a key half keeps its keys for the queries before
    its stop (its ACP block's QEND), so steps [2, n_bulk) keep all keys and [n_bulk, n_steps) one half or none."""
    stop_first = T
    stop_last = T
    if USE_ACP:
        stop_first = gl.minimum(gl.load(QEND + map_row + n0 // HALF) * HALF, T)
        stop_last = gl.minimum(gl.load(QEND + map_row + n0 // HALF + 1) * HALF, T)
    return (stop_first - n0) // HALF, (stop_last - n0) // HALF, stop_first, stop_last


@gluon.jit
def _tile_head(index, ORDER, T, USE_ACP: gl.constexpr):
    """The (batch, key/value head) index of tile `index` of the list the programs share: head by head (with ACP
    in ORDER, launch.acp_map's: the most kept tiles first), each head's keys from the first, whose walk is the
    longest."""
    pid_bh = index // (T // KEYS)
    if USE_ACP:
        pid_bh = gl.load(ORDER + pid_bh)
    return pid_bh


@gluon.jit
def _tile(index, pid_bh, T, H_kv):
    """Tile `index` of head pid_bh (_tile_head): (batch, key/value head, first key)."""
    return pid_bh // H_kv, pid_bh % H_kv, (index % (T // KEYS)) * KEYS


@gluon.jit
def _producer(q_desc, do_desc, k_desc, v_desc, cq_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem, v_smem,
              cq_smem, lse_smem, delta_smem, tile_smem, head_smem, kv_bars, kv_free, q_bars, do_bars, free_bars, QEND,
              ORDER, NEXT, stride_cb, stride_ch, stride_lb, stride_lh, stride_map, T, H_kv, GROUPS, TILES,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, USE_ACP: gl.constexpr, GATE_MMA: gl.constexpr):
    """Takes tiles until none is left: the program's own first, then the next untaken one (the counter NEXT).
    Per tile: its index into tile_smem, its head into head_smem (so that the consumers make no round trip to
    ORDER) and K and V, all into the buffer (of two) that the tile before last has freed, then each head's query
    steps into the slots, a slot once both consumers have freed it (a fresh barrier passes the wait for the phase
    before its first). Then TILES into the next buffer: no tile left."""
    scalar: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    t = 0
    j = 0
    index = gl.program_id(0)
    while index < TILES:
        pid_bh = _tile_head(index, ORDER, T, USE_ACP)
        b, hk, n0 = _tile(index, pid_bh, T, H_kv)
        kb = j % 2
        mbarrier.wait(kv_free.index(kb), ((j // 2) & 1) ^ 1)
        tile_smem.index(kb).store(gl.full([1], index, gl.int32, scalar))
        head_smem.index(kb).store(gl.full([1], pid_bh, gl.int32, scalar))
        mbarrier.expect(kv_bars.index(kb), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        TMA_LOAD(k_desc, [b * T + n0, hk * HEAD_DIM], kv_bars.index(kb), k_smem.index(kb))
        TMA_LOAD(v_desc, [b * T + n0, hk * HEAD_DIM], kv_bars.index(kb), v_smem.index(kb))
        for g in range(GROUPS):
            h = hk * GROUPS + g
            _, n_steps, _, _ = _walk(QEND, (pid_bh * GROUPS + g).to(gl.int64) * stride_map, n0, T, USE_ACP)
            c_row = b * stride_cb + h * stride_ch + n0
            l_row = b * stride_lb + h * stride_lh + n0
            for i in range(n_steps):
                mbarrier.wait(free_bars.index(t % STAGES), ((t // STAGES) & 1) ^ 1)
                _load_q_do(q_desc, do_desc, cq_desc, lse_desc, delta_desc, q_smem, do_smem, cq_smem, lse_smem,
                           delta_smem, q_bars, do_bars, t, True, b * T + n0 + i * HALF, h * HEAD_DIM,
                           h * GATE_COLUMNS if GATE_MMA else c_row + i * HALF, l_row + i * HALF, STAGES, True,
                           GATE_MMA)
                t += 1
        index = gl.num_programs(0) + gl.atomic_add(NEXT, 1, sem="relaxed")
        j += 1
    kb = j % 2
    mbarrier.wait(kv_free.index(kb), ((j // 2) & 1) ^ 1)
    tile_smem.index(kb).store(gl.full([1], TILES, gl.int32, scalar))
    mbarrier.arrive(kv_bars.index(kb))


@gluon.jit
def _steps(first, last, t0, dk, dv, dc, k_half, v_half, k_smem, q_smem, do_smem, cq_smem, lse_smem, delta_smem,
           ds_smem, dq_slot, ones_smem, ones_half, q_bars, do_bars, free_bars, ds_ready, ds_free, dq_desc, b_row,
           offs_n, c_ref, stop, dr_base, n0, q_row, q_col, qk_scale, kg_half, st_layout: gl.constexpr,
           acc_layout: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr,
           CAUSAL: gl.constexpr, PRUNED: gl.constexpr, GATE_MMA: gl.constexpr):
    """Query steps [first, last) of one head for consumer WG (t0: the program's step count at the head's step 0).
    CAUSAL: the diagonal's mask; PRUNED: queries from `stop` on keep none of this half's keys.

    Each step: S^T and dP^T of this half's keys, dv and dk from P^T and dS^T in registers, then dS^T into its
    rows of the step's shared-memory buffer (of two). The dq of the step's queries needs both halves' dS: the
    warpgroups take turns at it (step t: warpgroup t % 2), so that one's dq matmul and its add run while the
    other goes on to the next step. The other half waits for a buffer only two steps later."""
    queries: gl.constexpr = gl.SliceLayout(0, st_layout)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    rs_layout: gl.constexpr = _wgmma_layout(4, ROW_SUM_COLUMNS)
    for i in range(first, last):
        t = t0 + i
        slot = t % STAGES
        phase = (t // STAGES) & 1
        buf = t % 2
        mbarrier.wait(q_bars.index(slot), phase)
        s_tok = warpgroup_mma(k_half, q_smem.index(slot).permute((1, 0)), gl.zeros([HALF, HALF], gl.float32, st_layout),
                              use_acc=False, is_async=True)
        if GATE_MMA:
            s_tok = warpgroup_mma(kg_half, cq_smem.index(slot).permute((1, 0)), s_tok, is_async=True)
        mbarrier.wait(do_bars.index(slot), phase)
        dp_tok = warpgroup_mma(v_half, do_smem.index(slot).permute((1, 0)),
                               gl.zeros([HALF, HALF], gl.float32, st_layout), use_acc=False, is_async=True)
        offs_m = n0 + i * HALF + gl.arange(0, HALF, layout=queries)
        if GATE_MMA:           # the scores hold the gate bias: one FMA per probability
            lse = lse_smem.index(slot).load(queries)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 0))
        else:
            a_col = (cq_smem.index(slot).load(queries) * LOG2E - c_ref) - lse_smem.index(slot).load(queries)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
            p = gl.exp2(s * qk_scale + gl.expand_dims(b_row, 1) + gl.expand_dims(a_col, 0))
        if CAUSAL or PRUNED:
            keep = gl.expand_dims(offs_m < stop, 0)
            if CAUSAL:
                keep = keep & (gl.expand_dims(offs_m, 0) >= gl.expand_dims(offs_n, 1))
            p = gl.where(keep, p, 0.0)
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok,))
        ds = _pack_pairs(p * (dp - gl.expand_dims(delta_smem.index(slot).load(queries), 0)), q_smem.dtype)
        dv = warpgroup_mma(gl.convert_layout(p.to(q_smem.dtype), op_layout), do_smem.index(slot), dv,
                           is_async=True)
        ds_op = gl.convert_layout(ds, op_layout)
        dk = warpgroup_mma(ds_op, q_smem.index(slot), dk, is_async=True)
        dc = warpgroup_mma(ds_op, ones_half.permute((1, 0)), dc, is_async=True)   # dS^T's row sums, 8 times
        mbarrier.wait(ds_free.index(buf), ((t // 2) & 1) ^ 1)   # the dq of step t - 2 has read the buffer
        tma.store_wait(0)                                      # this warpgroup's last add has read its dq slot
        ds_smem.index(buf).slice(WG * HALF, HALF).store(ds)
        fence_async_shared()
        CTA_BARRIER()
        mbarrier.arrive(ds_ready.index(buf))
        dv, dk, dc = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dc))
        mbarrier.arrive(free_bars.index(slot))
        if buf == WG:
            mbarrier.wait(ds_ready.index(buf), (t // 2) & 1)   # the other half's rows too
            ds_step = ds_smem.index(buf).permute((1, 0))       # dS of the step's queries, all keys
            dq = warpgroup_mma(ds_step, k_smem, gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout), use_acc=False,
                               is_async=True)
            rs = warpgroup_mma(ds_step, ones_smem.permute((1, 0)), gl.zeros([HALF, ROW_SUM_COLUMNS], gl.float32,
                                                                            rs_layout), use_acc=False, is_async=True)
            dq, rs = warpgroup_mma_wait(num_outstanding=0, deps=(dq, rs))
            mbarrier.arrive(ds_free.index(buf))
            dq_slot.store(dq)
            fence_async_shared()
            CTA_BARRIER()
            TMA_ADD(dq_desc, [q_row + i * HALF, q_col], dq_slot)
            offs_r = n0 + i * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, rs_layout))
            gl.atomic_add(dr_base + offs_r, gl.max(rs, 1), sem="relaxed")   # its 8 columns are equal
    return dk, dv, dc


@gluon.jit
def _consumer(k_smem, v_smem, q_smem, do_smem, cq_smem, lse_smem, delta_smem, ds_smem, dq_smem, ones_smem, ones_half,
              tile_smem, head_smem, kv_bars, kv_free, q_bars, do_bars, free_bars, ds_ready, ds_free, dq_desc, C, DK,
              DV, DC, DR, QEND, stride_kb, stride_kt, stride_kh, stride_cb, stride_ch, stride_lb, stride_lh, stride_map,
              T, H_kv, GROUPS, TILES, qk_scale, sm_scale, KG, kg_smem, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              USE_ACP: gl.constexpr, WG: gl.constexpr, GATE_MMA: gl.constexpr):
    """Consumer warpgroup WG: per tile, keys [WG*64, WG*64+64) of it, and the dq of every other step. Per head: the
    two diagonal steps, the bulk, and with ACP the steps that keep one half's keys or none. Once done with the
    tile's K and V it frees their buffer, then stores dk and dv while the next tile's loads are under way. The
    producer's tiles come through tile_smem, each with its K and V; TILES ends the walk."""
    st_layout: gl.constexpr = _wgmma_layout(4, HALF)
    acc_layout: gl.constexpr = _wgmma_layout(4, HEAD_DIM)
    keys: gl.constexpr = gl.SliceLayout(1, st_layout)
    rs_layout: gl.constexpr = _wgmma_layout(4, ROW_SUM_COLUMNS)
    acc_rows: gl.constexpr = gl.SliceLayout(1, acc_layout)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    dq_slot = dq_smem.index(WG)
    scalar: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    t0 = 0
    j = 0
    mbarrier.wait(kv_bars.index(0), 0)
    index = gl.max(tile_smem.index(0).load(scalar), 0)
    while index < TILES:
        pid_bh = gl.max(head_smem.index(j % 2).load(scalar), 0)
        b, hk, n0 = _tile(index, pid_bh, T, H_kv)
        kb = j % 2
        k_tile = k_smem.index(kb)
        v_tile = v_smem.index(kb)
        offs_n = n0 + WG * HALF + gl.arange(0, HALF, layout=keys)
        dk = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
        for g in range(GROUPS):
            h = hk * GROUPS + g
            n_bulk, n_steps, stop_first, stop_last = _walk(QEND, (pid_bh * GROUPS + g).to(gl.int64) * stride_map,
                                                           n0, T, USE_ACP)
            stop = stop_first
            if WG == 1:
                stop = stop_last
            c_base = C + b.to(gl.int64) * stride_cb + h.to(gl.int64) * stride_ch
            c_ref = gl.load(c_base + n0) * LOG2E
            b_row = c_ref - gl.load(c_base + offs_n) * LOG2E
            kg_half = kg_smem.index(WG)
            if GATE_MMA:      # this head's k_gate rows of the half's keys, for its steps' score matmuls
                gate_rows: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
                r = b * T + n0 + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, gate_rows))
                col = h * GATE_COLUMNS + gl.arange(0, GATE_COLUMNS, layout=gl.SliceLayout(0, gate_rows))
                kg_half.store(gl.load(KG + gl.expand_dims(r.to(gl.int64) * (H_kv * GROUPS * GATE_COLUMNS), 1)
                                      + gl.expand_dims(col, 0)))
                fence_async_shared()
                CTA_BARRIER()
            dr_base = DR + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh
            dc = gl.zeros([HALF, ROW_SUM_COLUMNS], gl.float32, rs_layout)
            walk = (k_tile.slice(WG * HALF, HALF), v_tile.slice(WG * HALF, HALF), k_tile, q_smem, do_smem, cq_smem,
                    lse_smem, delta_smem, ds_smem, dq_slot, ones_smem, ones_half, q_bars, do_bars, free_bars, ds_ready,
                    ds_free, dq_desc, b_row, offs_n, c_ref, stop, dr_base, n0, b * T + n0, h * HEAD_DIM, qk_scale,
                    kg_half)
            dk, dv, dc = _steps(0, 2, t0, dk, dv, dc, *walk, st_layout, acc_layout, HEAD_DIM, STAGES, WG, True,
                                USE_ACP, GATE_MMA)
            dk, dv, dc = _steps(2, gl.maximum(n_bulk, 2), t0, dk, dv, dc, *walk, st_layout, acc_layout, HEAD_DIM,
                                STAGES, WG, False, False, GATE_MMA)
            if USE_ACP:
                dk, dv, dc = _steps(gl.maximum(n_bulk, 2), n_steps, t0, dk, dv, dc, *walk, st_layout, acc_layout,
                                    HEAD_DIM, STAGES, WG, False, True, GATE_MMA)
            offs_dc = n0 + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, rs_layout))
            gl.store(DC + b.to(gl.int64) * stride_cb + h.to(gl.int64) * stride_ch + offs_dc, -gl.max(dc, 1))
            t0 += n_steps
        mbarrier.arrive(kv_free.index(kb))
        offs_na = n0 + WG * HALF + gl.arange(0, HALF, layout=acc_rows)
        rows = gl.expand_dims(offs_na, 1) * stride_kt + gl.expand_dims(offs_d, 0)
        base = b.to(gl.int64) * stride_kb + hk.to(gl.int64) * stride_kh
        gl.store(DK + base + rows, (dk * sm_scale).to(DK.dtype.element_ty))
        gl.store(DV + base + rows, dv.to(DV.dtype.element_ty))
        j += 1
        mbarrier.wait(kv_bars.index(j % 2), (j // 2) & 1)
        index = gl.max(tile_smem.index(j % 2).load(scalar), 0)
    tma.store_wait(0)


@gluon.jit
def _attn_bwd_fused(q_desc, do_desc, k_desc, v_desc, dq_desc, cq_desc, lse_desc, delta_desc, C, DK, DV, DC, DR, QEND,
                    ORDER, NEXT, stride_kb, stride_kt, stride_kh, stride_cb, stride_ch, stride_lb, stride_lh,
                    stride_map, T, H_kv, GROUPS, TILES, qk_scale, sm_scale, KG, HEAD_DIM: gl.constexpr,
                    STAGES: gl.constexpr, USE_ACP: gl.constexpr, GATE_MMA: gl.constexpr, num_warps: gl.constexpr):
    """Persistent: P programs (one per SM) take _tile's list in turn, each its own first tile and then the next
    untaken one (NEXT counts those taken after the first P, from 0), so that one with long walks takes fewer."""
    gl.static_assert(num_warps == 4)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2, KEYS, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2, KEYS, HEAD_DIM], v_desc.layout)
    q_smem, do_smem, cq_smem, lse_smem, delta_smem, q_bars, do_bars = _query_slots(q_desc, do_desc, HALF, HEAD_DIM,
                                                                                  STAGES)
    gate_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, GATE_COLUMNS], gl.bfloat16)
    kg_smem = gl.allocate_shared_memory(gl.bfloat16, [2, HALF, GATE_COLUMNS], gate_layout)   # fp16 q too
    if GATE_MMA:        # the queries' q_gate rows come by TMA in the cumsums' place (cq_desc)
        cq_smem = gl.allocate_shared_memory(cq_desc.dtype, [STAGES, HALF, GATE_COLUMNS], cq_desc.layout)
    ds_smem = gl.allocate_shared_memory(q_desc.dtype, [2, KEYS, HALF],
                                        gl.NVMMASharedLayout.get_default_for([KEYS, HALF], q_desc.dtype))
    dq_smem = gl.allocate_shared_memory(dq_desc.dtype, [2, HALF, HEAD_DIM], dq_desc.layout)
    ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROW_SUM_COLUMNS, KEYS], q_desc.dtype)
    ones_smem = gl.allocate_shared_memory(q_desc.dtype, [ROW_SUM_COLUMNS, KEYS], ones_layout)
    ones_smem.store(gl.full([ROW_SUM_COLUMNS, KEYS], 1.0, q_desc.dtype,
                            gl.BlockedLayout([1, 4], [ROW_SUM_COLUMNS, 32 // ROW_SUM_COLUMNS], [1, num_warps], [1, 0])))
    half_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROW_SUM_COLUMNS, HALF], q_desc.dtype)
    ones_half = gl.allocate_shared_memory(q_desc.dtype, [ROW_SUM_COLUMNS, HALF], half_layout)
    ones_half.store(gl.full([ROW_SUM_COLUMNS, HALF], 1.0, q_desc.dtype,
                            gl.BlockedLayout([1, 4], [ROW_SUM_COLUMNS, 32 // ROW_SUM_COLUMNS], [1, num_warps], [1, 0])))
    tile_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    head_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    kv_bars = _barriers(2, 1)
    kv_free = _barriers(2, 2)       # both consumers
    free_bars = _barriers(STAGES, 2)
    ds_ready = _barriers(2, 2)
    ds_free = _barriers(2, 1)       # the step's dq
    fence_async_shared()
    CTA_BARRIER()

    gl.warp_specialize([
        (_consumer, (k_smem, v_smem, q_smem, do_smem, cq_smem, lse_smem, delta_smem, ds_smem, dq_smem, ones_smem,
                    ones_half, tile_smem, head_smem, kv_bars, kv_free, q_bars, do_bars, free_bars, ds_ready, ds_free,
                    dq_desc, C, DK, DV, DC, DR, QEND, stride_kb, stride_kt, stride_kh, stride_cb, stride_ch, stride_lb,
                    stride_lh, stride_map, T, H_kv, GROUPS, TILES, qk_scale, sm_scale, KG, kg_smem, HEAD_DIM, STAGES,
                    USE_ACP, 0, GATE_MMA)),
        (_consumer, (k_smem, v_smem, q_smem, do_smem, cq_smem, lse_smem, delta_smem, ds_smem, dq_smem, ones_smem,
                    ones_half, tile_smem, head_smem, kv_bars, kv_free, q_bars, do_bars, free_bars, ds_ready, ds_free,
                    dq_desc, C, DK, DV, DC, DR, QEND, stride_kb, stride_kt, stride_kh, stride_cb, stride_ch, stride_lb,
                    stride_lh, stride_map, T, H_kv, GROUPS, TILES, qk_scale, sm_scale, KG, kg_smem, HEAD_DIM, STAGES,
                    USE_ACP, 1, GATE_MMA)),
        (_producer, (q_desc, do_desc, k_desc, v_desc, cq_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem, v_smem,
                     cq_smem, lse_smem, delta_smem, tile_smem, head_smem, kv_bars, kv_free, q_bars, do_bars,
                     free_bars, QEND, ORDER, NEXT, stride_cb, stride_ch, stride_lb, stride_lh, stride_map, T, H_kv,
                     GROUPS, TILES, HEAD_DIM, STAGES, USE_ACP, GATE_MMA)),
    ], [4, 1], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])

    for i in gl.static_range(2):
        mbarrier.invalidate(kv_bars.index(i))
        mbarrier.invalidate(kv_free.index(i))
        mbarrier.invalidate(ds_ready.index(i))
        mbarrier.invalidate(ds_free.index(i))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(q_bars.index(i))
        mbarrier.invalidate(do_bars.index(i))
        mbarrier.invalidate(free_bars.index(i))


def supported(q, k, v) -> bool:
    """Whether the inputs are in this kernel's scope (the module docstring)."""
    return q.shape[-1] == 64 and _gluon.supported(q, k, v, KEYS.value)


def backward(q, k, v, c, do, lse, delta, dk, dv, dc, dq_sum, dr, qk_scale: float, sm_scale: float, stages: int,
             acp=None, gate_mma: bool = False) -> None:
    """Fill dk, dv and the column sums dc (negated), and add dq / sm_scale into dq_sum (fp32, laid out as q) and
    the row sums into dr (like lse), both zero before; delta as _bwd._attn_bwd_delta writes it. With ACP's
    launch.AcpMap if given."""
    batch, time, heads, dim = q.shape
    heads_kv = k.shape[2]
    qend, order, stride_map = (acp.qend, acp.order[batch * heads:], acp.qend.stride(0)) if acp else (q, q, 0)
    keys, step = KEYS.value, HALF.value
    tiles = time // keys * batch * heads_kv
    next_tile = _gluon.work_counter(q.device)
    q_gate, k_gate = _gluon.gate_operands(c, qk_scale) if gate_mma else (None, q)
    _attn_bwd_fused[(min(tiles, _gluon.processors(q.device)),)](
        _descriptor(q, step), _descriptor(do, step), _descriptor(k, keys), _descriptor(v, keys),
        _descriptor(dq_sum, step), _descriptor(q_gate, step) if gate_mma else _vector_descriptor(c, step),
        _vector_descriptor(lse, step), _vector_descriptor(delta, step), c, dk, dv, dc, dr, qend, order, next_tile,
        dk.stride(0), dk.stride(1), dk.stride(2), c.stride(0), c.stride(1), lse.stride(0), lse.stride(1), stride_map,
        time, heads_kv, heads // heads_kv, tiles, qk_scale, sm_scale, k_gate, HEAD_DIM=dim, STAGES=stages,
        USE_ACP=acp is not None, GATE_MMA=gate_mma, num_warps=4)
