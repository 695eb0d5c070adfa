"""Triton Forgetting Attention kernels on a CUDA device, bf16/fp16, against the float64 reference.

Run on the device machine: pytest -m gpu tests/test_kernels_gpu.py. Skipped without CUDA (queried at test
time, never at import).
"""

import math

import pytest
import torch
from fox_kernels import forgetting_attention, forgetting_attention_reference

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _cuda_and_poison():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fox_kernels import launch

    tune = launch.AUTOTUNE
    launch.POISON, launch.AUTOTUNE = True, False        # the fixed configurations, as launched by default
    yield
    launch.POISON, launch.AUTOTUNE = False, tune


def _inputs(batch, t_q, t_k, heads, heads_kv, dim, dtype, gate_range, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape_q, shape_k = (batch, t_q, heads, dim), (batch, t_k, heads_kv, dim)
    q = torch.randn(shape_q, generator=gen, device="cuda", dtype=torch.float64)
    k = torch.randn(shape_k, generator=gen, device="cuda", dtype=torch.float64)
    v = torch.randn(shape_k, generator=gen, device="cuda", dtype=torch.float64)
    q = q / q.pow(2).mean(-1, keepdim=True).sqrt()
    k = k / k.pow(2).mean(-1, keepdim=True).sqrt()
    lo, hi = math.log(gate_range[0]), math.log(gate_range[1])
    memory = (lo + (hi - lo) * torch.rand(heads, generator=gen, device="cuda", dtype=torch.float64)).exp()
    noise = 0.5 + torch.rand(batch, t_k, heads, generator=gen, device="cuda", dtype=torch.float64)
    do = torch.randn(shape_q, generator=gen, device="cuda", dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), (-noise / memory).float(), do.to(dtype)


def _rel(x, ref):
    floor = 1e-3 * ref.numel() ** 0.5
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(floor)).item()


def _grads(fn, q, k, v, log_f, do, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, log_f)]
    out = fn(*leaves, return_stats=True, **kwargs)
    out[0].backward(do)
    return [out[0].detach()] + [x.grad for x in leaves], out[1]


def _check(case, dtype, acp, gate_range=(8.0, 512.0), seed=0):
    batch, t_q, t_k, heads, heads_kv, dim, lengths = case
    q, k, v, log_f, do = _inputs(batch, t_q, t_k, heads, heads_kv, dim, dtype, gate_range, seed)
    kwargs = {}
    if lengths is not None:
        kwargs["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda",
                                            dtype=torch.int32)
    n_seq = batch if lengths is None else len(lengths)
    if acp == "aggressive":                              # prunes a lot: checks the pruning semantics exactly
        kwargs["acp_threshold"] = torch.full((n_seq, heads), -6.0, device="cuda")
    elif acp == "auto":                                  # the eps bound: also close to dense attention
        kwargs["acp_threshold"] = "auto"
    got, stats = _grads(forgetting_attention, q, k, v, log_f, do, **kwargs)
    upcast = [x.double() for x in (q, k, v, log_f, do)]
    want, want_stats = _grads(forgetting_attention_reference, *upcast, **kwargs)
    errors = {}
    for name, x, ref in zip(["o", "dq", "dk", "dv", "dlog_f"], got, want, strict=True):
        assert torch.isfinite(x).all(), name
        errors[name] = _rel(x, ref)
    assert max(errors.values()) <= TOL[dtype], errors
    if acp is not None:
        torch.testing.assert_close(stats[0], want_stats[0].double())
        torch.testing.assert_close(stats[1], want_stats[1].double())
    if acp == "auto":
        kwargs.pop("acp_threshold")
        dense, _ = _grads(forgetting_attention_reference, *upcast, **kwargs)
        assert _rel(got[0], dense[0]) <= TOL[dtype]
    return errors


# (batch, T_q, T_k, heads, heads_kv, head_dim, varlen lengths)
CASES = [
    (2, 1, 1, 4, 4, 64, None),
    (2, 17, 17, 4, 2, 128, None),
    (2, 1000, 1000, 4, 4, 64, None),
    (1, 1000, 1000, 4, 2, 128, None),
    (1, 4096, 4096, 2, 2, 64, None),
    (1, 4096, 4096, 4, 1, 128, None),
    (1, 300, 2048, 4, 2, 64, None),
    (1, 1, 777, 2, 1, 128, None),
    (1, 5000, 5000, 4, 2, 64, [1, 17, 1000, 2982, 1000]),
    (1, 3000, 3000, 2, 2, 128, [700, 64, 2236]),
]


