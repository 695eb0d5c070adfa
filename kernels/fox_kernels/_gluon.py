"""Hopper Forgetting Attention kernels in Gluon (sm_90: TMA, mbarriers, asynchronous wgmma): the forward, and the
backward's dq and dk/dv kernels.

Why Gluon: Triton's `tl.dot` waits for each wgmma before its result is used, so in the tile loop the tensor
cores idle during the softmax and the exp2 units idle during the matmuls (the compiled loop of _fwd.py:
issue q.k, wait, exp2, issue p.v). Gluon exposes the wait, so the loop here overlaps them the way
FlashAttention-3 does within a warpgroup: tile j's q.k and tile j-1's p.v are both in flight while tile j's
scores wait for q.k alone, and the p.v result is waited for only after tile j's softmax:

    issue S_j = q k_j^T;  issue O += P_{j-1} v_{j-1};  wait S_j;  softmax(S_j) -> P_j, alpha_j;  wait O;  O *= alpha_j

Key and value tiles arrive by TMA into STAGES shared-memory slots, refilled as soon as their p.v is done.
Scores and the stored log-sum-exp are those of _fwd.py (log2 domain, the gate bias taken relative to c at the
tile's first row, here c_ref log2(e) - c_j log2(e) in one FMA per key), so the backward kernels read this
kernel's lse unchanged.

The backward kernels overlap the same way: the scores and dP (dq kernel: S = q k^T and dO v^T; dk/dv kernel:
their transposes) are in flight together and the exp2s wait for the scores alone; in dk/dv, dv += P^T dO runs
while dS^T waits for dP^T. They compute what _bwd.py's kernels do (dq with delta and the row sums dr; dk, dv and
the column sums dc) and, like them, use no floating-point atomics.

The forward, dense and ACP, has the tensor cores add the gate bias (GATE_MMA, launch.GLUON_FWD_GATE_MMA) through
16 more columns of q and k (gate_operands), and the loop computes each probability with one FMA and one exp2. At
D=64 the dense forward rescales O lazily (FlashAttention-4's conditional rescaling, launch.GLUON_FWD_LAZY_RESCALE):
the running max moves only where a warp's scores rose well above it, and the other tiles skip O's multiplies.

The forward is warp-specialised (_attn_fwd_split, launch.GLUON_FWD's 4n+1-warp tiles): consumer warpgroups of 64
query rows (four at D=64, two at D=128, one program per SM) share key/value slots that a producer warp fills, so
that the consumers' loop holds no TMA issue and no CTA barrier; at D=128 they hold Q in registers
(launch.GLUON_FWD_Q_REGISTERS). Where T is not a multiple of its tile, _attn_fwd_hopper's (launch.GLUON_FWD_SHORT)
runs: at D=128 with persistent programs (launch.GLUON_FWD_PERSISTENT, two per SM taking query tiles from a
counter, the next tile's key/value loads during one's epilogue); its epilogue writes O by TMA from Q's slot.
Off (slower on an H200, docs/PERFORMANCE.md): persistent dq programs (launch.GLUON_DQ_PERSISTENT), as that
forward's. Where launch.GLUON_FUSED_BWD has the head dim, _gluon_fused's one warp-specialised kernel replaces the
dq and dk/dv kernels here.

With ACP each kernel walks only the kept tiles: the forward and dq kernels start their key walk at the query
tile's first kept key (START), the dk/dv kernel stops its query walk at the key tile's QEND, and the heads launch
in ACP's order (the most kept tiles first). At the launcher's tiles (a query tile within one ACP block, a key
tile one block) no tile is pruned in part, so the loops are the dense ones; larger tiles mask the partly pruned
ones (PARTIAL).

Scope (launch.py checks it and runs the portable kernels otherwise): no varlen, T_q == T_k a multiple of the
tiles, q/k/v (and dO) rows of H*D contiguous elements.
"""

import functools

import torch
import triton
import triton.language as tl
from triton import constexpr_function
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .reference import ACP_BLOCK

LOG2E = tl.constexpr(1.4426950408889634)
TMA_LOAD = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
"""The TMA copy into shared memory: Triton 3.9 names it async_load, 3.6 async_copy_global_to_shared."""
CTA_BARRIER = getattr(gl, "barrier", None) or gl.thread_barrier
"""bar.sync of the program's warps: gl.barrier in Triton 3.9, gl.thread_barrier in 3.6."""
TMA_STORE = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
"""The TMA copy from shared memory into global memory: async_store in Triton 3.9, async_copy_shared_to_global in
3.6."""


VECTOR_LAYOUT = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1))
"""Shared memory of the per-tile fp32 vectors (gate cumsums, lse, delta) that arrive by TMA."""