@pytest.mark.parametrize("acp", [None, "aggressive", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(str(v) for v in c[:6]) + ("v" if c[6] else ""))
def test_against_reference(case, dtype, acp):
    _check(case, dtype, acp)


HOPPER_CASES = [CASES[1], CASES[3], CASES[4], CASES[5], CASES[6], CASES[7], CASES[8], CASES[9]]


@pytest.fixture
def hopper_variant(request, monkeypatch):
    """Run the test on one of launch.py's Hopper variants (needs compute capability >= 9.0)."""
    from fox_kernels import launch

    if torch.cuda.get_device_capability() < (9, 0) or not launch.HAS_TENSOR_DESCRIPTORS:
        pytest.skip("needs a Hopper-class GPU and a Triton with tensor descriptors")
    monkeypatch.setattr(launch, "KERNEL_VARIANT", request.param)
    return request.param


@pytest.mark.parametrize("hopper_variant", ["tma", "tma_ws"], indirect=True)
@pytest.mark.parametrize("acp", [None, "aggressive"])           # "auto": test_hopper_16k
@pytest.mark.parametrize("case", HOPPER_CASES,
                         ids=lambda c: "x".join(str(v) for v in c[:6]) + ("v" if c[6] else ""))
def test_hopper_variants(case, acp, hopper_variant):
    from fox_kernels import launch

    q = torch.empty(case[0], case[1], case[3], case[5], device="cuda", dtype=torch.bfloat16)
    assert launch.kernel_variant(q) == hopper_variant
    _check(case, torch.bfloat16, acp)


@pytest.mark.parametrize("hopper_variant", ["tma_ws"], indirect=True)
@pytest.mark.parametrize("acp", [None, "auto"])
def test_hopper_16k(acp, hopper_variant):
    _check((1, 16384, 16384, 2, 2, 64, None), torch.bfloat16, acp, gate_range=(16.0, 16384.0))


@pytest.mark.parametrize("hopper_variant", ["tma", "tma_ws"], indirect=True)
def test_hopper_backward_is_deterministic(hopper_variant):
    q, k, v, log_f, do = _inputs(1, 3000, 3000, 4, 4, 128, torch.bfloat16, (8.0, 512.0), 3)
    kwargs = {"acp_threshold": torch.full((1, 4), -6.0, device="cuda")}
    first, second = (_grads(forgetting_attention, q, k, v, log_f, do, **kwargs)[0] for _ in range(2))
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)


@pytest.fixture
def gluon_calls(monkeypatch):
    """FOX_KERNELS=gluon on an sm_90 GPU; yields (kernel, *q.shape) for each Gluon kernel that ran."""
    from fox_kernels import _gluon, _gluon_fused, launch

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are written for sm_90 (Hopper)")
    monkeypatch.setattr(launch, "KERNEL_VARIANT", "gluon")
    calls = []

    def counting(name, run):
        def counted(q, *args, **kwargs):
            calls.append((name, *q.shape))
            return run(q, *args, **kwargs)
        return counted

    for name in ("forward", "backward_dq", "backward_dkdv"):
        monkeypatch.setattr(_gluon, name, counting(name, getattr(_gluon, name)))
    monkeypatch.setattr(_gluon_fused, "backward", counting("backward_fused", _gluon_fused.backward))
    return calls


def _gluon_expected(batch, time, heads, dim, acp=False, deterministic=False):
    """The Gluon kernels launch.py runs for inputs in scope at this head dim, dense or with ACP (the fused backward
    where launch.GLUON_FUSED_BWD has the head dim, unless deterministic)."""
    from fox_kernels import launch

    kinds = (("forward", "fwd"), ("backward_dq", "dq"), ("backward_dkdv", "dkdv"))
    kernels = [name for name, kind in kinds if dim in launch.GLUON[kind][acp]]
    if dim in launch.GLUON_FUSED_BWD and not deterministic:
        kernels = [name for name in kernels if name == "forward"] + ["backward_fused"]
    return [(name, batch, time, heads, dim) for name in kernels]