@constexpr_function
def _wgmma_layout(num_warps, columns):
    """The layout of a wgmma result `columns` wide, its rows split over num_warps warps (4 per warpgroup)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, columns, 16])


@gluon.jit
def _load_kv(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, row, col, c_row, tile, n_tiles,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, BY_TMA: gl.constexpr, GATE_MMA: gl.constexpr = False,
             slot=None):
    """Start the TMA copies of key/value tile `tile` (if it exists) into its slot; BY_TMA: also its keys' gate
    cumsums (from c_row, the walk's first key in C), with the keys (_vector); GATE_MMA: instead the keys' gate
    operand (c_desc over gate_operands' k_gate, c_row its column), with the keys. slot: the tile's, where the
    caller counts it."""
    if slot is None:
        slot = tile % STAGES
    exists = tile < n_tiles
    if GATE_MMA:
        mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes + c_desc.block_type.nbytes, pred=exists)
        TMA_LOAD(c_desc, [row + tile * BLOCK_N, c_row], k_bars.index(slot), c_smem.index(slot), pred=exists)
    elif BY_TMA:
        mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes + c_desc.block_type.nbytes, pred=exists)
        TMA_LOAD(c_desc, [c_row + tile * BLOCK_N], k_bars.index(slot), c_smem.index(slot), pred=exists)
    else:
        mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes, pred=exists)
    TMA_LOAD(k_desc, [row + tile * BLOCK_N, col], k_bars.index(slot), k_smem.index(slot), pred=exists)
    mbarrier.expect(v_bars.index(slot), v_desc.block_type.nbytes, pred=exists)
    TMA_LOAD(v_desc, [row + tile * BLOCK_N, col], v_bars.index(slot), v_smem.index(slot), pred=exists)


@gluon.jit
def _vector(smem, slot, base, offs, BY_TMA: gl.constexpr):
    """A tile's fp32 vector over keys or queries (gate cumsums, lse, delta) at base + offs: BY_TMA from the
    shared-memory slot its TMA copy filled with the tile (a global load in the loop stalls the exp2s that need
    it), else loaded from global memory (where the forward's shared-memory traffic is the tighter limit)."""
    return smem.index(slot).load(offs.type.layout) if BY_TMA else gl.load(base + offs)


@gluon.jit
def _vector_slots(STAGES: gl.constexpr, BLOCK: gl.constexpr):
    """STAGES shared-memory slots for a per-tile fp32 vector that arrives by TMA (_vector_descriptor's layout;
    a kernel that loads its vectors from global memory leaves them unused, and they take no memory)."""
    return gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK], VECTOR_LAYOUT)


@gluon.jit
def _scores(qk, c_k, c_ref, offs_m, start_row, tile, qk_scale, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
            MASKED: gl.constexpr, PARTIAL: gl.constexpr):
    """Scores of key tile `tile` (c_k: its keys' gate cumsums); masked: causal and, where ACP prunes tiles in part,
    from each row's first kept key (start_row)."""
    s = qk * qk_scale + gl.expand_dims(c_ref - c_k * LOG2E, 0)  # one FMA per key (c_ref: times log2 e)
    if MASKED:
        s = _masked(s, offs_m, start_row, tile, s_layout, BLOCK_N, PARTIAL)
    return s


@gluon.jit
def _masked(s, offs_m, start_row, tile, s_layout: gl.constexpr, BLOCK_N: gl.constexpr, PARTIAL: gl.constexpr):
    """Scores s of key tile `tile`, -inf where masked: causal and, where ACP prunes tiles in part, before each
    row's first kept key (start_row)."""
    offs_n = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    keep = gl.expand_dims(offs_m, 1) >= gl.expand_dims(offs_n, 0)
    if PARTIAL:
        keep = keep & (gl.expand_dims(offs_n, 0) >= gl.expand_dims(start_row, 1))
    return gl.where(keep, s, float("-inf"))


RESCALE_SLACK = gl.constexpr(8.0)
"""How far (in log2 units) a row's scores may rise above its running max before the tile moves the max and
rescales what came before: probabilities up to 2^8, which bf16/fp16 P and the fp32 sums hold. Between moves alpha
is exactly 1 and _rescaled skips the multiplies (FlashAttention-4's conditional rescaling)."""


@constexpr_function
def _rescale_ahead(dtype):
    """How far past its rows' maxima a warp sets the running max when it moves it (log2 units; _lazy_max): with
    bf16 P 8, so that the next move comes after 16 of drift, not 8 (the probabilities then span 2^-8 to 2^8 of
    the max, which bf16's exponent holds); with fp16 P, whose subnormals start at 2^-14, none."""
    return 8.0 if dtype == gl.bfloat16 else 0.0


@gluon.jit
def _warp_any(flags):
    """Per row (two per thread: a wgmma result's rows r and r + 8), whether any row of the warp's 16 has its flag
    (int32, nonzero) set: the same answer in every row of the warp."""
    return gl.inline_asm_elementwise(
        "{ .reg .pred wa_a, wa_b; setp.ne.b32 wa_a, $2, 0; setp.ne.b32 wa_b, $3, 0; or.pred wa_a, wa_a, wa_b; "
        "vote.sync.any.pred wa_a, wa_a, 0xffffffff; selp.b32 $0, 1, 0, wa_a; mov.b32 $1, $0; }",
        "=r,=r,r,r", [flags], dtype=gl.int32, is_pure=True, pack=2)


@gluon.jit
def _lazy_max(m_i, m_tile, slack, ahead):
    """The running max after a tile with row maxima m_tile (slack and ahead: RESCALE_SLACK and _rescale_ahead in
    m's units). It moves only in a warp where some row's scores rose more than slack above it, and there for
    every row, to the row's max plus ahead: the warp's rows then move together, and _rescaled, which branches
    once per warp, skips the multiplies on more tiles (with sharp gates, rows moving one by one made nearly
    every warp rescale on most tiles)."""
    gl.static_assert(m_tile.shape[0] == 16 * gl.num_warps())
    moved = _warp_any((m_tile - m_i > slack).to(gl.int32))
    return gl.where(moved != 0, gl.maximum(m_i, m_tile) + ahead, m_i)


@gluon.jit
def _running_max(m_i, m_tile, slack, ahead, LAZY: gl.constexpr):
    """The running max after a tile with row maxima m_tile: _lazy_max's where LAZY, else the plain maximum."""
    return _lazy_max(m_i, m_tile, slack, ahead) if LAZY else gl.maximum(m_i, m_tile)


@constexpr_function
def _rescale_asm(elements):
    """PTX for _rescaled over a thread's `elements` accumulator registers ($0.., tied to the inputs) and their
    rows' alpha ($2n..): the warp multiplies only if one of its rows moved its max. Registers 0 and 2 of a wgmma
    accumulator are rows r and r + 8 of the warp's 16 (PTX's fragment layout), so they cover all its rows."""
    first = 2 * elements
    muls = "".join(f"mul.f32 ${i}, ${i}, ${first + i};" for i in range(elements))
    return ("{ .reg .pred rs_a, rs_b; "
            f"setp.neu.f32 rs_a, ${first}, 0f3F800000; setp.neu.f32 rs_b, ${first + 2}, 0f3F800000; "
            "or.pred rs_a, rs_a, rs_b; vote.sync.any.pred rs_a, rs_a, 0xffffffff; @!rs_a bra.uni RS_DONE; "
            f"{muls} RS_DONE: }}")


@constexpr_function
def _rescale_constraints(elements):
    """_rescale_asm's operands: the products into the accumulator's own registers (each output tied to its input,
    so that a warp that skips leaves them as they are), then the alphas."""
    return ",".join(["=r"] * elements + [str(i) for i in range(elements)] + ["r"] * elements)


@gluon.jit
def _rescaled(acc, alpha, o_layout: gl.constexpr, LAZY: gl.constexpr):
    """acc * alpha (per row); LAZY: in one branch per warp that skips the multiplies where every alpha of the
    warp's rows is 1 (_lazy_max). One accumulator row block of 16 per warp, as _rescale_asm assumes."""
    scale = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    if not LAZY:
        return acc * scale
    gl.static_assert(acc.shape[0] == 16 * gl.num_warps())
    elements: gl.constexpr = acc.shape[1] // 2
    return gl.inline_asm_elementwise(_rescale_asm(elements), _rescale_constraints(elements), [acc, scale],
                                     dtype=gl.float32, is_pure=True, pack=elements)


@gluon.jit
def _softmax_step(qk, m_i, l_i, c_k, c_ref, offs_m, start_row, tile, qk_scale, ahead, s_layout: gl.constexpr,
                  BLOCK_N: gl.constexpr, MASKED: gl.constexpr, PARTIAL: gl.constexpr, LAZY: gl.constexpr):
    """The online softmax over key tile `tile`: its probabilities (against the new running max; LAZY:
    _lazy_max's), the factor alpha that rescales what came before, and the new running max and sum."""
    s = _scores(qk, c_k, c_ref, offs_m, start_row, tile, qk_scale, s_layout, BLOCK_N, MASKED, PARTIAL)
    m_new = _running_max(m_i, gl.max(s, 1), RESCALE_SLACK, ahead, LAZY)
    p_f = gl.exp2(s - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p_f, alpha, m_new, l_i * alpha + gl.sum(p_f, 1)


GATE_COLUMNS = gl.constexpr(16)
"""Columns of gate_operands' q_gate and k_gate: three bf16 parts of each gate cumsum and three ones, padded to one
wgmma K step."""


@gluon.jit
def _gated_softmax(x, m_i, l_i, offs_m, start_row, tile, qk_scale, slack, ahead, s_layout: gl.constexpr,
                   BLOCK_N: gl.constexpr, MASKED: gl.constexpr, PARTIAL: gl.constexpr, LAZY: gl.constexpr):
    """_softmax_step over scores x that hold the gate bias (GATE_MMA), in units of 1 / qk_scale: the max is taken
    before scaling, so that each probability is one FMA and one exp2; m_i stays in x's units, and so do slack and
    ahead (_lazy_max's over qk_scale)."""
    if MASKED:
        x = _masked(x, offs_m, start_row, tile, s_layout, BLOCK_N, PARTIAL)
    m_new = _running_max(m_i, gl.max(x, 1), slack, ahead, LAZY)
    p_f = gl.exp2(x * qk_scale - gl.expand_dims(m_new * qk_scale, 1))
    alpha = gl.exp2((m_i - m_new) * qk_scale)
    return p_f, alpha, m_new, l_i * alpha + gl.sum(p_f, 1)


@gluon.jit
def _pack_pairs(x, dtype: gl.constexpr):
    """x (fp32, a wgmma result's layout) in dtype (bf16 or fp16), two neighbouring columns per cvt.rn.*x2: the
    compiler's own conversion packs them in the other order and swaps the halves back, one PRMT per pair."""
    convert: gl.constexpr = "cvt.rn.f16x2.f32 $0, $2, $1;" if dtype == gl.float16 else "cvt.rn.bf16x2.f32 $0, $2, $1;"
    return gl.inline_asm_elementwise(convert, "=r,r,r", [x], dtype=dtype.value, is_pure=True, pack=2)


@gluon.jit
def _tiles(first, last, p, acc, m_i, l_i, q_smem, qg_smem, k_smem, v_smem, c_smem, k_bars, v_bars, k_desc, v_desc,
           c_desc, kv_row, kv_col, c_row, n_tiles, ring, c_base, c_ref, offs_m, start_row, qk_scale,
           s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr, BLOCK_M: gl.constexpr,
           BLOCK_N: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr, PARTIAL: gl.constexpr,
           BY_TMA: gl.constexpr, GATE_MMA: gl.constexpr, LAZY_RESCALE: gl.constexpr, free_bars=None):
    """Key tiles [first, last), each after at least one other (p holds the previous tile's probabilities); ring:
    the slot ring's position at the walk's tile 0 (a persistent program's tiles of earlier items). GATE_MMA: the
    scores are q.k plus q_gate.k_gate (c_smem's slots), two wgmmas into one accumulator; LAZY_RESCALE: the
    running max moves only where _lazy_max moves it. free_bars: a producer warp refills the slots (_split_producer),
    and the loop only says when a slot's p.v is done; else it starts the refill's TMA copies itself."""
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    units = qk_scale if GATE_MMA else 1.0  # _lazy_max's slack and ahead in the scores' units
    slack = RESCALE_SLACK / units
    ahead = _rescale_ahead(q_smem.dtype) / units
    slot = (ring + first) % STAGES         # slots and barrier phases counted along, not divided out per tile
    phase = ((ring + first) // STAGES) & 1
    prev = (ring + first - 1) % STAGES
    prev_phase = ((ring + first - 1) // STAGES) & 1
    for tile in range(first, last):
        mbarrier.wait(k_bars.index(slot), phase)
        s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        if GATE_MMA:
            s_tok = warpgroup_mma(qg_smem, c_smem.index(slot).permute((1, 0)), s_tok, is_async=True)
        mbarrier.wait(v_bars.index(prev), prev_phase)
        acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
        if GATE_MMA:
            p_f, alpha, m_i, l_i = _gated_softmax(qk, m_i, l_i, offs_m, start_row, tile, qk_scale, slack, ahead,
                                                  s_layout, BLOCK_N, MASKED, PARTIAL, LAZY_RESCALE)
        else:
            c_k = _vector(c_smem, slot, c_base, tile * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout)),
                          BY_TMA)
            p_f, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, c_k, c_ref, offs_m, start_row, tile, qk_scale, ahead,
                                                 s_layout, BLOCK_N, MASKED, PARTIAL, LAZY_RESCALE)
        if free_bars is None:
            acc = _rescaled(warpgroup_mma_wait(num_outstanding=0, deps=(acc,)), alpha, o_layout, LAZY_RESCALE)
            _load_kv(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, kv_row, kv_col, c_row,
                     tile - 1 + STAGES, n_tiles, BLOCK_N, STAGES, BY_TMA, GATE_MMA, prev)
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(free_bars.index(prev))
            acc = _rescaled(acc, alpha, o_layout, LAZY_RESCALE)
        p = gl.convert_layout(_pack_pairs(p_f, q_smem.dtype), p_layout)
        prev = slot
        prev_phase = phase
        wrap = (slot == STAGES - 1).to(gl.int32)
        slot = slot + 1 - STAGES * wrap
        phase = phase ^ wrap
    return p, acc, m_i, l_i


@gluon.jit
def _first_tile(q, qg, k_smem, c_smem, slot, c_walk, c_ref, offs_m, start_row, tile, qk_scale,
                s_layout: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PARTIAL: gl.constexpr,
                BY_TMA: gl.constexpr, GATE_MMA: gl.constexpr):
    """A walk's first key tile, `tile` of the walk in `slot` (its p.v is issued with the next tile's q.k, in
    _tiles): its probabilities and the running max and sum they start, as _tiles' steps compute them."""
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    if GATE_MMA:
        s_tok = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        s_tok = warpgroup_mma(qg, c_smem.index(slot).permute((1, 0)), s_tok, is_async=True)
        s = _masked(warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,)), offs_m, start_row, tile, s_layout, BLOCK_N,
                    PARTIAL)
    else:
        qk = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zero, use_acc=False)
        c_k = _vector(c_smem, slot, c_walk, tile * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout)),
                      BY_TMA)
        s = _scores(qk, c_k, c_ref, offs_m, start_row, tile, qk_scale, s_layout, BLOCK_N, True, PARTIAL)
    m_i = gl.max(s, 1)
    if PARTIAL:                                          # a row may keep no key of the first tile
        m_i = gl.maximum(m_i, -1.0e30)
    p_f = gl.exp2(s * qk_scale - gl.expand_dims(m_i * qk_scale, 1)) if GATE_MMA else gl.exp2(s - gl.expand_dims(m_i, 1))
    return p_f, m_i, gl.sum(p_f, 1)


@gluon.jit
def _last_pv(p, acc, v_smem, v_bars, tile, STAGES: gl.constexpr):
    """The walk's last p.v (walk tile `tile`, counted along the slot ring), done."""
    mbarrier.wait(v_bars.index(tile % STAGES), (tile // STAGES) & 1)
    acc = warpgroup_mma(p, v_smem.index(tile % STAGES), acc, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc,))


@gluon.jit
def _barriers(N: gl.constexpr, COUNT: gl.constexpr):
    """N mbarriers in shared memory, each initialised to complete a phase after COUNT arrivals."""
    bars = gl.allocate_shared_memory(gl.int64, [N, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(N):
        mbarrier.init(bars.index(i), count=COUNT)
    return bars


@gluon.jit
def _kv_slots(k_desc, v_desc, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
    """STAGES shared-memory slots for key and value tiles and the keys' gate cumsums, each with the barrier its
    TMA copy arrives on (the cumsums, where they come by TMA, arrive with the keys)."""
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    c_smem = _vector_slots(STAGES, BLOCK_N)
    return k_smem, v_smem, c_smem, _barriers(STAGES, 1), _barriers(STAGES, 1)


@gluon.jit
def _query_slots(q_desc, do_desc, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
    """STAGES shared-memory slots for query and dO tiles of ROWS rows and the queries' gate cumsums, lse and delta
    (the backward's key-tile programs), with the barriers the TMA copies arrive on: the queries' (with their
    cumsums and lse) and dO's (with delta), initialised."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, ROWS, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES, ROWS, HEAD_DIM], do_desc.layout)
    cq_smem = _vector_slots(STAGES, ROWS)
    lse_smem = _vector_slots(STAGES, ROWS)
    delta_smem = _vector_slots(STAGES, ROWS)
    return q_smem, do_smem, cq_smem, lse_smem, delta_smem, _barriers(STAGES, 1), _barriers(STAGES, 1)


@gluon.jit
def _program_tile(ORDER, H, HEAD_GROUP, USE_ACP: gl.constexpr, pid=None, n_tiles=None, n_heads=None):
    """This program's (sequence-head index, batch, head, rank) from the grid (tiles of a head, heads), rank 0 for
    the head's longest tile; or, for a persistent program, those of work item pid of n_heads heads' n_tiles tiles
    each, in the same order. GPUs start programs in grid order; it goes through the heads HEAD_GROUP at a time
    and through each group's tiles longest first, so that the grid ends on short tiles, not on the last head's
    long ones, while a group's keys stay in L2. With ACP the heads go in ORDER (launch.acp_map: the most kept
    tiles first)."""
    if pid is None:
        n_tiles = gl.num_programs(0)
        n_heads = gl.num_programs(1)
        pid = gl.program_id(1) * n_tiles + gl.program_id(0)
    first_head = pid // (HEAD_GROUP * n_tiles) * HEAD_GROUP
    heads = gl.minimum(HEAD_GROUP, n_heads - first_head)
    in_group = pid - first_head * n_tiles
    pid_bh = first_head + in_group % heads
    if USE_ACP:
        pid_bh = gl.load(ORDER + pid_bh)
    return pid_bh, pid_bh // H, pid_bh % H, in_group // heads


@constexpr_function
def _partial_tiles(use_acp, block_m, acp_block):
    """Whether a query tile may keep only part of a key tile (forward, dq): with ACP, where it spans two blocks."""
    return use_acp and block_m > acp_block


@gluon.jit
def _query_walk(ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, rows: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, ACP_BLOCK: gl.constexpr, USE_ACP: gl.constexpr,
                item=None, n_heads=None):
    """This program's query tile (or a persistent program's work item `item` of n_heads heads' tiles) and its key
    walk (forward and dq): (b, h, m0, kv_row, kv_col, offs_m, lo, n_partial, n_bulk, n_tiles, start_row), offs_m
    and start_row for the tile's rows. Programs take the longest rows first and, with ACP, the heads in ORDER
    (launch.acp_map: the most kept tiles first); kv_row is the batch's first key row, kv_col its key column.

    The walk starts at key lo (0, or with ACP the first kept key of the tile's first ACP block, rounded down to a
    multiple of BLOCK_N) and counts tiles from there: [0, n_partial) are tiles ACP prunes for some rows (masked),
    [n_partial, n_bulk) the unmasked bulk, [n_bulk, n_tiles) the masked diagonal. Such partly pruned tiles exist
    only where a query tile spans two ACP blocks (_partial_tiles), and only there may a key tile span two;
    start_row: each row's first kept key, relative to lo, from the START of its block. Otherwise the walk is the
    dense one, shorter."""
    PARTIAL: gl.constexpr = _partial_tiles(USE_ACP, BLOCK_M, ACP_BLOCK)
    gl.static_assert((not USE_ACP or ACP_BLOCK % BLOCK_N == 0 or PARTIAL) and BLOCK_M <= 2 * ACP_BLOCK)
    q_tiles = gl.num_programs(0) if item is None else T // BLOCK_M
    pid_bh, b, h, rank = _program_tile(ORDER, H, HEAD_GROUP, USE_ACP, item, q_tiles, n_heads)
    m0 = (q_tiles - 1 - rank) * BLOCK_M
    offs_m = m0 + gl.arange(0, BLOCK_M, layout=rows)
    lo = 0
    n_partial = 0
    start_row = offs_m
    if USE_ACP:
        map_base = START + pid_bh.to(gl.int64) * stride_map
        start_first = gl.load(map_base + m0 // ACP_BLOCK) * ACP_BLOCK
        lo = start_first // BLOCK_N * BLOCK_N
        if PARTIAL:
            start_last = gl.load(map_base + (m0 + BLOCK_M - 1) // ACP_BLOCK) * ACP_BLOCK
            n_partial = gl.cdiv(gl.minimum(start_last, m0) - lo, BLOCK_N)
            start_row = gl.where(offs_m >= m0 + ACP_BLOCK, start_last, start_first) - lo
    return (b, h, m0, b * T, (h // GROUPS) * HEAD_DIM, offs_m, lo, n_partial, (m0 - lo) // BLOCK_N,
            (m0 + BLOCK_M - lo) // BLOCK_N, start_row)


@gluon.jit
def _forward_item(item, next_item, items, ring, done, slots, schedule, o_desc, C, LSE, stride_lb, stride_lh, qk_scale,
                  s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                  rows: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, ACP_BLOCK: gl.constexpr, USE_ACP: gl.constexpr, VECTORS_BY_TMA: gl.constexpr,
                  GATE_MMA: gl.constexpr, LAZY_RESCALE: gl.constexpr, PERSISTENT: gl.constexpr):
    """One query tile: work item `item` (None: the grid's tile), its Q and first key/value tiles loading from ring
    position `ring` on, done items before it. PERSISTENT: once its walk is through, next_item's (if below items)
    key/value loads start, and once O has left Q's slot, its Q. Returns the ring's position after the walk."""
    PARTIAL: gl.constexpr = _partial_tiles(USE_ACP, BLOCK_M, ACP_BLOCK)
    q_desc, qg_desc, k_desc, v_desc, c_desc, q_smem, qg_smem, k_smem, v_smem, c_smem, q_bar, k_bars, v_bars = slots
    ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, N_HEADS, stride_cb, stride_ch = schedule
    b, h, m0, kv_row, kv_col, offs_m, lo, n_partial, n_bulk, n_tiles, start_row = _query_walk(
        ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, rows, BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK,
        USE_ACP, item, N_HEADS)
    c_row = h * GATE_COLUMNS if GATE_MMA else b * stride_cb + h * stride_ch + lo
    c_base = C + b.to(gl.int64) * stride_cb + h.to(gl.int64) * stride_ch
    c_ref = 0.0
    if not GATE_MMA:
        c_ref = gl.load(c_base + m0) * LOG2E
    c_walk = c_base + lo
    offs_walk = offs_m - lo

    # walk tile 0: scores and probabilities only (its p.v is issued with tile 1's q.k)
    first = ring % STAGES
    mbarrier.wait(q_bar, done & 1)
    mbarrier.wait(k_bars.index(first), (ring // STAGES) & 1)
    p_f, m_i, l_i = _first_tile(q_smem, qg_smem, k_smem, c_smem, first, c_walk, c_ref, offs_walk, start_row, 0,
                                qk_scale, s_layout, BLOCK_M, BLOCK_N, PARTIAL, VECTORS_BY_TMA, GATE_MMA)
    p = gl.convert_layout(_pack_pairs(p_f, q_desc.dtype), p_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    walk = (q_smem, qg_smem, k_smem, v_smem, c_smem, k_bars, v_bars, k_desc, v_desc, c_desc, kv_row + lo, kv_col,
            c_row, n_tiles, ring, c_walk, c_ref, offs_walk, start_row, qk_scale)
    if PARTIAL:
        p, acc, m_i, l_i = _tiles(1, n_partial, p, acc, m_i, l_i, *walk, s_layout, o_layout, p_layout, BLOCK_M,
                                  BLOCK_N, STAGES, True, True, VECTORS_BY_TMA, GATE_MMA, LAZY_RESCALE)
        p, acc, m_i, l_i = _tiles(gl.maximum(n_partial, 1), n_bulk, p, acc, m_i, l_i, *walk, s_layout, o_layout,
                                  p_layout, BLOCK_M, BLOCK_N, STAGES, False, True, VECTORS_BY_TMA, GATE_MMA,
                                  LAZY_RESCALE)
    else:
        p, acc, m_i, l_i = _tiles(1, n_bulk, p, acc, m_i, l_i, *walk, s_layout, o_layout, p_layout, BLOCK_M, BLOCK_N,
                                  STAGES, False, False, VECTORS_BY_TMA, GATE_MMA, LAZY_RESCALE)
    p, acc, m_i, l_i = _tiles(gl.maximum(n_bulk, 1), n_tiles, p, acc, m_i, l_i, *walk, s_layout, o_layout, p_layout,
                              BLOCK_M, BLOCK_N, STAGES, True, PARTIAL, VECTORS_BY_TMA, GATE_MMA, LAZY_RESCALE)
    acc = _last_pv(p, acc, v_smem, v_bars, ring + n_tiles - 1, STAGES)
    if PERSISTENT:                 # every warp is done with the slots: the next item's key/value loads
        exists = next_item < items
        q_row, h_next, kv_row_next, kv_col_next, c_row_next, n_tiles_next = _walk_loads(
            gl.minimum(next_item, items - 1), schedule, rows, BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK, USE_ACP,
            GATE_MMA)
        CTA_BARRIER()
        _first_kv_loads(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, kv_row_next, kv_col_next,
                        c_row_next, n_tiles_next * exists.to(gl.int32), ring + n_tiles, BLOCK_N, STAGES,
                        VECTORS_BY_TMA, GATE_MMA)

    _store_tile(acc, l_i, _tile_lse(m_i, l_i, c_base, c_ref, offs_m, qk_scale, GATE_MMA), offs_m, b, h, LSE,
                stride_lb, stride_lh, q_smem, o_desc, kv_row + m0, h * HEAD_DIM, o_layout)
    if PERSISTENT:                 # O has left the slot: the next item's Q
        tma.store_wait(0)
        CTA_BARRIER()
        _query_loads(q_desc, qg_desc, q_smem, qg_smem, q_bar, q_row, h_next, exists, HEAD_DIM, GATE_MMA)
    return ring + n_tiles


@gluon.jit
def _store_tile(acc, l_i, lse, offs_m, b, h, LSE, stride_lb, stride_lh, q_smem, o_desc, o_row, o_col,
                o_layout: gl.constexpr):
    """A forward tile's epilogue: lse of rows offs_m, and O = acc / l by TMA from the tile's Q slot (at o_row,
    o_col of o_desc's view) once the warps' matmuls are done with Q (a CTA barrier: within a warp-specialised
    partition, its warps')."""
    gl.store(LSE + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + offs_m, lse)
    out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    CTA_BARRIER()
    q_smem.store(out.to(o_desc.dtype))
    fence_async_shared()
    CTA_BARRIER()
    TMA_STORE(o_desc, [o_row, o_col], q_smem)


@gluon.jit
def _query_loads(q_desc, qg_desc, q_smem, qg_smem, q_bar, q_row, h, exists, HEAD_DIM: gl.constexpr,
                 GATE_MMA: gl.constexpr):
    """Start the TMA copy of a query tile (rows from q_row of head h; with GATE_MMA its gate operand too), if it
    exists."""
    if GATE_MMA:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes + qg_desc.block_type.nbytes, pred=exists)
        TMA_LOAD(qg_desc, [q_row, h * GATE_COLUMNS], q_bar, qg_smem, pred=exists)
    else:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes, pred=exists)
    TMA_LOAD(q_desc, [q_row, h * HEAD_DIM], q_bar, q_smem, pred=exists)


@gluon.jit
def _first_kv_loads(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, kv_row, kv_col, c_row, n_tiles,
                    ring, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, BY_TMA: gl.constexpr,
                    GATE_MMA: gl.constexpr):
    """Start the TMA copies of a walk's first STAGES key/value tiles (of n_tiles), from ring position `ring` on."""
    for i in gl.static_range(STAGES):
        _load_kv(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, kv_row, kv_col, c_row, i,
                 n_tiles, BLOCK_N, STAGES, BY_TMA, GATE_MMA, (ring + i) % STAGES)


@gluon.jit
def _first_loads(q_desc, qg_desc, k_desc, v_desc, c_desc, q_smem, qg_smem, k_smem, v_smem, c_smem, q_bar, k_bars,
                 v_bars, q_row, h, kv_row, kv_col, c_row, n_tiles, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, BY_TMA: gl.constexpr, GATE_MMA: gl.constexpr):
    """A program's first query tile and key/value tiles: their TMA copies started."""
    _query_loads(q_desc, qg_desc, q_smem, qg_smem, q_bar, q_row, h, True, HEAD_DIM, GATE_MMA)
    _first_kv_loads(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, kv_row, kv_col, c_row, n_tiles, 0,
                    BLOCK_N, STAGES, BY_TMA, GATE_MMA)


@gluon.jit
def _walk_loads(item, schedule, rows: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                HEAD_DIM: gl.constexpr, ACP_BLOCK: gl.constexpr, USE_ACP: gl.constexpr, GATE_MMA: gl.constexpr):
    """What _first_loads needs of work item `item`'s walk (None: the program's grid tile): (q_row, h, kv_row,
    kv_col, c_row, n_tiles), kv_row at the walk's first key, c_row where its keys' gate vector starts."""
    ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, N_HEADS, stride_cb, stride_ch = schedule
    b, h, m0, kv_row, kv_col, _, lo, _, _, n_tiles, _ = _query_walk(
        ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, rows, BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK,
        USE_ACP, item, N_HEADS)
    c_row = h * GATE_COLUMNS if GATE_MMA else b * stride_cb + h * stride_ch + lo
    return kv_row + m0, h, kv_row + lo, kv_col, c_row, n_tiles


@gluon.jit
def _attn_fwd_hopper(q_desc, k_desc, v_desc, c_desc, qg_desc, o_desc, C, LSE, START, ORDER, NEXT,
                     stride_cb, stride_ch, stride_lb, stride_lh, stride_map,
                     T, H, GROUPS, HEAD_GROUP, N_HEADS, qk_scale,
                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     ACP_BLOCK: gl.constexpr, USE_ACP: gl.constexpr, VECTORS_BY_TMA: gl.constexpr,
                     GATE_MMA: gl.constexpr, LAZY_RESCALE: gl.constexpr, PERSISTENT: gl.constexpr,
                     num_warps: gl.constexpr):
    """The forward. GATE_MMA: the tensor cores add the gate bias, the scores being [q, q_gate] . [k, k_gate]
    (gate_operands; qg_desc over q_gate, c_desc over k_gate), so that the loop spends no instruction on the bias
    and each probability is one FMA and one exp2 (_gated_softmax): at D=64 the loop is bound by instruction
    issue, and the extra K step is cheap. LAZY_RESCALE: conditional rescaling (_lazy_max, _rescaled), which
    also saves instructions: most tiles skip O's multiplies.

    A program computes its grid tile (_forward_item), or with PERSISTENT work items (query tiles of N_HEADS heads,
    T / BLOCK_M each, in _program_tile's order) one after another: its first by its index, then the next untaken
    one from the counter at NEXT. The next item's first key/value tiles are then on their way while one ends (its
    epilogue, O's store through Q's slot), and its Q once O has left that slot, where a program per tile waits for
    its launch and all its loads."""
    gl.static_assert(BLOCK_M % BLOCK_N == 0)
    s_layout: gl.constexpr = _wgmma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = _wgmma_layout(num_warps, HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem, v_smem, c_smem, k_bars, v_bars = _kv_slots(k_desc, v_desc, BLOCK_N, HEAD_DIM, STAGES)
    qg_smem = q_smem
    if GATE_MMA:                # the gate operands' tiles: the queries' with Q, the keys' in the cumsums' slots
        qg_smem = gl.allocate_shared_memory(qg_desc.dtype, [BLOCK_M, GATE_COLUMNS], qg_desc.layout)
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [STAGES, BLOCK_N, GATE_COLUMNS], c_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)

    slots = (q_desc, qg_desc, k_desc, v_desc, c_desc, q_smem, qg_smem, k_smem, v_smem, c_smem, q_bar, k_bars, v_bars)
    schedule = (ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, N_HEADS, stride_cb, stride_ch)
    epilogue = (o_desc, C, LSE, stride_lb, stride_lh, qk_scale)
    if PERSISTENT:
        item = gl.program_id(0)
        items = T // BLOCK_M * N_HEADS
        _first_loads(*slots, *_walk_loads(item, schedule, rows, BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK, USE_ACP,
                                          GATE_MMA), HEAD_DIM, BLOCK_N, STAGES, VECTORS_BY_TMA, GATE_MMA)
        ring = 0                       # key/value tiles walked by earlier items: the slot ring's position
        done = 0
        while item < items:
            next_item = gl.num_programs(0) + gl.atomic_add(NEXT, 1, sem="relaxed")
            ring = _forward_item(item, next_item, items, ring, done, slots, schedule, *epilogue, s_layout, o_layout,
                                 p_layout, rows, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, ACP_BLOCK, USE_ACP,
                                 VECTORS_BY_TMA, GATE_MMA, LAZY_RESCALE, PERSISTENT)
            done += 1
            item = next_item
    else:
        _first_loads(*slots, *_walk_loads(None, schedule, rows, BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK, USE_ACP,
                                          GATE_MMA), HEAD_DIM, BLOCK_N, STAGES, VECTORS_BY_TMA, GATE_MMA)
        _forward_item(None, 0, 0, 0, 0, slots, schedule, *epilogue, s_layout, o_layout, p_layout, rows, HEAD_DIM,
                      BLOCK_M, BLOCK_N, STAGES, ACP_BLOCK, USE_ACP, VECTORS_BY_TMA, GATE_MMA, LAZY_RESCALE, PERSISTENT)
    tma.store_wait(0)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))


@gluon.jit
def _tile_lse(m_i, l_i, c_base, c_ref, offs_m, qk_scale, GATE_MMA: gl.constexpr):
    """The forward's log-sum-exp of rows offs_m from their running max and sum: with GATE_MMA m_i is in the
    scores' units (_gated_softmax); else taken against c_ref, and back to each row's own gate cumsum."""
    if GATE_MMA:
        return m_i * qk_scale + gl.log2(l_i)
    return m_i + gl.log2(l_i) + (gl.load(c_base + offs_m) * LOG2E - c_ref)


CONSUMER_REGISTERS = gl.constexpr(240)
PRODUCER_REGISTERS = gl.constexpr(24)
"""Registers per thread (setmaxnreg) of the fused backward's consumer warpgroups, and of a producer warp's
warpgroup (the fused backward's and the split forward's; 24 is the least setmaxnreg allows)."""


SPLIT_ROWS = gl.constexpr(64)
"""Query rows per consumer warpgroup of the split forward (_attn_fwd_split): one wgmma's M, and one ACP block."""


@constexpr_function
def split_parts(warps):
    """The consumer warpgroups of a split forward tile of `warps` warps (its configs' third field): 4 per
    consumer and a producer warp, e.g. 9 for two (128 query rows), 17 for four (256)."""
    return (warps - 1) // 4


@gluon.jit
def _split_walk(ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                HEAD_DIM: gl.constexpr, USE_ACP: gl.constexpr, PART, item=None, n_heads=None):
    """The split forward's query tile (_program_tile's) and the key walk of its consumer PART: (b, h, first row of
    the tile, first key row of the batch, key column, lo, first, own, n_tiles) in key tiles, one per ACP block:
    the producer walks tiles [0, n_tiles) from key tile lo (with ACP the first kept one of the tile's first
    block, the earliest of its blocks'), the consumer [first, own] (its block's first kept tile, its diagonal).
    item: a persistent program's work item of n_heads heads' tiles (None: the grid's tile)."""
    q_tiles = gl.num_programs(0) if item is None else T // BLOCK_M
    pid_bh, b, h, rank = _program_tile(ORDER, H, HEAD_GROUP, USE_ACP, item, q_tiles, n_heads)
    m0 = (q_tiles - 1 - rank) * BLOCK_M
    row0 = m0 + PART * SPLIT_ROWS
    lo = 0
    first = 0
    if USE_ACP:
        map_base = START + pid_bh.to(gl.int64) * stride_map
        lo = gl.load(map_base + m0 // BLOCK_N)
        first = gl.load(map_base + row0 // BLOCK_N) - lo
    return b, h, m0, b * T, (h // GROUPS) * HEAD_DIM, lo, first, row0 // BLOCK_N - lo, (m0 + BLOCK_M) // BLOCK_N - lo


@gluon.jit
def _free_unused(k_bars, free_bars, first, last, STAGES: gl.constexpr):
    """Free the slots of walk tiles [first, last), which this consumer does not use, as they fill: the producer
    refills a slot once every consumer has freed it."""
    for tile in range(first, last):
        mbarrier.wait(k_bars.index(tile % STAGES), (tile // STAGES) & 1)
        mbarrier.arrive(free_bars.index(tile % STAGES))


@gluon.jit
def _split_consumer(common, BLOCK_M: gl.constexpr, USE_ACP: gl.constexpr, GATE_MMA: gl.constexpr,
                    LAZY_RESCALE: gl.constexpr, Q_REGISTERS: gl.constexpr, PERSISTENT: gl.constexpr,
                    PART: gl.constexpr):
    """Consumer warpgroup PART of the split forward: its rows of the grid's query tile, or (PERSISTENT) of the work
    items the producer hands it (_taken_item), the key/value slot ring and the barriers' phases carried from one
    to the next (_split_item)."""
    if PERSISTENT:
        T, N_HEADS = common[1][3], common[1][9]          # schedule's
        items = T // BLOCK_M * N_HEADS
        ring = 0
        done = 0
        item = _taken_item(common[0], PART, done)
        while item < items:
            ring = _split_item(common, item, ring, done, BLOCK_M, USE_ACP, GATE_MMA, LAZY_RESCALE, Q_REGISTERS,
                               PERSISTENT, PART)
            done += 1
            item = _taken_item(common[0], PART, done)
    else:
        _split_item(common, None, 0, 0, BLOCK_M, USE_ACP, GATE_MMA, LAZY_RESCALE, Q_REGISTERS, PERSISTENT, PART)
    tma.store_wait(0)


@gluon.jit
def _taken_item(slots, PART: gl.constexpr, done):
    """The work item of consumer PART's done-th query tile, which the producer wrote into item_smem with its Q
    (_split_loads), once that Q has arrived: items (no item left) after the last."""
    q_bars, item_smem = slots[5], slots[11]
    mbarrier.wait(q_bars.index(PART), done & 1)
    return gl.max(item_smem.index(PART).load(gl.BlockedLayout([1], [32], [4], [0])), 0)


@gluon.jit
def _split_item(common, item, ring, done, BLOCK_M: gl.constexpr, USE_ACP: gl.constexpr, GATE_MMA: gl.constexpr,
                LAZY_RESCALE: gl.constexpr, Q_REGISTERS: gl.constexpr, PERSISTENT: gl.constexpr, PART: gl.constexpr):
    """One query tile of consumer PART (_split_consumer): work item `item` (None: the grid's), its key/value tiles
    from ring position `ring` on, `done` items before it. Its rows [PART*64, PART*64+64) of the query tile, one ACP
    block, from their first kept key tile to their diagonal (_split_walk), _forward_item's loop (the gate bias by
    matmul, or by FMA from the keys' cumsums in c_smem), each slot freed for the producer once its p.v is done;
    then those rows of O by TMA through its O slot. The walk's other tiles (before its first kept one, past its
    rows) it frees as they fill. Q_REGISTERS: q.k takes Q (and q_gate) from registers, loaded once, not from
    shared memory at every key tile; a persistent producer may then refill the Q slot at once. Returns the ring's
    position after the walk."""
    slots, schedule, epilogue = common
    q_parts, qg_parts, k_smem, v_smem, c_smem, q_bars, k_bars, v_bars, free_bars, q_free, o_parts, _ = slots
    STAGES: gl.constexpr = k_smem.shape[0]           # the slots' shapes: (STAGES, BLOCK_N, HEAD_DIM)
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    gl.static_assert(BLOCK_N == SPLIT_ROWS)
    ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, stride_cb, stride_ch, N_HEADS, _ = schedule
    o_desc, C, LSE, stride_lb, stride_lh, qk_scale = epilogue
    s_layout: gl.constexpr = _wgmma_layout(4, BLOCK_N)
    o_layout: gl.constexpr = _wgmma_layout(4, HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    b, h, m0, kv_row, kv_col, lo, first, own, n_tiles = _split_walk(
        ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, BLOCK_M, BLOCK_N, HEAD_DIM, USE_ACP, PART, item, N_HEADS)
    row0 = m0 + PART * SPLIT_ROWS
    offs_m = row0 + gl.arange(0, SPLIT_ROWS, layout=gl.SliceLayout(1, s_layout))
    offs_walk = offs_m - lo * BLOCK_N
    q_smem = q_parts.index(PART)
    qg_smem = qg_parts.index(PART)
    c_base = C + b.to(gl.int64) * stride_cb + h.to(gl.int64) * stride_ch
    c_ref = 0.0
    if not GATE_MMA:
        c_ref = gl.load(c_base + row0) * LOG2E
    if USE_ACP:
        _free_unused(k_bars, free_bars, ring, ring + first, STAGES)

    mbarrier.wait(q_bars.index(PART), done & 1)
    q_op = q_smem
    qg_op = qg_smem
    if Q_REGISTERS:
        q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
        if GATE_MMA:
            qg_op = qg_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
        if PERSISTENT:                   # the next item's Q may come once every warp's reads have landed:
            fence_async_shared()         # ordered before the producer's TMA writes (another proxy)
            CTA_BARRIER()
            mbarrier.arrive(q_free.index(PART))
    slot = (ring + first) % STAGES
    mbarrier.wait(k_bars.index(slot), ((ring + first) // STAGES) & 1)
    p_f, m_i, l_i = _first_tile(q_op, qg_op, k_smem, c_smem, slot, None, c_ref, offs_walk, offs_walk, first,
                                qk_scale, s_layout, SPLIT_ROWS, BLOCK_N, False, True, GATE_MMA)
    p = gl.convert_layout(_pack_pairs(p_f, q_smem.dtype), p_layout)
    acc = gl.zeros([SPLIT_ROWS, HEAD_DIM], gl.float32, o_layout)

    walk = (q_op, qg_op, k_smem, v_smem, c_smem, k_bars, v_bars, None, None, None, 0, 0, 0, n_tiles, ring, None,
            c_ref, offs_walk, offs_walk, qk_scale)
    p, acc, m_i, l_i = _tiles(first + 1, own, p, acc, m_i, l_i, *walk, s_layout, o_layout, p_layout, SPLIT_ROWS,
                              BLOCK_N, STAGES, False, False, True, GATE_MMA, LAZY_RESCALE, free_bars)
    p, acc, m_i, l_i = _tiles(gl.maximum(own, first + 1), own + 1, p, acc, m_i, l_i, *walk, s_layout, o_layout,
                              p_layout, SPLIT_ROWS, BLOCK_N, STAGES, True, False, True, GATE_MMA, LAZY_RESCALE,
                              free_bars)
    last = ring + own
    acc = _last_pv(p, acc, v_smem, v_bars, last, STAGES)
    mbarrier.arrive(free_bars.index(last % STAGES))
    if PERSISTENT and not Q_REGISTERS:   # the walk's last q.k is done: the next item's Q may come
        mbarrier.arrive(q_free.index(PART))

    tma.store_wait(0)                    # the previous item's O has left the slot
    _store_tile(acc, l_i, _tile_lse(m_i, l_i, c_base, c_ref, offs_m, qk_scale, GATE_MMA), offs_m, b, h, LSE,
                stride_lb, stride_lh, o_parts.index(PART), o_desc, kv_row + row0, h * HEAD_DIM, o_layout)
    _free_unused(k_bars, free_bars, last + 1, ring + n_tiles, STAGES)
    return ring + n_tiles


@gluon.jit
def _split_producer(descriptors, slots, schedule, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, USE_ACP: gl.constexpr, GATE_MMA: gl.constexpr,
                    PERSISTENT: gl.constexpr, PARTS: gl.constexpr):
    """The producer warp of the split forward, for the grid's query tile or (PERSISTENT) work items taken until
    none is left, the program's own first, then the next untaken one (the counter NEXT): each consumer's Q (and
    q_gate) once that consumer has freed its slot, then the walk's key/value tiles with their k_gate (GATE_MMA)
    or their keys' gate cumsums, each into a slot once every consumer has freed it (a fresh slot's barrier passes
    a wait for the phase before its first). From a counter, not pid, pid + programs, ...: the tiles differ in
    length (a head's by its rows, with ACP also by its gates), and such fixed shares left some programs more work
    than others (on an H200 the ACP forward with sharp gates ran 6-11% faster from the counter, dense 0.5-2%;
    launch.GLUON_FWD_SPLIT_PERSISTENT)."""
    if PERSISTENT:
        T, N_HEADS, NEXT = schedule[3], schedule[9], schedule[10]
        items = T // BLOCK_M * N_HEADS
        item = gl.program_id(0)
        ring = 0
        done = 0
        while item < items:
            next_item = gl.num_programs(0) + gl.atomic_add(NEXT, 1, sem="relaxed")
            ring = _split_loads(descriptors, slots, schedule, item, ring, done, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                                USE_ACP, GATE_MMA, PERSISTENT, PARTS)
            done += 1
            item = next_item
        q_bars, q_free, item_smem = slots[5], slots[9], slots[11]
        for part in gl.static_range(PARTS):          # none left: the consumers' last item is `items`
            mbarrier.wait(q_free.index(part), (done & 1) ^ 1)
            _hand_over(item_smem, part, items)
            mbarrier.arrive(q_bars.index(part))
    else:
        _split_loads(descriptors, slots, schedule, None, 0, 0, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, USE_ACP, GATE_MMA,
                     PERSISTENT, PARTS)


@gluon.jit
def _hand_over(item_smem, part, item):
    """The producer warp writes consumer `part`'s next work item where _taken_item reads it."""
    item_smem.index(part).store(gl.full([1], item, gl.int32, gl.BlockedLayout([1], [32], [1], [0])))


@gluon.jit
def _split_loads(descriptors, slots, schedule, item, ring, done, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, USE_ACP: gl.constexpr, GATE_MMA: gl.constexpr,
                 PERSISTENT: gl.constexpr, PARTS: gl.constexpr):
    """The producer's loads of one query tile (_split_producer's): work item `item` (None: the grid's), its
    key/value tiles from ring position `ring` on, `done` items before it. Returns the ring's position after it."""
    q_desc, qg_desc, k_desc, v_desc, c_desc = descriptors
    q_parts, qg_parts, k_smem, v_smem, c_smem, q_bars, k_bars, v_bars, free_bars, q_free, _, item_smem = slots
    ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, stride_cb, stride_ch, N_HEADS, _ = schedule
    b, h, m0, kv_row, kv_col, lo, _, _, n_tiles = _split_walk(
        ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, BLOCK_M, BLOCK_N, HEAD_DIM, USE_ACP, 0, item, N_HEADS)
    c_row = h * GATE_COLUMNS if GATE_MMA else b * stride_cb + h * stride_ch + lo * BLOCK_N
    for part in gl.static_range(PARTS):
        if PERSISTENT:                   # the consumer learns its item with its Q (_taken_item)
            mbarrier.wait(q_free.index(part), (done & 1) ^ 1)
            _hand_over(item_smem, part, item)
        _query_loads(q_desc, qg_desc, q_parts.index(part), qg_parts.index(part), q_bars.index(part),
                     kv_row + m0 + part * SPLIT_ROWS, h, True, HEAD_DIM, GATE_MMA)
    for tile in range(n_tiles):
        slot = (ring + tile) % STAGES
        mbarrier.wait(free_bars.index(slot), (((ring + tile) // STAGES) & 1) ^ 1)
        _load_kv(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, kv_row + lo * BLOCK_N, kv_col,
                 c_row, tile, n_tiles, BLOCK_N, STAGES, not GATE_MMA, GATE_MMA, slot)
    return ring + n_tiles


@gluon.jit
def _attn_fwd_split(q_desc, k_desc, v_desc, c_desc, qg_desc, o_desc, C, LSE, START, ORDER, NEXT, stride_cb, stride_ch,
                    stride_lb, stride_lh, stride_map, T, H, GROUPS, HEAD_GROUP, N_HEADS, qk_scale,
                    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PARTS: gl.constexpr,
                    ACP_BLOCK: gl.constexpr, USE_ACP: gl.constexpr, GATE_MMA: gl.constexpr, LAZY_RESCALE: gl.constexpr,
                    Q_REGISTERS: gl.constexpr, PERSISTENT: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    num_warps: gl.constexpr):
    """The forward of _attn_fwd_hopper, warp-specialised as FlashAttention-3's: PARTS consumer warpgroups of 64
    query rows each run the key loop on their rows (each overlapping its softmax with its own matmuls), and a
    producer warp keeps the shared key/value slots filled by TMA. The consumers' loop then holds no TMA issue and
    no CTA barrier (the 8-warp tile's loop spends a quarter of its instructions there); slots are handed back
    through mbarriers. GATE_MMA: the gate bias by matmul (c_desc over k_gate, qg_desc over q_gate), else by FMA
    from the keys' gate cumsums, which arrive by TMA with the keys (c_desc over C). Q_REGISTERS: each consumer
    holds its Q in registers for q.k (_split_consumer). PERSISTENT: each program takes work items (query tiles of
    the N_HEADS heads) until none is left, its first by its index, then from the counter at NEXT (_split_producer),
    the next one's loads in flight while one ends, its O through slots of its own. CONSUMER_REGS: the registers of
    each consumer warpgroup (launch's maxnreg sets their sum)."""
    gl.static_assert(num_warps == 4)
    BLOCK_M: gl.constexpr = PARTS * SPLIT_ROWS
    q_parts = gl.allocate_shared_memory(q_desc.dtype, [PARTS, SPLIT_ROWS, HEAD_DIM], q_desc.layout)
    k_smem, v_smem, c_smem, k_bars, v_bars = _kv_slots(k_desc, v_desc, BLOCK_N, HEAD_DIM, STAGES)
    qg_parts = q_parts
    if GATE_MMA:
        qg_parts = gl.allocate_shared_memory(qg_desc.dtype, [PARTS, SPLIT_ROWS, GATE_COLUMNS], qg_desc.layout)
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [STAGES, BLOCK_N, GATE_COLUMNS], c_desc.layout)
    o_parts = q_parts
    if PERSISTENT:                       # O leaves from slots of its own: the next Q may be in Q's
        o_parts = gl.allocate_shared_memory(o_desc.dtype, [PARTS, SPLIT_ROWS, HEAD_DIM], o_desc.layout)
    item_smem = gl.allocate_shared_memory(gl.int32, [PARTS, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    free_bars = _barriers(STAGES, PARTS)
    q_bars = _barriers(PARTS, 1)
    q_free = _barriers(PARTS, 1)
    fence_async_shared()

    slots = (q_parts, qg_parts, k_smem, v_smem, c_smem, q_bars, k_bars, v_bars, free_bars, q_free, o_parts,
             item_smem)
    schedule = (ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, stride_cb, stride_ch, N_HEADS, NEXT)
    descriptors = (q_desc, qg_desc, k_desc, v_desc, c_desc)
    common = (slots, schedule, (o_desc, C, LSE, stride_lb, stride_lh, qk_scale))    # every consumer's
    gl.static_assert((PARTS == 2 or PARTS == 4) and ACP_BLOCK == SPLIT_ROWS)
    if PARTS == 2:
        gl.warp_specialize([
            (_split_consumer, (common, BLOCK_M, USE_ACP, GATE_MMA, LAZY_RESCALE, Q_REGISTERS, PERSISTENT, 0)),
            (_split_consumer, (common, BLOCK_M, USE_ACP, GATE_MMA, LAZY_RESCALE, Q_REGISTERS, PERSISTENT, 1)),
            (_split_producer, (descriptors, slots, schedule, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, USE_ACP, GATE_MMA,
                               PERSISTENT, PARTS))],
            [4, 1], [CONSUMER_REGS, PRODUCER_REGISTERS])
    else:
        gl.warp_specialize([
            (_split_consumer, (common, BLOCK_M, USE_ACP, GATE_MMA, LAZY_RESCALE, Q_REGISTERS, PERSISTENT, 0)),
            (_split_consumer, (common, BLOCK_M, USE_ACP, GATE_MMA, LAZY_RESCALE, Q_REGISTERS, PERSISTENT, 1)),
            (_split_consumer, (common, BLOCK_M, USE_ACP, GATE_MMA, LAZY_RESCALE, Q_REGISTERS, PERSISTENT, 2)),
            (_split_consumer, (common, BLOCK_M, USE_ACP, GATE_MMA, LAZY_RESCALE, Q_REGISTERS, PERSISTENT, 3)),
            (_split_producer, (descriptors, slots, schedule, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, USE_ACP, GATE_MMA,
                               PERSISTENT, PARTS))],
            [4, 4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGISTERS])

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(free_bars.index(i))
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    for i in gl.static_range(PARTS):
        mbarrier.invalidate(q_bars.index(i))
        mbarrier.invalidate(q_free.index(i))


@gluon.jit
def _key_tiles(first, last, dq, dr, s, dp, q_smem, do_smem, k_smem, v_smem, c_smem, k_bars, v_bars, k_desc, v_desc,
               c_desc, kv_row, kv_col, c_row, n_tiles, c_base, c_ref, a_row, delta, offs_m, start_row, qk_scale, ring,
               s_layout: gl.constexpr, op_layout: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               MASKED: gl.constexpr, PARTIAL: gl.constexpr, BY_TMA: gl.constexpr):
    """Key tiles [first, last), ring: the slot ring's position at the walk's tile 0 (a persistent program's tiles
    of earlier items; None: 0). s and dp: the last tile's, passed back as the next tile's (ignored) accumulators."""
    for tile in range(first, last):
        load_slot = None                   # None: _load_kv counts the refill's slot itself, as a tile index
        if ring is None:
            slot = tile % STAGES
            phase = (tile // STAGES) & 1
        else:
            slot = (ring + tile) % STAGES
            phase = ((ring + tile) // STAGES) & 1
            load_slot = slot
        mbarrier.wait(k_bars.index(slot), phase)
        s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s, use_acc=False, is_async=True)
        mbarrier.wait(v_bars.index(slot), phase)
        dp_tok = warpgroup_mma(do_smem, v_smem.index(slot).permute((1, 0)), dp, use_acc=False, is_async=True)
        offs_n = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        b_col = c_ref - _vector(c_smem, slot, c_base, offs_n, BY_TMA) * LOG2E
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
        p = gl.exp2(s * qk_scale + gl.expand_dims(a_row, 1) + gl.expand_dims(b_col, 0))
        if MASKED:
            keep = gl.expand_dims(offs_m, 1) >= gl.expand_dims(offs_n, 0)
            if PARTIAL:
                keep = keep & (gl.expand_dims(offs_n, 0) >= gl.expand_dims(start_row, 1))
            p = gl.where(keep, p, 0.0)
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok,))
        ds = p * (dp - gl.expand_dims(delta, 1))
        dr += gl.sum(ds, 1)
        dq = warpgroup_mma(gl.convert_layout(ds.to(q_smem.dtype), op_layout), k_smem.index(slot), dq, is_async=True)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
        _load_kv(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, kv_row, kv_col, c_row, tile + STAGES,
                 n_tiles, BLOCK_N, STAGES, BY_TMA, False, load_slot)
    return dq, dr, s, dp


@gluon.jit
def _query_do_loads(q_desc, do_desc, q_smem, do_smem, bar, row, h, exists, HEAD_DIM: gl.constexpr):
    """Start the TMA copies of a query tile and its dO tile (rows from `row` of head h), if it exists."""
    mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=exists)
    TMA_LOAD(q_desc, [row, h * HEAD_DIM], bar, q_smem, pred=exists)
    TMA_LOAD(do_desc, [row, h * HEAD_DIM], bar, do_smem, pred=exists)


@gluon.jit
def _dq_item(item, next_item, items, ring, done, slots, schedule, outputs, qk_scale, sm_scale,
             s_layout: gl.constexpr, acc_layout: gl.constexpr, op_layout: gl.constexpr, rows: gl.constexpr,
             HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             ACP_BLOCK: gl.constexpr, USE_ACP: gl.constexpr, VECTORS_BY_TMA: gl.constexpr,
             PERSISTENT: gl.constexpr):
    """dq, delta and the row sums of one query tile: work item `item` (None: the grid's tile), its Q and dO and
    first key/value tiles loading from ring position `ring` on, done items before it. PERSISTENT: once its walk
    is through, next_item's (if below items) loads start, during this one's stores. Returns the ring's position
    after the walk."""
    PARTIAL: gl.constexpr = _partial_tiles(USE_ACP, BLOCK_M, ACP_BLOCK)
    q_desc, do_desc, k_desc, v_desc, c_desc, q_smem, do_smem, k_smem, v_smem, c_smem, qdo_bar, k_bars, v_bars = slots
    ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, N_HEADS, stride_cb, stride_ch = schedule
    (C, O, LSE, DELTA, DQ, DR, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb,
     stride_lh) = outputs
    b, h, m0, kv_row, kv_col, offs_m, lo, n_partial, n_bulk, n_tiles, start_row = _query_walk(
        ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, rows, BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK,
        USE_ACP, item, N_HEADS)
    c_row = b * stride_cb + h * stride_ch + lo
    if not PERSISTENT:             # a persistent program's loads started before (the previous item's end)
        _query_do_loads(q_desc, do_desc, q_smem, do_smem, qdo_bar, kv_row + m0, h, True, HEAD_DIM)
        _first_kv_loads(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, kv_row + lo, kv_col, c_row,
                        n_tiles, 0, BLOCK_N, STAGES, VECTORS_BY_TMA, False)

    # delta = rowsum(dO * O), for the dk/dv kernel too (as _bwd._attn_bwd_dq)
    offs_ma = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    o_tile = gl.load(O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
                     + gl.expand_dims(offs_ma, 1) * stride_ot + gl.expand_dims(offs_d, 0))
    lb = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh
    c_base = C + b.to(gl.int64) * stride_cb + h.to(gl.int64) * stride_ch
    c_ref = gl.load(c_base + m0) * LOG2E          # the rows' vectors load while Q and dO arrive
    a_row = (gl.load(c_base + offs_m) * LOG2E - c_ref) - gl.load(LSE + lb + offs_m)
    mbarrier.wait(qdo_bar, done & 1)
    do_reg = do_smem.load(acc_layout)
    delta = gl.convert_layout(gl.sum(o_tile.to(gl.float32) * do_reg.to(gl.float32), 1), rows)
    gl.store(DELTA + lb + offs_m, delta)

    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, acc_layout)
    dr = gl.zeros([BLOCK_M], gl.float32, rows)
    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    dp = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    walk_ring = None               # a program per tile: its slots as its tiles' indices
    if PERSISTENT:
        walk_ring = ring
    walk = (q_smem, do_smem, k_smem, v_smem, c_smem, k_bars, v_bars, k_desc, v_desc, c_desc, kv_row + lo, kv_col,
            c_row, n_tiles, c_base + lo, c_ref, a_row, delta, offs_m - lo, start_row, qk_scale)
    if PARTIAL:
        dq, dr, s, dp = _key_tiles(0, n_partial, dq, dr, s, dp, *walk, walk_ring, s_layout, op_layout, BLOCK_N,
                                   STAGES, True, True, VECTORS_BY_TMA)
    dq, dr, s, dp = _key_tiles(n_partial, n_bulk, dq, dr, s, dp, *walk, walk_ring, s_layout, op_layout, BLOCK_N,
                               STAGES, False, False, VECTORS_BY_TMA)
    dq, dr, s, dp = _key_tiles(n_bulk, n_tiles, dq, dr, s, dp, *walk, walk_ring, s_layout, op_layout, BLOCK_N,
                               STAGES, True, PARTIAL, VECTORS_BY_TMA)
    if PERSISTENT:                 # every warp is done with the slots: the next item's loads
        exists = next_item < items
        q_row, h_next, kv_row_next, kv_col_next, c_row_next, n_tiles_next = _walk_loads(
            gl.minimum(next_item, items - 1), schedule, rows, BLOCK_M, BLOCK_N, HEAD_DIM, ACP_BLOCK, USE_ACP, False)
        CTA_BARRIER()
        _first_kv_loads(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, kv_row_next, kv_col_next,
                        c_row_next, n_tiles_next * exists.to(gl.int32), ring + n_tiles, BLOCK_N, STAGES,
                        VECTORS_BY_TMA, False)
        _query_do_loads(q_desc, do_desc, q_smem, do_smem, qdo_bar, q_row, h_next, exists, HEAD_DIM)
    gl.store(DR + lb + offs_m, dr)
    dq_ptrs = (DQ + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh + gl.expand_dims(offs_ma, 1) * stride_qt
               + gl.expand_dims(offs_d, 0))
    gl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty))
    return ring + n_tiles


@gluon.jit
def _attn_bwd_dq_hopper(q_desc, do_desc, k_desc, v_desc, c_desc, C, O, LSE, DELTA, DQ, DR, START, ORDER, NEXT,
                        stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
                        stride_cb, stride_ch, stride_lb, stride_lh, stride_map, T, H, GROUPS, HEAD_GROUP, N_HEADS,
                        qk_scale, sm_scale,
                        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                        ACP_BLOCK: gl.constexpr, USE_ACP: gl.constexpr, VECTORS_BY_TMA: gl.constexpr,
                        PERSISTENT: gl.constexpr, num_warps: gl.constexpr):
    """dq, delta and the row sums. A program computes its grid tile (_dq_item), or with PERSISTENT work items
    (query tiles of N_HEADS heads, in _program_tile's order) one after another, as the forward's do: its first by
    its index, then the next untaken one from the counter at NEXT, whose loads start while one's stores go out."""
    gl.static_assert(BLOCK_M % BLOCK_N == 0)
    s_layout: gl.constexpr = _wgmma_layout(num_warps, BLOCK_N)
    acc_layout: gl.constexpr = _wgmma_layout(num_warps, HEAD_DIM)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [BLOCK_M, HEAD_DIM], do_desc.layout)
    k_smem, v_smem, c_smem, k_bars, v_bars = _kv_slots(k_desc, v_desc, BLOCK_N, HEAD_DIM, STAGES)
    qdo_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(qdo_bar, count=1)

    slots = (q_desc, do_desc, k_desc, v_desc, c_desc, q_smem, do_smem, k_smem, v_smem, c_smem, qdo_bar, k_bars, v_bars)
    schedule = (ORDER, START, stride_map, T, H, GROUPS, HEAD_GROUP, N_HEADS, stride_cb, stride_ch)
    outputs = (C, O, LSE, DELTA, DQ, DR, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb,
               stride_lh)
    if PERSISTENT:
        item = gl.program_id(0)
        q_row, h, kv_row, kv_col, c_row, n_tiles = _walk_loads(item, schedule, rows, BLOCK_M, BLOCK_N, HEAD_DIM,
                                                               ACP_BLOCK, USE_ACP, False)
        _query_do_loads(q_desc, do_desc, q_smem, do_smem, qdo_bar, q_row, h, True, HEAD_DIM)
        _first_kv_loads(k_desc, v_desc, c_desc, k_smem, v_smem, c_smem, k_bars, v_bars, kv_row, kv_col, c_row,
                        n_tiles, 0, BLOCK_N, STAGES, VECTORS_BY_TMA, False)
        items = T // BLOCK_M * N_HEADS
        ring = 0                       # key/value tiles walked by earlier items: the slot ring's position
        done = 0
        while item < items:
            next_item = gl.num_programs(0) + gl.atomic_add(NEXT, 1, sem="relaxed")
            ring = _dq_item(item, next_item, items, ring, done, slots, schedule, outputs, qk_scale, sm_scale,
                            s_layout, acc_layout, op_layout, rows, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, ACP_BLOCK,
                            USE_ACP, VECTORS_BY_TMA, PERSISTENT)
            done += 1
            item = next_item
    else:
        _dq_item(None, 0, 0, 0, 0, slots, schedule, outputs, qk_scale, sm_scale, s_layout, acc_layout, op_layout, rows,
                 HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, ACP_BLOCK, USE_ACP, VECTORS_BY_TMA, PERSISTENT)


@gluon.jit
def _load_q_do(q_desc, do_desc, cq_desc, lse_desc, delta_desc, q_smem, do_smem, cq_smem, lse_smem, delta_smem, q_bars,
               do_bars, t, exists, row, col, c_row, l_row, STAGES: gl.constexpr, BY_TMA: gl.constexpr,
               GATE_MMA: gl.constexpr = False):
    """TMA copies of the query and dO tile at (row, col), if it exists, into slot t % STAGES (t: the program's
    walk index over all its heads, which keeps the slots' barrier phases); BY_TMA: with the queries also their
    gate cumsums (from c_row in C) and lse, with dO delta (from l_row in LSE and DELTA)."""
    slot = t % STAGES
    if BY_TMA:
        mbarrier.expect(q_bars.index(slot),
                        q_desc.block_type.nbytes + cq_desc.block_type.nbytes + lse_desc.block_type.nbytes,
                        pred=exists)
        if GATE_MMA:      # cq_desc: gate_operands' q_gate rows, c_row: its column
            TMA_LOAD(cq_desc, [row, c_row], q_bars.index(slot), cq_smem.index(slot), pred=exists)
        else:
            TMA_LOAD(cq_desc, [c_row], q_bars.index(slot), cq_smem.index(slot), pred=exists)
        TMA_LOAD(lse_desc, [l_row], q_bars.index(slot), lse_smem.index(slot), pred=exists)
        mbarrier.expect(do_bars.index(slot), do_desc.block_type.nbytes + delta_desc.block_type.nbytes, pred=exists)
        TMA_LOAD(delta_desc, [l_row], do_bars.index(slot), delta_smem.index(slot), pred=exists)
    else:
        mbarrier.expect(q_bars.index(slot), q_desc.block_type.nbytes, pred=exists)
        mbarrier.expect(do_bars.index(slot), do_desc.block_type.nbytes, pred=exists)
    TMA_LOAD(q_desc, [row, col], q_bars.index(slot), q_smem.index(slot), pred=exists)
    TMA_LOAD(do_desc, [row, col], do_bars.index(slot), do_smem.index(slot), pred=exists)


@gluon.jit
def _query_tiles(first, last, t0, dk, dv, dc, s, dp, k_smem, v_smem, q_smem, do_smem, cq_smem, lse_smem, delta_smem,
                 q_bars, do_bars, q_desc, do_desc, cq_desc, lse_desc, delta_desc, b_col, offs_n, c_base, lse_base,
                 delta_base, map_base, c_ref, n0, n_m, q_row, q_col, c_row, l_row, qk_scale, st_layout: gl.constexpr,
                 op_layout: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, ACP_BLOCK: gl.constexpr,
                 MASKED: gl.constexpr, PARTIAL: gl.constexpr, BY_TMA: gl.constexpr):
    """Query tiles [first, last) of one head's n_m (t0: the walk index of its tile 0; q_row: the row of its tile
    0). Masked: causal and, where ACP prunes tiles in part, keys before the tile's first kept key (the START of
    its ACP block). s and dp are the last tile's scores and dP: passed back as the (ignored, use_acc=False)
    accumulators of the next tile's, so that no instruction but a wgmma writes their registers while dk and dv
    are in flight (ptxas serialises the wgmmas otherwise: warning C7515)."""
    queries: gl.constexpr = gl.SliceLayout(0, st_layout)
    for i in range(first, last):
        t = t0 + i
        slot = t % STAGES
        phase = (t // STAGES) & 1
        mbarrier.wait(q_bars.index(slot), phase)
        s_tok = warpgroup_mma(k_smem, q_smem.index(slot).permute((1, 0)), s, use_acc=False, is_async=True)
        mbarrier.wait(do_bars.index(slot), phase)
        dp_tok = warpgroup_mma(v_smem, do_smem.index(slot).permute((1, 0)), dp, use_acc=False, is_async=True)
        m0 = n0 + i * BLOCK_M
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=queries)
        lse = _vector(lse_smem, slot, lse_base, offs_m, BY_TMA)
        delta = _vector(delta_smem, slot, delta_base, offs_m, BY_TMA)
        a_row = (_vector(cq_smem, slot, c_base, offs_m, BY_TMA) * LOG2E - c_ref) - lse
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
        p = gl.exp2(s * qk_scale + gl.expand_dims(b_col, 1) + gl.expand_dims(a_row, 0))
        if MASKED:
            keep = gl.expand_dims(offs_m, 0) >= gl.expand_dims(offs_n, 1)
            if PARTIAL:
                keep = keep & gl.expand_dims(offs_n >= gl.load(map_base + m0 // ACP_BLOCK) * ACP_BLOCK, 1)
            p = gl.where(keep, p, 0.0)
        dv = warpgroup_mma(gl.convert_layout(p.to(q_desc.dtype), op_layout), do_smem.index(slot), dv, is_async=True)
        dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp_tok,))
        ds = p * (dp - gl.expand_dims(delta, 0))
        dc += gl.sum(ds, 1)
        dk = warpgroup_mma(gl.convert_layout(ds.to(q_desc.dtype), op_layout), q_smem.index(slot), dk, is_async=True)
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))  # no accumulator in flight across the
        _load_q_do(q_desc, do_desc, cq_desc, lse_desc, delta_desc, q_smem, do_smem, cq_smem, lse_smem,  # loop edge
                   delta_smem, q_bars, do_bars, t + STAGES, i + STAGES < n_m,            # (ptxas C7515); slot t
                   q_row + (i + STAGES) * BLOCK_M, q_col, c_row + (i + STAGES) * BLOCK_M,     # is free
                   l_row + (i + STAGES) * BLOCK_M, STAGES, BY_TMA)
    return dk, dv, dc, s, dp


@gluon.jit
def _attn_bwd_dkdv_hopper(q_desc, do_desc, k_desc, v_desc, cq_desc, lse_desc, delta_desc, C, LSE, DELTA, DK, DV, DC,
                          START, QEND, ORDER,
                          stride_kb, stride_kt, stride_kh, stride_cb, stride_ch, stride_lb, stride_lh, stride_map,
                          T, H_kv, GROUPS, HEAD_GROUP, qk_scale, sm_scale,
                          HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, ACP_BLOCK: gl.constexpr, USE_ACP: gl.constexpr,
                          VECTORS_BY_TMA: gl.constexpr, num_warps: gl.constexpr):
    """One key tile of one key/value head, over the query heads of its group. Per head the query tiles run from
    the diagonal (masked) through the bulk (unmasked) and, with ACP, the tiles that prune part of this key tile
    (masked), to the first that prunes all of it (QEND)."""
    gl.static_assert(BLOCK_N % BLOCK_M == 0)
    gl.static_assert(BLOCK_M <= ACP_BLOCK and BLOCK_N % ACP_BLOCK == 0)    # a query tile: one ACP block
    PARTIAL: gl.constexpr = USE_ACP and BLOCK_N > ACP_BLOCK  # else a query tile keeps all the key tile or none
    pid_bh, b, hk, rank = _program_tile(ORDER, H_kv, HEAD_GROUP, USE_ACP)
    n0 = rank * BLOCK_N

    st_layout: gl.constexpr = _wgmma_layout(num_warps, BLOCK_M)
    acc_layout: gl.constexpr = _wgmma_layout(num_warps, HEAD_DIM)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    keys: gl.constexpr = gl.SliceLayout(1, st_layout)

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_smem, do_smem, cq_smem, lse_smem, delta_smem, q_bars, do_bars = _query_slots(q_desc, do_desc, BLOCK_M, HEAD_DIM,
                                                                                  STAGES)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    TMA_LOAD(k_desc, [b * T + n0, hk * HEAD_DIM], kv_bar, k_smem)
    TMA_LOAD(v_desc, [b * T + n0, hk * HEAD_DIM], kv_bar, v_smem)

    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=keys)
    s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    dp = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    n_diag = BLOCK_N // BLOCK_M
    q_row = b * T + n0
    t0 = 0
    for g in range(GROUPS):
        h = hk * GROUPS + g
        map_base = START + (pid_bh * GROUPS + g).to(gl.int64) * stride_map
        n_m = (T - n0) // BLOCK_M                        # query tiles from the diagonal on
        n_bulk = n_m
        c_row = b * stride_cb + h * stride_ch + n0       # the diagonal query tile's, in C and in LSE and DELTA
        l_row = b * stride_lb + h * stride_lh + n0
        if USE_ACP:
            # ACP keeps every diagonal tile, so its loads start before QEND's arrive; rows before keep_all keep the
            # whole key tile, rows from keep_any none
            _load_q_do(q_desc, do_desc, cq_desc, lse_desc, delta_desc, q_smem, do_smem, cq_smem, lse_smem, delta_smem,
                       q_bars, do_bars, t0, True, q_row, h * HEAD_DIM, c_row, l_row, STAGES, VECTORS_BY_TMA)
            qend_base = QEND + (pid_bh * GROUPS + g).to(gl.int64) * stride_map
            keep_all = gl.load(qend_base + n0 // ACP_BLOCK) * ACP_BLOCK
            keep_any = gl.load(qend_base + (n0 + BLOCK_N - 1) // ACP_BLOCK) * ACP_BLOCK
            n_bulk = gl.maximum(gl.minimum(keep_all, T) // BLOCK_M * BLOCK_M - n0, BLOCK_N) // BLOCK_M
            n_m = (gl.minimum(keep_any, T) - n0) // BLOCK_M
        FIRST_LOAD: gl.constexpr = 1 if USE_ACP else 0
        for j in gl.static_range(FIRST_LOAD, STAGES):
            _load_q_do(q_desc, do_desc, cq_desc, lse_desc, delta_desc, q_smem, do_smem, cq_smem, lse_smem, delta_smem,
                       q_bars, do_bars, t0 + j, j < n_m, q_row + j * BLOCK_M, h * HEAD_DIM, c_row + j * BLOCK_M,
                       l_row + j * BLOCK_M, STAGES, VECTORS_BY_TMA)
        c_base = C + b.to(gl.int64) * stride_cb + h.to(gl.int64) * stride_ch
        lse_base = LSE + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh
        delta_base = DELTA + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh
        c_ref = gl.load(c_base + n0) * LOG2E
        b_col = c_ref - gl.load(c_base + offs_n) * LOG2E
        dc = gl.zeros([BLOCK_N], gl.float32, keys)
        mbarrier.wait(kv_bar, 0)         # K and V: their copies ran during QEND's and the gate cumsums' loads
        walk = (k_smem, v_smem, q_smem, do_smem, cq_smem, lse_smem, delta_smem, q_bars, do_bars, q_desc, do_desc,
                cq_desc, lse_desc, delta_desc, b_col, offs_n, c_base, lse_base, delta_base, map_base, c_ref, n0, n_m,
                q_row, h * HEAD_DIM, c_row, l_row, qk_scale)
        dk, dv, dc, s, dp = _query_tiles(0, n_diag, t0, dk, dv, dc, s, dp, *walk, st_layout, op_layout, BLOCK_M,
                                         STAGES, ACP_BLOCK, True, PARTIAL, VECTORS_BY_TMA)
        dk, dv, dc, s, dp = _query_tiles(n_diag, n_bulk, t0, dk, dv, dc, s, dp, *walk, st_layout, op_layout, BLOCK_M,
                                         STAGES, ACP_BLOCK, False, False, VECTORS_BY_TMA)
        if PARTIAL:
            dk, dv, dc, s, dp = _query_tiles(n_bulk, n_m, t0, dk, dv, dc, s, dp, *walk, st_layout, op_layout,
                                             BLOCK_M, STAGES, ACP_BLOCK, True, True, VECTORS_BY_TMA)
        dc_base = DC + b.to(gl.int64) * stride_cb + h.to(gl.int64) * stride_ch
        gl.store(dc_base + offs_n, -dc)
        t0 += n_m

    acc_rows: gl.constexpr = gl.SliceLayout(1, acc_layout)
    offs_na = n0 + gl.arange(0, BLOCK_N, layout=acc_rows)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    rows = gl.expand_dims(offs_na, 1) * stride_kt + gl.expand_dims(offs_d, 0)
    base = b.to(gl.int64) * stride_kb + hk.to(gl.int64) * stride_kh
    gl.store(DK + base + rows, (dk * sm_scale).to(DK.dtype.element_ty))
    gl.store(DV + base + rows, dv.to(DV.dtype.element_ty))


def supported(q, k, v, block_m: int) -> bool:
    """Whether the tensors are in this kernel's scope (module docstring): the rows of each as one 2-D TMA view
    (B*T, H*D), 16-byte aligned, and T a multiple of the query tile."""
    _, time, _, dim = q.shape
    return (dim in (64, 128) and q.dtype in (torch.bfloat16, torch.float16) and time % block_m == 0
            and k.shape[1] == time and all(_rows_view(x) is not None for x in (q, k, v)))


def _rows_view(x):
    """x (B, T, H, D) as a (B*T, H*D) matrix (shape, strides), or None where no such strided view exists."""
    batch, time, heads, dim = x.shape
    stride_b, stride_t, stride_h, stride_d = x.stride()
    if stride_d != 1 or stride_h != dim or (batch > 1 and stride_b != time * stride_t):
        return None
    if x.data_ptr() % 16 or stride_t * x.element_size() % 16:
        return None
    return [batch * time, heads * dim], [stride_t, 1]


def _acp_arguments(acp, q):
    """(START, ORDER of the query heads, map stride, USE_ACP) for the query-tile kernels, dummies without ACP."""
    if acp is None:
        return q, q, 0, False
    return acp.start, acp.order, acp.start.stride(0), True


def head_group(tiles: int, group_programs: int) -> int:
    """How many heads of `tiles` programs each go longest tile first together (_program_tile): as many as make
    about group_programs programs, at least one (0: head by head)."""
    return max(1, group_programs // tiles)


def forward(q, k, v, c, o, lse, qk_scale: float, config: tuple[int, int, int, int], acp=None,
            vectors_by_tma: bool = False, group_programs: int = 0, gate_mma: bool = False,
            lazy_rescale: bool = False, persistent: int = 0, q_registers: bool = False,
            split_persistent: bool = False) -> None:
    """Fill o and lse (as _fwd._attn_fwd does) for inputs in scope (`supported`), with ACP's launch.AcpMap if
    given; vectors_by_tma: the keys' gate cumsums arrive with the keys (_vector); group_programs: head_group's;
    gate_mma: the gate bias by the tensor cores, lazy_rescale: conditional rescaling, persistent: that many
    persistent programs per SM, 0 for a program per tile (_attn_fwd_hopper's GATE_MMA, LAZY_RESCALE and
    PERSISTENT). A tile of 4n+1 warps runs the split forward (_attn_fwd_split, n consumer warpgroups; its
    vectors always by TMA; q_registers, split_persistent: its Q_REGISTERS and PERSISTENT)."""
    block_m, block_n, warps, stages = config
    batch, time, heads, dim = q.shape
    start, order, stride_map, use_acp = _acp_arguments(acp, q)
    if warps % 4 == 1:
        parts = split_parts(warps)
        if block_m != parts * SPLIT_ROWS.value or block_n != SPLIT_ROWS.value or parts not in (2, 4):
            raise ValueError(f"forward tile {config}: a split tile has 9 or 17 warps (2 or 4 consumer warpgroups "
                             f"and a producer warp), 64 query rows per consumer and 64 keys per tile")
        q_gate, k_gate = gate_operands(c, qk_scale) if gate_mma else (None, None)
        cap, consumer_registers = split_registers(parts, dim)
        grid = (time // block_m, batch * heads)
        next_item = order                  # unread by a program per tile
        if split_persistent:               # as many programs as fit the SMs, the rest from a zeroed counter
            grid = (min(grid[0] * grid[1], split_programs(parts, dim) * processors(q.device)),)
            next_item = work_counter(q.device)
        _attn_fwd_split[grid](
            _descriptor(q, SPLIT_ROWS.value), _descriptor(k, block_n), _descriptor(v, block_n),
            _descriptor(k_gate, block_n) if gate_mma else _vector_descriptor(c, block_n),
            _descriptor(q_gate, SPLIT_ROWS.value) if gate_mma else None, _descriptor(o, SPLIT_ROWS.value), c, lse,
            start, order, next_item, c.stride(0), c.stride(1), lse.stride(0), lse.stride(1), stride_map, time, heads,
            heads // k.shape[2], head_group(time // block_m, group_programs), batch * heads, qk_scale, HEAD_DIM=dim,
            BLOCK_N=block_n, STAGES=stages, PARTS=parts, ACP_BLOCK=ACP_BLOCK, USE_ACP=use_acp, GATE_MMA=gate_mma,
            LAZY_RESCALE=lazy_rescale, Q_REGISTERS=q_registers, PERSISTENT=split_persistent,
            CONSUMER_REGS=consumer_registers, num_warps=4, maxnreg=cap)
        return
    q_gate, k_gate = gate_operands(c, qk_scale) if gate_mma else (None, None)
    tiles = time // block_m
    grid, next_item, options = _query_tile_launch(tiles, batch * heads, persistent, warps, order, q.device)
    _attn_fwd_hopper[grid](
        _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n),
        _descriptor(k_gate, block_n) if gate_mma else _vector_descriptor(c, block_n, vectors_by_tma),
        _descriptor(q_gate, block_m) if gate_mma else None, _descriptor(o, block_m), c, lse, start, order, next_item,
        c.stride(0), c.stride(1), lse.stride(0), lse.stride(1), stride_map,
        time, heads, heads // k.shape[2], head_group(tiles, group_programs), batch * heads, qk_scale, HEAD_DIM=dim,
        BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, ACP_BLOCK=ACP_BLOCK, USE_ACP=use_acp,
        VECTORS_BY_TMA=vectors_by_tma and not gate_mma, GATE_MMA=gate_mma, LAZY_RESCALE=lazy_rescale,
        PERSISTENT=bool(persistent), num_warps=warps, **options)


def _query_tile_launch(tiles: int, heads: int, persistent: int, warps: int, order, device):
    """(grid, NEXT, launch options) of a kernel over `tiles` query tiles of `heads` heads (the forward, dq): a
    program per tile, NEXT unread (order stands in), or `persistent` programs per SM that take the tiles from a
    zeroed counter, each with its share of the registers (register_cap)."""
    if persistent < 0:
        raise ValueError(f"{persistent} persistent programs per SM (launch.GLUON_FWD_PERSISTENT or "
                         f"GLUON_DQ_PERSISTENT): want 0 (a program per tile) or more")
    if not persistent:
        return (tiles, heads), order, {}
    grid = (min(tiles * heads, persistent * processors(device)),)
    return grid, work_counter(device), {"maxnreg": register_cap(persistent, warps)}


def work_counter(device) -> torch.Tensor:
    """A zeroed count of the work items that persistent programs have taken beyond their first (one per launch:
    the programs add to it)."""
    return torch.zeros(1, device=device, dtype=torch.int32)


def register_cap(programs: int, warps: int) -> int:
    """Registers per thread that let `programs` programs of `warps` warps share an SM's 64K (at most 255): the
    persistent forward's loop state would otherwise take the D=64 forward to 130 registers (168 with ACP), one
    program per SM."""
    return min(255, 65536 // (programs * warps * 32) // 8 * 8)


def split_programs(parts: int, dim: int) -> int:
    """Programs per SM of a split forward of `parts` consumer warpgroups at head dim `dim`: two with two at D=64,
    else one (a D=128 accumulator alone takes 64 registers per thread)."""
    return 2 if parts == 2 and dim <= 64 else 1


def split_registers(parts: int, dim: int) -> tuple[int, int]:
    """(maxnreg, consumer registers) of a split forward (split_programs' programs per SM): the producer warp's
    warpgroup (Triton pads it with idle warps) keeps the minimum, the consumers share the rest."""
    warps = 4 * parts + 4
    cap = register_cap(split_programs(parts, dim), warps)
    return cap, (cap * warps - 4 * PRODUCER_REGISTERS.value) // (4 * parts) // 8 * 8


@functools.cache
def processors(device) -> int:
    """The device's SMs, for persistent programs (here and _gluon_fused's)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _gate_operands(C, QG, KG, T, H, stride_cb, stride_ch, scale, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                   COLUMNS: tl.constexpr):
    """gate_operands' rows for BLOCK_T times of one batch row, all its heads: the operands' (time, head, column)
    block is one contiguous run of memory (a program per head wrote 32-byte pieces H rows apart)."""
    b = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    h = tl.arange(0, BLOCK_H)[None, :]
    inside = (t < T) & (h < H)
    rest = tl.load(C + b.to(tl.int64) * stride_cb + h * stride_ch + t, mask=inside, other=0.0) * scale
    first = rest.to(tl.bfloat16).to(tl.float32)
    rest -= first
    second = rest.to(tl.bfloat16).to(tl.float32)
    third = (rest - second).to(tl.bfloat16).to(tl.float32)
    col = tl.arange(0, COLUMNS)[None, None, :]
    part = tl.where(col % 3 == 0, first[:, :, None], tl.where(col % 3 == 1, second[:, :, None], third[:, :, None]))
    q_side = tl.where(col < 3, 1.0, tl.where(col < 6, part, 0.0))
    k_side = tl.where(col < 3, -part, tl.where(col < 6, 1.0, 0.0))
    offsets = ((b.to(tl.int64) * T + t) * H + h)[:, :, None] * COLUMNS + col
    keep = inside[:, :, None]
    tl.store(QG + offsets, q_side.to(QG.dtype.element_ty), mask=keep)
    tl.store(KG + offsets, k_side.to(KG.dtype.element_ty), mask=keep)


def gate_operands(c, qk_scale: float):
    """(q_gate, k_gate), (B, T, H, GATE_COLUMNS) bf16, whose row products q_gate_i . k_gate_j are c_i - c_j in
    units of the scores before qk_scale (so that times qk_scale they are the gate bias in log2 units): c log2(e) /
    qk_scale in three bf16 parts, 24 bits of mantissa as fp32 has; q's side the parts and ones, k's side ones and
    the parts negated. c: the (B, H, T) fp32 gate cumsums."""
    batch, heads, time = c.shape
    q_gate, k_gate = (torch.empty(batch, time, heads, GATE_COLUMNS.value, device=c.device, dtype=torch.bfloat16)
                      for _ in range(2))
    block_h = triton.next_power_of_2(heads)
    block_t = max(1, 256 // block_h)                 # 4096 elements of each operand per program
    _gate_operands[(triton.cdiv(time, block_t), batch)](
        c, q_gate, k_gate, time, heads, c.stride(0), c.stride(1), LOG2E.value / qk_scale, BLOCK_T=block_t,
        BLOCK_H=block_h, COLUMNS=GATE_COLUMNS.value)
    return q_gate, k_gate


def _descriptor(x, rows: int):
    """A TMA descriptor over x's (B*T, H*D) rows view with [rows, D] blocks."""
    shape, strides = _rows_view(x)
    return TensorDescriptor(x, shape, strides, [rows, x.shape[-1]], _tile_layout(rows, x.shape[-1], x.dtype))


@functools.cache
def _tile_layout(rows: int, dim: int, dtype: torch.dtype):
    """The shared-memory layout of a [rows, dim] TMA tile of dtype. Made once: each launch takes several
    descriptors, and building the layout took about half of a descriptor's host time (~7 of 15 us)."""
    element = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for([rows, dim], element)


def _vector_descriptor(x, block: int, by_tma: bool = True):
    """A TMA descriptor over x's elements (a contiguous fp32 (B, H, T): gate cumsums, lse, delta) in [block]
    blocks, which the kernels address as b * stride(0) + h * stride(1) + t; None unless by_tma (the kernel then
    loads x from global memory and builds no slots for it)."""
    if not by_tma:
        return None
    if not x.is_contiguous() or x.dtype != torch.float32 or x.data_ptr() % 16:
        raise ValueError(f"a (B, H, T) vector for TMA must be contiguous, 16-byte aligned fp32; got {x.dtype} of "
                         f"shape {tuple(x.shape)}, strides {x.stride()}, at an address {x.data_ptr() % 16} bytes past "
                         f"a 16-byte boundary")
    return TensorDescriptor(x, [x.numel()], [1], [block], VECTOR_LAYOUT.value)


def backward_dq(q, k, v, c, do, o, lse, delta, dq, dr, qk_scale: float, sm_scale: float,
                config: tuple[int, int, int, int], acp=None, vectors_by_tma: bool = False,
                group_programs: int = 0, persistent: int = 0) -> None:
    """Fill dq, delta and the row sums dr, as _bwd._attn_bwd_dq does, for inputs in scope (do laid out as q),
    with ACP's launch.AcpMap if given; vectors_by_tma: the keys' gate cumsums arrive with the keys;
    group_programs: head_group's; persistent: that many persistent programs per SM, 0 for a program per tile."""
    block_m, block_n, warps, stages = config
    batch, time, heads, dim = q.shape
    start, order, stride_map, use_acp = _acp_arguments(acp, q)
    tiles = time // block_m
    grid, next_item, options = _query_tile_launch(tiles, batch * heads, persistent, warps, order, q.device)
    _attn_bwd_dq_hopper[grid](
        _descriptor(q, block_m), _descriptor(do, block_m), _descriptor(k, block_n), _descriptor(v, block_n),
        _vector_descriptor(c, block_n, vectors_by_tma), c, o, lse, delta, dq, dr, start, order, next_item,
        dq.stride(0), dq.stride(1), dq.stride(2), o.stride(0), o.stride(1), o.stride(2), c.stride(0), c.stride(1),
        lse.stride(0), lse.stride(1), stride_map, time, heads, heads // k.shape[2], head_group(tiles, group_programs),
        batch * heads, qk_scale, sm_scale, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
        ACP_BLOCK=ACP_BLOCK, USE_ACP=use_acp, VECTORS_BY_TMA=vectors_by_tma, PERSISTENT=bool(persistent),
        num_warps=warps, **options)


def backward_dkdv(q, k, v, c, do, lse, delta, dk, dv, dc, qk_scale: float, sm_scale: float,
                  config: tuple[int, int, int, int], acp=None, vectors_by_tma: bool = False,
                  group_programs: int = 0) -> None:
    """Fill dk, dv and the column sums dc (negated), as _bwd._attn_bwd_dkdv does, from delta; with ACP's
    launch.AcpMap if given. vectors_by_tma: the queries' gate cumsums, lse and delta arrive with the queries and
    dO; group_programs: head_group's."""
    block_m, block_n, warps, stages = config
    batch, time, heads, dim = q.shape
    heads_kv = k.shape[2]
    start, _, stride_map, use_acp = _acp_arguments(acp, q)
    qend, kv_order = (acp.qend, acp.order[batch * heads:]) if use_acp else (q, q)
    _attn_bwd_dkdv_hopper[(time // block_n, batch * heads_kv)](
        _descriptor(q, block_m), _descriptor(do, block_m), _descriptor(k, block_n), _descriptor(v, block_n),
        _vector_descriptor(c, block_m, vectors_by_tma), _vector_descriptor(lse, block_m, vectors_by_tma),
        _vector_descriptor(delta, block_m, vectors_by_tma), c, lse, delta, dk, dv, dc, start, qend, kv_order,
        dk.stride(0), dk.stride(1), dk.stride(2), c.stride(0), c.stride(1), lse.stride(0), lse.stride(1), stride_map,
        time, heads_kv, heads // heads_kv, head_group(time // block_n, group_programs), qk_scale, sm_scale,
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n,
        STAGES=stages, ACP_BLOCK=ACP_BLOCK, USE_ACP=use_acp, VECTORS_BY_TMA=vectors_by_tma, num_warps=warps)