# in the Gluon forward's scope (T a multiple of 128, dense; at D=64 T=1152 takes launch.GLUON_FWD_SHORT's tile),
# then two that it hands to the portable kernel
GLUON_CASES = [(2, 1024, 1024, 4, 2, 64, None), (1, 4096, 4096, 4, 1, 128, None), (1, 2048, 2048, 2, 2, 64, None),
               (2, 1000, 1000, 4, 4, 64, None), (1, 300, 2048, 4, 2, 64, None), (1, 1152, 1152, 2, 2, 64, None)]


@pytest.mark.parametrize("gate_range", [(8.0, 512.0), (1.0, 1.0), (1e9, 1e9)], ids=["mixed", "sharp", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GLUON_CASES, ids=lambda c: "x".join(str(v) for v in c[:6]))
def test_gluon_forward(case, dtype, gate_range, gluon_calls):
    _check(case, dtype, None, gate_range=gate_range)
    in_scope = case[1] == case[2] and case[1] % 128 == 0
    assert gluon_calls == (_gluon_expected(case[0], case[1], case[3], case[5]) if in_scope else [])


@pytest.mark.parametrize("acp", ["aggressive", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GLUON_CASES[:3], ids=lambda c: "x".join(str(v) for v in c[:6]))
def test_gluon_acp(case, dtype, acp, gluon_calls):
    """ACP through the Gluon kernels (the forward's and dq's key walks start at the first kept tile, dk/dv's query
    walk stops at QEND, the partly pruned tiles masked): outputs, gradients and stats against float64."""
    _check(case, dtype, acp)
    assert gluon_calls == _gluon_expected(case[0], case[1], case[3], case[5], acp=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gluon_acp_query_tile_over_two_acp_blocks(dtype, gluon_calls, monkeypatch):
    """128-row query tiles in the Gluon forward and dq with ACP (not launch.py's choice, and so not covered
    above): a tile spans two ACP blocks with different first kept keys, and the keys between them are masked."""
    from fox_kernels import launch

    tiles = {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkdv": launch.GLUON_DKDV[64]}
    monkeypatch.setattr(launch, "GLUON", {kind: (dense, {**acp, 64: tiles[kind]})
                                          for kind, (dense, acp) in launch.GLUON.items()})
    monkeypatch.setattr(launch, "GLUON_FUSED_BWD", {})
    _check((2, 2048, 2048, 4, 2, 64, None), dtype, "aggressive")
    assert gluon_calls == [(name, 2, 2048, 4, 64) for name in ("forward", "backward_dq", "backward_dkdv")]


SPLIT_FWD = [(64, (128, 64, 9, 4)), (64, (256, 64, 17, 4)), (128, (128, 64, 9, 4))]


@pytest.mark.parametrize("gate_mma, q_registers", [(True, True), (True, False), (False, True)],
                         ids=["gate_mma-q_registers", "gate_mma-q_shared", "gate_fma-q_registers"])
@pytest.mark.parametrize("dim, tile", SPLIT_FWD, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x)
@pytest.mark.parametrize("acp", [None, "aggressive"])
@pytest.mark.parametrize("case", [(2, 4096, 4096, 8, 2, None), (1, 256, 256, 3, 3, None)],
                         ids=lambda c: "x".join(str(v) for v in c[:5]))
def test_gluon_split_forward(case, acp, dim, tile, gate_mma, q_registers, gluon_calls, monkeypatch):
    """The split forward (consumer warpgroups of 64 query rows, a producer warp feeding them; the gate bias by matmul or
    by FMA; Q from registers or shared memory), dense and with ACP, at D=64 and 128: a one-tile walk whose first
    warpgroups free the slots past their rows without using them, ACP's blocks of a tile starting their walks at
    different key tiles, grouped heads, sharp gates and gates that forget nothing."""
    from fox_kernels import launch

    dense, sparse = launch.GLUON["fwd"]
    monkeypatch.setattr(launch, "GLUON", {**launch.GLUON, "fwd": ({**dense, dim: tile}, {**sparse, dim: tile})})
    monkeypatch.setattr(launch, "GLUON_FWD_GATE_MMA", (dim,) if gate_mma else ())
    monkeypatch.setattr(launch, "GLUON_FWD_Q_REGISTERS", (dim,) if q_registers else ())
    case = (*case[:5], dim, case[5])
    for seed, gate_range in enumerate([(8.0, 512.0), (1.0, 1.0)]):
        _check(case, torch.bfloat16, acp, gate_range=gate_range, seed=seed)
    assert ("forward", *case[:2], case[3], dim) in gluon_calls


@pytest.mark.parametrize("acp", [None, "aggressive"])
@pytest.mark.parametrize("dim", [64, 128])
def test_gluon_split_forward_persistent(dim, acp, gluon_calls, monkeypatch):
    """launch.GLUON_FWD_SPLIT_PERSISTENT: the split forward's programs take query tiles one after another, the slot
    ring, the barriers' phases and the Q slots' hand-over carried across tiles of different walk lengths; more
    tiles than programs (2x4096x8) and fewer (1x1024x4), dense and with ACP, mixed and sharp gates: against
    float64."""
    from fox_kernels import launch

    monkeypatch.setattr(launch, "GLUON_FWD_SPLIT_PERSISTENT", ((dim,), (dim,)))
    for seed, gate_range in enumerate([(8.0, 512.0), (1.0, 1.0)]):
        for case in [(2, 4096, 4096, 8, 2, dim, None), (1, 1024, 1024, 4, 4, dim, None)]:
            _check(case, torch.bfloat16, acp, gate_range=gate_range, seed=seed)
    assert ("forward", 2, 4096, 8, dim) in gluon_calls and ("forward", 1, 1024, 4, dim) in gluon_calls


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("case", [(2, 2048, 2048, 4, 2, 64, None), (1, 4096, 4096, 3, 3, 64, None),
                                  (1, 1024, 1024, 4, 1, 64, None)], ids=lambda c: "x".join(str(v) for v in c[:6]))
@pytest.mark.parametrize("acp", [None, "aggressive", "auto"])
def test_gluon_fused_backward(case, acp, stages, gluon_calls, monkeypatch):
    """launch.GLUON_FUSED_BWD: one warp-specialised kernel computes dq, dk, dv and the gate gradient, and neither
    the dq nor the dk/dv kernel runs; against float64, dense and with ACP (a key half's query walk stopping
    before the other's), grouped heads (a key/value head adds into its group's dq), sharp gates too. Under
    torch.use_deterministic_algorithms the two deterministic kernels run instead."""
    from fox_kernels import launch

    monkeypatch.setattr(launch, "GLUON_FUSED_BWD", {64: stages})
    for seed, gate_range in enumerate([(8.0, 512.0), (1.0, 1.0)]):
        _check(case, torch.bfloat16, acp, gate_range=gate_range, seed=seed)
    batch, time, _, heads, _, dim, _ = case
    assert gluon_calls == 2 * _gluon_expected(batch, time, heads, dim, acp is not None)
    gluon_calls.clear()
    torch.use_deterministic_algorithms(True, warn_only=True)      # the reference's ops may only warn
    try:
        _check(case, torch.bfloat16, acp)
    finally:
        torch.use_deterministic_algorithms(False)
    assert gluon_calls == _gluon_expected(batch, time, heads, dim, acp is not None, deterministic=True)


@pytest.mark.parametrize("acp", [None, "aggressive"])
@pytest.mark.parametrize("case", [(2, 1024, 1024, 4, 2, 64, None), (1, 4096, 4096, 3, 3, 64, None)])
def test_gluon_fused_backward_fma_bias(case, acp, gluon_calls, monkeypatch):
    """launch.GLUON_FUSED_GATE_MMA off: the fused backward adds the gate bias to its scores by FMA (the other tests
    run the tensor-core bias, grouped heads included), dense and with ACP, mixed and sharp gates, against float64."""
    from fox_kernels import launch

    monkeypatch.setattr(launch, "GLUON_FUSED_GATE_MMA", False)
    for seed, gate_range in enumerate([(8.0, 512.0), (1.0, 1.0)]):
        _check(case, torch.bfloat16, acp, gate_range=gate_range, seed=seed)
    batch, time, _, heads, _, dim, _ = case
    assert gluon_calls == 2 * _gluon_expected(batch, time, heads, dim, acp is not None)


@pytest.mark.parametrize("by_tma", [True, False], ids=["tma", "loads"])
@pytest.mark.parametrize("acp", [None, "aggressive"])
@pytest.mark.parametrize("dim", [64, 128])
def test_gluon_vectors_by_tma(dim, acp, by_tma, gluon_calls, monkeypatch):
    """launch.GLUON_VECTORS_BY_TMA either way for every Gluon kernel (the default takes each way at some head
    dim): the per-tile vectors by TMA into shared memory, or by global loads, against float64."""
    from fox_kernels import launch

    dims = (dim,) if by_tma else ()
    monkeypatch.setattr(launch, "GLUON_VECTORS_BY_TMA", {"fwd": dims, "dq": dims, "dkdv": dims})
    monkeypatch.setattr(launch, "GLUON_FUSED_BWD", {})                # the dq and dk/dv kernels at every dim
    _check((2, 2048, 2048, 4, 2, dim, None), torch.bfloat16, acp)
    assert gluon_calls == _gluon_expected(2, 2048, 4, dim, acp is not None)


@pytest.mark.parametrize("gate_range", [(8.0, 512.0), (1.0, 1.0), (1e9, 1e9)], ids=["mixed", "sharp", "none"])
@pytest.mark.parametrize("gate_mma", [True, False], ids=["gate_mma", "fma"])
@pytest.mark.parametrize("dim", [64, 128])
def test_gluon_forward_gate_bias(dim, gate_mma, gate_range, gluon_calls, monkeypatch):
    """launch.GLUON_FWD_GATE_MMA either way at both head dims: the dense forward (_attn_fwd_hopper) with the gate
    bias added by the tensor cores (GATE_MMA, its operands from gate_operands) or by one FMA per key,
    GQA, over T=4096 where the sharp gates' cumsums reach -4096 and the bias's two large parts must cancel
    exactly: against float64. On launch.GLUON_FWD_SHORT's tile (the split forward, the default tile, has its own
    test of both)."""
    from fox_kernels import launch

    monkeypatch.setattr(launch, "GLUON_FWD_GATE_MMA", (dim,) if gate_mma else ())
    dense, sparse = launch.GLUON["fwd"]
    tile = launch.GLUON_FWD_SHORT.get(dim, dense[dim])
    monkeypatch.setattr(launch, "GLUON", {**launch.GLUON, "fwd": ({**dense, dim: tile}, sparse)})
    _check((1, 4096, 4096, 4, 2, dim, None), torch.bfloat16, None, gate_range=gate_range)
    assert gluon_calls == _gluon_expected(1, 4096, 4, dim)


@pytest.mark.parametrize("group_programs", [0, 100])
@pytest.mark.parametrize("acp", [None, "aggressive"])
@pytest.mark.parametrize("dim", [64, 128])
def test_gluon_head_groups(dim, acp, group_programs, gluon_calls, monkeypatch):
    """launch.GLUON_GROUP_PROGRAMS: the forward, dq and dk/dv kernels take their heads in groups, each group's tiles
    longest first; with 10 heads of 16 or 32 tiles, groups of 6 and 4 heads or of 3 and 1 (the last one short),
    and head by head. Every tile of every head is computed once: against float64."""
    from fox_kernels import launch

    monkeypatch.setattr(launch, "GLUON_GROUP_PROGRAMS", group_programs)
    monkeypatch.setattr(launch, "GLUON_FUSED_BWD", {})                # the dq and dk/dv kernels at every dim
    _check((2, 2048, 2048, 5, 5, dim, None), torch.bfloat16, acp)
    assert gluon_calls == _gluon_expected(2, 2048, 5, dim, acp is not None)


@pytest.mark.parametrize("programs", [0, 1, 2], ids=["per_tile", "persistent1", "persistent2"])
@pytest.mark.parametrize("acp", [None, "aggressive"])
@pytest.mark.parametrize(("kernel", "dim"), [("forward", 64), ("forward", 128), ("backward_dq", 128)])
def test_gluon_persistent_programs(kernel, dim, acp, programs, gluon_calls, monkeypatch):
    """launch.GLUON_FWD_PERSISTENT (on GLUON_FWD_SHORT's tile) and GLUON_DQ_PERSISTENT either way: a program per query
    tile, or 1 or 2 persistent programs per SM taking tiles from a counter, each with the next one's loads in flight
    while one ends (the slot ring and the barriers' phases carried across tiles of different walk lengths). More tiles
    than programs (2x4096x8) and fewer (1x1024x4), dense and with ACP, mixed and sharp gates: against float64."""
    from fox_kernels import launch

    table = {"forward": "GLUON_FWD_PERSISTENT", "backward_dq": "GLUON_DQ_PERSISTENT"}[kernel]
    monkeypatch.setattr(launch, table, ({dim: programs} if programs else {},) * 2)
    if kernel == "forward":                # the split forward (the default tile) has its own setting
        monkeypatch.setattr(launch, "GLUON", {**launch.GLUON, "fwd": tuple({**tiles, dim: launch.GLUON_FWD_SHORT[dim]}
                                                                           for tiles in launch.GLUON["fwd"])})
    for seed, gate_range in enumerate([(8.0, 512.0), (1.0, 1.0)]):
        for case in [(2, 4096, 4096, 8, 2, dim, None), (1, 1024, 1024, 4, 4, dim, None)]:
            _check(case, torch.bfloat16, acp, gate_range=gate_range, seed=seed)
    assert (kernel, 2, 4096, 8, dim) in gluon_calls and (kernel, 1, 1024, 4, dim) in gluon_calls


def test_gluon_forward_16k(gluon_calls):
    _check((1, 16384, 16384, 2, 1, 64, None), torch.bfloat16, None, gate_range=(16.0, 16384.0))
    assert gluon_calls == _gluon_expected(1, 16384, 2, 64)


@pytest.mark.parametrize("dim", [64, 128])
def test_gluon_backward_is_deterministic(dim, gluon_calls):
    """Bit-identical gradients from the same inputs: by default, or where launch.GLUON_FUSED_BWD adds dq by TMA
    (in an order that varies), under torch.use_deterministic_algorithms."""
    from fox_kernels import launch

    q, k, v, log_f, do = _inputs(1, 2048, 2048, 4, 2, dim, torch.bfloat16, (8.0, 512.0), 5)
    deterministic = dim in launch.GLUON_FUSED_BWD
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        first, second = (_grads(forgetting_attention, q, k, v, log_f, do)[0] for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    assert gluon_calls == 2 * _gluon_expected(1, 2048, 4, dim, deterministic=deterministic)


@pytest.mark.parametrize("acp", [None, "auto"])
def test_16k(acp):
    _check((1, 16384, 16384, 2, 1, 64, None), torch.bfloat16, acp, gate_range=(16.0, 16384.0))


def test_attention_kernels_names_what_runs():
    """The record of which kernels ran: by default ("auto") the Gluon ones on an sm_90 GPU, else portable."""
    from fox_kernels import attention_kernels, launch

    if launch.KERNEL_VARIANT != "auto":
        pytest.skip(f"FOX_KERNELS={launch.KERNEL_VARIANT} is set")
    assert attention_kernels("cuda") == ("gluon" if torch.cuda.get_device_capability() == (9, 0) else "portable")
    assert attention_kernels("cpu") == "reference"


def test_rejects_16bit_gate():
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        forgetting_attention(q, q, q, torch.zeros(1, 8, 2, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("acp", [None, "aggressive"])
def test_backward_is_deterministic(acp):
    """No floating-point atomics (the map's integer ones are exact): two runs give bit-identical outputs and
    gradients (resumed training is exact)."""
    q, k, v, log_f, do = _inputs(1, 3000, 3000, 4, 2, 128, torch.bfloat16, (8.0, 512.0), 3)
    kwargs = {} if acp is None else {"acp_threshold": torch.full((1, 4), -6.0, device="cuda")}
    first, second = (_grads(forgetting_attention, q, k, v, log_f, do, **kwargs)[0] for _ in range(2))
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
