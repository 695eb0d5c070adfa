"""Triton Forgetting Attention kernels on CPU under TRITON_INTERPRET=1, against the float64 reference.

The jit functions are created in interpreter mode only for this module: the kernel modules are imported
afresh with TRITON_INTERPRET=1 set, then the previous modules (if any) are put back, so other test modules in
the same process keep whatever they had (the CPU model path never reaches Triton).
"""

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import fox_kernels
import pytest
import torch
import torch.fx as fx
from fox_kernels import acp_threshold_from_norms, forgetting_attention, forgetting_attention_reference


def _import_interpreted():
    names = ["fox_kernels._acp", "fox_kernels._fwd", "fox_kernels._bwd", "fox_kernels._hopper", "fox_kernels.launch"]
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module("fox_kernels.launch")
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        for name in names[:-1]:                          # package attributes point at the originals again
            if name in saved:
                setattr(fox_kernels, name.rsplit(".", 1)[1], saved[name])
        if "fox_kernels.launch" in saved:
            fox_kernels.launch = saved["fox_kernels.launch"]
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


launch = _import_interpreted()


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while running; set it only for this module's tests."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(batch, t_q, t_k, heads, heads_kv, dim, dtype, gate_range=(8.0, 512.0), seed=0):
    """q, k RMS-normalised; per-head memory length log-uniform in gate_range, log f = -1/L plus noise."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, t_q, heads, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, t_k, heads_kv, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, t_k, heads_kv, dim, generator=gen, dtype=torch.float64)
    q = q / q.pow(2).mean(-1, keepdim=True).sqrt()
    k = k / k.pow(2).mean(-1, keepdim=True).sqrt()
    lo, hi = torch.tensor(gate_range).log()
    memory = (lo + (hi - lo) * torch.rand(heads, generator=gen, dtype=torch.float64)).exp()
    log_f = -(1.0 / memory) * (0.5 + torch.rand(batch, t_k, heads, generator=gen, dtype=torch.float64))
    return q.to(dtype), k.to(dtype), v.to(dtype), log_f.float()


def _rel(x, ref):
    """||x - ref|| / ||ref||, with an absolute floor for references that are exactly zero (dq at T = 1)."""
    floor = 1e-3 * ref.numel() ** 0.5
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(floor)).item()


def _run_kernels(q, k, v, log_f, do, threshold=None, cu_seqlens=None, configs=None):
    """Forward and backward through the interpreted kernels: (o, dq, dk, dv, dlog_f) and the ACP map."""
    configs = configs or {}
    scale = q.shape[-1] ** -0.5
    max_seqlen = None
    if cu_seqlens is not None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    c = launch.gate_cumsum(log_f, cu_seqlens)
    acp = None
    if threshold is not None:
        acp = launch.acp_map(c, threshold, q.shape[1], q.shape[2] // k.shape[2], cu_seqlens, max_seqlen)
    o, lse = launch.attention_forward(q, k, v, c, scale, acp, cu_seqlens, max_seqlen, config=configs.get("fwd"))
    grads = launch.attention_backward(do, q, k, v, o, lse, c, scale, acp, cu_seqlens, max_seqlen,
                                      config_dkdv=configs.get("dkdv"), config_dq=configs.get("dq"))
    return (o, *grads), acp


def _run_reference(q, k, v, log_f, do, threshold=None, cu_seqlens=None):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, log_f)]
    out = forgetting_attention_reference(*leaves, acp_threshold=threshold, cu_seqlens=cu_seqlens,
                                         return_stats=True)
    out[0].backward(do.double())
    return (out[0].detach(), *(x.grad for x in leaves)), out[1]


def _check(case, dtype, tol, threshold_value=None, configs=None, seed=0, gate_range=(8.0, 512.0)):
    batch, t_q, t_k, heads, heads_kv, dim, lengths = case
    q, k, v, log_f = _inputs(batch, t_q, t_k, heads, heads_kv, dim, dtype, gate_range, seed=seed)
    cu_seqlens = None
    if lengths is not None:
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n_seq = batch if cu_seqlens is None else len(lengths)
    threshold = None if threshold_value is None else torch.full((n_seq, heads), threshold_value)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(dtype)
    got, acp = _run_kernels(q, k, v, log_f, do, threshold, cu_seqlens, configs)
    want, stats = _run_reference(q, k, v, log_f, do, threshold, cu_seqlens)
    for name, x, ref in zip(["o", "dq", "dk", "dv", "dlog_f"], got, want, strict=True):
        assert torch.isfinite(x).all(), name
        assert _rel(x, ref) <= tol, (name, _rel(x, ref))
    if acp is None:
        return None
    visited, total = launch.tile_stats(acp.kept, t_q, t_k, heads, cu_seqlens)
    torch.testing.assert_close(visited, stats[0].double())
    torch.testing.assert_close(total, stats[1].double())
    return acp.start


def test_kernels_are_interpreted():
    assert launch.INTERPRETED
    assert not launch.AUTOTUNE
    assert type(launch._fwd._attn_fwd).__name__ == "InterpretedFunction"


# (batch, T_q, T_k, heads, heads_kv, head_dim, varlen lengths)
CASES = [
    (1, 1, 1, 2, 2, 32, None),
    (2, 17, 17, 2, 1, 64, None),               # GQA, tail tiles
    (1, 200, 200, 2, 2, 64, None),
    (1, 70, 300, 2, 1, 32, None),               # T_q < T_k, q_offset not a block multiple
    (1, 301, 301, 2, 1, 32, [5, 1, 170, 125]),  # varlen, ragged
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(str(v) for v in c[:6]) + ("v" if c[6] else ""))
@pytest.mark.parametrize("acp", [False, True])
def test_against_reference_fp32(case, acp):
    # a threshold that prunes with these sharp gates (memory 8-512 steps) but not everything
    _check(case, torch.float32, 2e-4, threshold_value=-6.0 if acp else None)


@pytest.mark.parametrize("configs", [
    {"fwd": (64, 64, 4, 1), "dkdv": (64, 64, 4, 1), "dq": (64, 64, 4, 1)},
    {"fwd": (128, 32, 4, 1), "dkdv": (32, 128, 4, 1), "dq": (128, 64, 4, 1)},
    {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)},
], ids=["64x64", "mixed", "small"])
def test_block_shapes_with_acp(configs):
    start = _check((1, 300, 300, 1, 1, 32, None), torch.float32, 2e-4, threshold_value=-4.0, configs=configs,
                   gate_range=(8.0, 16.0))
    assert int(start.sum()) > 0, "the case must prune some tiles"


@pytest.mark.parametrize("dim", [64, 128])
def test_fp16_t1000(dim):
    _check((1, 1000, 1000, 1, 1, dim, None), torch.float16, 5e-3, threshold_value=-8.0)


HOPPER_CASES = [CASES[1], CASES[2], CASES[3], CASES[4]]   # GQA and tails; no GQA (dk/dv specialised); Tq<Tk; varlen


@pytest.mark.parametrize("case", HOPPER_CASES, ids=lambda c: "x".join(str(v) for v in c[:6]) + ("v" if c[6] else ""))
@pytest.mark.parametrize("acp", [False, True])
@pytest.mark.parametrize("variant", ["tma", "tma_ws"])
def test_hopper_variants_against_reference(case, acp, variant, monkeypatch):
    """The tensor-descriptor kernels (_hopper.py) compute what the portable ones do: the copy engine's zero fill
    and clipped stores stand in for the tail masks, and the warp-specialised single walk masks every tile."""
    monkeypatch.setattr(launch, "KERNEL_VARIANT", variant)
    monkeypatch.setattr(launch, "POISON", True)
    launched = []
    kernels = {name: _Recording(fn, name, launched) for name, fn in launch._TMA_KERNELS.items()}
    monkeypatch.setattr(launch, "_TMA_KERNELS", kernels)
    _check(case, torch.float32, 2e-4, threshold_value=-6.0 if acp else None)
    assert launched == ["fwd", "dq", "dkdv"]


def test_hopper_variant_fp16():
    q, k, v, log_f = _inputs(1, 300, 300, 2, 2, 64, torch.float16)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).half()
    threshold = torch.full((1, 2), -8.0)
    want, _ = _run_reference(q, k, v, log_f, do, threshold)
    launch.KERNEL_VARIANT = "tma_ws"
    try:
        got, _ = _run_kernels(q, k, v, log_f, do, threshold)
    finally:
        launch.KERNEL_VARIANT = "portable"
    for name, x, ref in zip(["o", "dq", "dk", "dv", "dlog_f"], got, want, strict=True):
        assert _rel(x, ref) <= 5e-3, (name, _rel(x, ref))


class _Recording:
    """A kernel that notes its name when launched."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_kernel_variant_selection(monkeypatch):
    """The portable kernels by default off sm_90 ("auto"; here, the interpreter); a forced variant runs as asked
    unless TMA cannot address the tensors (a base that is not 16-byte aligned)."""
    x = torch.zeros(2, 8, 2, 32)
    assert launch.kernel_variant(x) == "portable"
    monkeypatch.setattr(launch, "KERNEL_VARIANT", "tma_ws")
    assert launch.kernel_variant(x) == "tma_ws"
    shifted = torch.zeros(2 * 8 * 2 * 32 + 1)[1:].view(2, 8, 2, 32)
    assert launch.kernel_variant(x, shifted) == "portable"
    assert launch.kernel_variant(torch.zeros(2, 8, 2, 33)[..., :32]) == "portable"    # head stride 132 bytes


def test_kernel_variant_env_is_checked():
    env = {**os.environ, "FOX_KERNELS": "fastest"}
    done = subprocess.run([sys.executable, "-c", "import fox_kernels.launch"], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "FOX_KERNELS='fastest'" in done.stderr and "tma_ws" in done.stderr


def test_gluon_variant_runs_the_portable_kernels_in_the_interpreter(monkeypatch):
    """FOX_KERNELS=gluon: the Gluon kernels need an sm_90 GPU; elsewhere (here, the interpreter) the portable
    kernels run, forward and backward."""
    monkeypatch.setattr(launch, "KERNEL_VARIANT", "gluon")
    launched = []
    kernels = {name: (tuned, _Recording(plain, name, launched)) for name, (tuned, plain) in launch._KERNELS.items()}
    monkeypatch.setattr(launch, "_KERNELS", kernels)
    _check((1, 256, 256, 2, 1, 64, None), torch.float32, 2e-4)
    assert launched == ["fwd", "dq", "dkdv"]


def test_gluon_forward_scope():
    """The Gluon forward takes (B*T, H*D) TMA views with T a multiple of its query tile, D 64 or 128, 16-bit."""
    from fox_kernels import _gluon

    def qkv(time=256, dim=64, dtype=torch.bfloat16, kv_time=None):
        q = torch.zeros(2, time, 4, dim, dtype=dtype)
        k = torch.zeros(2, kv_time or time, 2, dim, dtype=dtype)
        return q, k, k

    assert _gluon.supported(*qkv(), block_m=128)
    assert _gluon.supported(*qkv(dim=128), block_m=64)
    assert not _gluon.supported(*qkv(time=200), block_m=128)                 # a partial query tile
    assert not _gluon.supported(*qkv(dim=32), block_m=128)
    assert not _gluon.supported(*qkv(dtype=torch.float32), block_m=128)
    assert not _gluon.supported(*qkv(kv_time=512), block_m=128)              # T_q < T_k
    fused = torch.zeros(2, 256, 3, 4, 64, dtype=torch.bfloat16)             # q, k, v slices of one projection
    assert _gluon.supported(fused[:, :, 0], fused[:, :, 1], fused[:, :, 2], block_m=128)
    q, k, v = qkv()
    assert not _gluon.supported(torch.zeros(2, 256, 4, 128, dtype=torch.bfloat16)[..., ::2], k, v, block_m=128)
    shifted = torch.zeros(q.numel() + 1, dtype=torch.bfloat16)[1:].view(q.shape)   # base not 16-byte aligned
    assert not _gluon.supported(shifted, k, v, block_m=128)


def test_gate_operands_rebuild_the_gate_bias():
    """_gluon.gate_operands (interpreted here): the row products of its q and k operands, in float64, are the gate
    bias (c_i - c_j) log2(e) / qk_scale to fp32's precision, over cumsums as large as a sharp gate's at T=16384,
    on lengths that are not a multiple of its block; its padding columns are zero."""
    saved = sys.modules.pop("fox_kernels._gluon", None)
    try:
        gluon = importlib.import_module("fox_kernels._gluon")           # its jit functions interpreted
    finally:                        # the module and the package attribute as they were, for other tests
        sys.modules.pop("fox_kernels._gluon", None)
        if saved is None:
            delattr(fox_kernels, "_gluon")
        else:
            sys.modules["fox_kernels._gluon"] = saved
            fox_kernels._gluon = saved
    gen = torch.Generator().manual_seed(1)
    for batch, heads, time in [(2, 3, 300), (1, 2, 64)]:
        log_f = -torch.rand(batch, heads, time, generator=gen) * torch.tensor([0.01, 2.0, 0.3])[:heads, None]
        c = (log_f.double().cumsum(-1) * 4).float()
        c[0, 0, -1] = -16384.0 / 7
        qk_scale = 0.125 * math.log2(math.e)
        q_gate, k_gate = gluon.gate_operands(c, qk_scale)
        assert q_gate.shape == k_gate.shape == (batch, time, heads, 16) and q_gate.dtype == torch.bfloat16
        got = q_gate.double().transpose(1, 2) @ k_gate.double().permute(0, 2, 3, 1)
        cd = c.double()
        want = (cd[..., :, None] - cd[..., None, :]) * math.log2(math.e) / qk_scale
        assert (got - want).abs().max() <= 2.0 ** -22 * want.abs().max()
        assert not q_gate[..., 6:].any() and not k_gate[..., 6:].any()


def test_gluon_kernels_compile_for_hopper_with_overlapped_waits():
    """Under this machine's Triton (CI 3.9; the device 3.6 is checked on the GPU) the Gluon kernels compile for
    sm_90a at the launcher's tiles (dense and with ACP), and each loop waits for one wgmma while another is in
    flight (`wgmma.wait_group 1`: the forward's q.k and p.v, the backward's scores and dP), which ptxas keeps (no
    serialised wgmmas): the overlap they exist for. Only dk/dv at D=128 spills: its 4-warp tile holds dk and dv
    for 64 keys (64 fp32 registers each), and spills 120-216 B under triton 3.6 and 3.9, yet was the fastest
    tile measured (bench/results/attention_sweep_gluon_dkdv_d128_2026-12-02_h200_5c6c8c2.json)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    bench = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
    done = subprocess.run([sys.executable, str(bench), "--variants", "gluon", "--kernels", "fwd", "dkdv", "dq"],
                          env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("gluon")]
    expected = sum(len(tiles) for dense_acp in launch.GLUON.values() for tiles in dense_acp)
    assert done.returncode == 0 and len(lines) == expected, done.stdout + done.stderr
    for line in lines:
        spilled = int(re.search(r"spill stores (\d+) B", line).group(1))
        assert spilled <= (512 if "dkdv D=128" in line else 0), line
        assert "waits with a wgmma in flight" in line and "serialised" not in line, line


def test_persistent_program_count_is_checked():
    """A negative count of persistent programs per SM (a launch setting) is named, not launched as a bad grid."""
    from fox_kernels import _gluon

    assert _gluon._query_tile_launch(32, 12, 0, 8, "order", torch.device("cpu")) == ((32, 12), "order", {})
    with pytest.raises(ValueError, match="-1 persistent programs per SM"):
        _gluon._query_tile_launch(32, 12, -1, 8, "order", torch.device("cpu"))


def test_gluon_persistent_programs_compile_two_to_an_sm():
    """The Gluon forward and dq with two persistent programs per SM (kernel_resources --persistent 2: the D=128
    forward's launch setting; opt-in for the others) compile for sm_90a at the launcher's tiles, dense and with
    ACP, without spills, and two fit an SM: registers within _gluon.register_cap's share, shared memory within
    half of an SM's 228 KB less the 1 KB reserved per program. The split forward (the default tiles) runs one
    program per SM, persistent or not: its own test below."""
    from fox_kernels import _gluon

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    bench = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
    done = subprocess.run([sys.executable, str(bench), "--variants", "gluon", "--kernels", "fwd", "dq",
                           "--persistent", "2"], env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("gluon")]
    expected = sum(len(tiles) for kind in ("fwd", "dq") for tiles in launch.GLUON[kind])
    assert done.returncode == 0 and len(lines) == expected, done.stdout + done.stderr
    persistent = [line for line in lines if "warp-specialised" not in line]   # not the split forward
    assert persistent, done.stdout
    for line in persistent:
        warps = int(re.search(r"(\d+) threads", line).group(1)) // 32
        assert int(re.search(r"(\d+) registers", line).group(1)) <= _gluon.register_cap(2, warps), line
        assert int(re.search(r"shared (\d+) B", line).group(1)) <= 228 * 1024 // 2 - 1024, line
        assert "spill stores 0 B" in line, line


def test_gluon_split_forward_compiles_warp_specialized():
    """The split forward's 9-warp tile (two consumer warpgroups and a producer warp; not a launcher default, so
    not covered above; the 17-warp default is) compiles for sm_90a, dense and with ACP: warp-specialised into 12
    warps (the producer's warpgroup padded), within its register share (_gluon.split_registers). At D=64, two
    programs per SM, that is 80 per thread at launch, and the consumers (104-112) spill a few registers (32-56 B
    under triton 3.6 and 3.9). At D=128, one persistent program per SM (launch.GLUON_FWD_SPLIT_PERSISTENT, O through
    slots of its own), the consumers get 240 and spill nothing, in at most 227 KB of shared memory."""
    from fox_kernels import _gluon

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    bench = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
    done = subprocess.run([sys.executable, str(bench), "--variants", "gluon", "--kernels", "fwd", "--dims", "64",
                           "128", "--configs", "128x64x9x4"], env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("gluon")]
    assert done.returncode == 0 and len(lines) == 4, done.stdout + done.stderr
    for line in lines:
        dim = int(re.search(r"D=(\d+)", line).group(1))
        assert int(re.search(r"(\d+) registers", line).group(1)) <= _gluon.split_registers(2, dim)[0], line
        assert int(re.search(r"spill stores (\d+) B", line).group(1)) <= (64 if dim == 64 else 0), line
        assert "384 threads" in line and "warp-specialised" in line, line
        assert int(re.search(r"shared (\d+) B", line).group(1)) <= 227 * 1024, line


def test_gluon_fused_backward_compiles_warp_specialized_with_tma_reduce_adds():
    """The fused backward (_gluon_fused, launch.GLUON_FUSED_BWD) compiles for sm_90a at its head dims, dense and
    with ACP: warp-specialised into two consumer warpgroups and a producer warp, dq leaving by TMA reduce-add
    (cp.reduce.async.bulk.tensor), each step's dP wait keeping a wgmma in flight, no serialised wgmmas, and few
    registers spilled (12-104 B under triton 3.6 and 3.9: the loop's scalars, not its tiles)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    bench = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
    dims = [str(dim) for dim in launch.GLUON_FUSED_BWD]
    done = subprocess.run([sys.executable, str(bench), "--variants", "gluon", "--kernels", "fused", "--dims", *dims],
                          env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("gluon")]
    assert done.returncode == 0 and len(lines) == 2 * len(dims) > 0, done.stdout + done.stderr
    for line in lines:
        assert "384 threads" in line and "warp-specialised" in line and "TMA reduce-adds" in line, line
        assert int(re.search(r"spill stores (\d+) B", line).group(1)) <= 160, line
        assert "waits with a wgmma in flight" in line and "serialised" not in line, line


def test_gluon_kernels_compile_for_fp16_and_keep_the_forward_loop_lean():
    """With fp16 inputs the Gluon forward and the fused backward compile for sm_90a (fp16 tiles, bf16 gate operands
    as the launchers make them: a mix-up of the two failed only on the GPU, 2026-12-03), and the D=64 dense
    forward's unmasked loop stays lean: at most 360 SASS instructions per 64-key tile (342 under triton 3.6, 345
    under 3.9, with the gate bias by matmul, P packed in pairs and conditional rescaling, whose branch skips 32 of
    them) and no select in it (masks are the diagonal loop's)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    bench = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
    done = subprocess.run([sys.executable, str(bench), "--variants", "gluon", "--kernels", "fwd", "fused", "--dims",
                           "64", "--dtype", "fp16", "--loops"], env=env, capture_output=True, text=True, timeout=900)
    kernels, loops = [], {}
    for line in done.stdout.splitlines():
        if line.startswith("gluon"):
            kernels.append(line)
        elif line.startswith("    loop at") and kernels:
            loops.setdefault(kernels[-1].split(":")[0], []).append(line)
    assert done.returncode == 0 and len(kernels) == 4, done.stdout + done.stderr
    assert not [line for line in kernels if "does not compile" in line], done.stdout
    forward = next(loops[name] for name in loops if name.startswith("gluon    fwd  D=64  dense"))
    sizes = {int(re.search(r": (\d+) instructions", line).group(1)): line for line in forward}
    assert min(sizes) <= 360 and "FSEL" not in sizes[min(sizes)], forward
    assert all(re.search(r"instructions, \d+ CTA barriers", line) for line in forward), forward


@pytest.mark.parametrize("time", [64, 100])
def test_backward_delta_kernel(time):
    """_bwd._attn_bwd_delta (the fused backward's delta, which the dq kernel computes otherwise): rowsum(dO * O)
    in fp32 per head, against float64, also for a last tile that is partly past T."""
    gen = torch.Generator().manual_seed(time)
    o, do = (torch.randn(2, time, 3, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    delta = torch.full((2, 3, time), float("nan"))
    launch._bwd._attn_bwd_delta[(launch.triton.cdiv(time, 64), 6)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), delta.stride(0), delta.stride(1), time, 3,
        HEAD_DIM=32, BLOCK_M=64)
    want = (o.double() * do.double()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(delta.double(), want, rtol=1e-5, atol=1e-5)


def test_dq_from_sums_kernel():
    """launch.dq_from_sums (the fused backward's dq from its fp32 sums): scale * dq_sum in bf16 into a dq whose
    strides are not the sums' (heads before time), over a row count that is not a multiple of its block."""
    gen = torch.Generator().manual_seed(0)
    batch, time, heads, dim = 2, 37, 3, 32
    dq_sum = torch.randn(batch, time, heads, dim, generator=gen)
    dq = torch.full((batch, heads, time, dim), float("nan"), dtype=torch.bfloat16).transpose(1, 2)
    launch.dq_from_sums(dq_sum, dq, 0.125)
    # to bf16's precision: the interpreter rounds toward zero where the GPU rounds to nearest
    torch.testing.assert_close(dq.float(), dq_sum * 0.125, rtol=2.0 ** -7, atol=0.0)


def test_importing_the_model_loads_neither_triton_nor_the_compiler():
    """Importing fox_kernels and every model (the recurrent baselines too) leaves Triton and torch._dynamo
    unloaded: `fox --help` stays quick, and TRITON_INTERPRET, which Triton reads when triton.language is first
    imported, can still be set afterwards (this module's interpreted kernels depend on it)."""
    code = ("import sys, fox_kernels, fox.model, fox.model.baselines, fox.model.recurrences; "
            "print(sorted(m for m in ('triton', 'triton.language', 'torch._dynamo') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_acp_threshold_minus_inf_is_dense():
    q, k, v, log_f = _inputs(1, 130, 130, 2, 2, 32, torch.float32)
    do = torch.randn_like(q)
    dense, _ = _run_kernels(q, k, v, log_f, do)
    none_pruned, acp = _run_kernels(q, k, v, log_f, do, threshold=torch.full((1, 2), float("-inf")))
    assert int(acp.start.sum()) == 0
    for x, y in zip(dense, none_pruned, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _kept_tiles(start, spans):
    """Kept causal 64x64 tiles per (sequence, head), recounted on the host from START (n_seq, H, n_blocks) and
    each sequence's (length, first query position): query block b keeps b + 1 - START[b] key blocks."""
    kept = torch.zeros(start.shape[:2], dtype=torch.int64)
    for index, (length, q_offset) in enumerate(spans):
        for block in range(q_offset // 64, -(-length // 64)):
            kept[index] += block + 1 - start[index, :, block].long()
    return kept


@pytest.mark.parametrize("case", [(2, 640, 640, 6, 2, None), (1, 200, 640, 4, 4, None),
                                  (1, 640, 640, 4, 2, [5, 1, 370, 264])], ids=["gqa", "tq<tk", "varlen"])
def test_launch_order_is_heavy_first(case):
    """ACP launches the heads with the most kept tiles first (ties in index order), key/value heads by their
    group's sum; blocks without queries (before T_k - T_q, past a sequence's end) count nothing."""
    batch, t_q, t_k, heads, heads_kv, lengths = case
    q, k, v, log_f = _inputs(batch, t_q, t_k, heads, heads_kv, 32, torch.float32, (2.0, 400.0), seed=3)
    cu_seqlens = max_seqlen = None
    if lengths is not None:
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        max_seqlen = max(lengths)
    n_seq = batch if lengths is None else len(lengths)
    c = launch.gate_cumsum(log_f, cu_seqlens)
    acp = launch.acp_map(c, torch.full((n_seq, heads), -4.0), t_q, heads // heads_kv, cu_seqlens, max_seqlen)
    spans = [(t_k, t_k - t_q)] * batch if lengths is None else [(length, 0) for length in lengths]
    kept = _kept_tiles(acp.start.view(n_seq, heads, -1), spans)
    kept_kv = kept.view(n_seq, heads_kv, -1).sum(-1)
    assert len(set(kept.flatten().tolist())) > 2, "the case must have heads of different cost"

    def heavy_first(work):
        work = work.flatten().tolist()
        return sorted(range(len(work)), key=lambda i: (-work[i], i))
    assert acp.order.tolist() == heavy_first(kept) + heavy_first(kept_kv)


@pytest.mark.parametrize("lengths", [None, [9000, 1, 8192, 700]], ids=["batch", "varlen"])
def test_gate_cumsum_over_several_blocks(lengths):
    """The gate cumsum and its reverse over sequences of several of its kernel's steps (1024 positions each, or
    up to 8192): the carry from step to step, restarting at each packed sequence, against float64."""
    gen = torch.Generator().manual_seed(5)
    batch, time, heads = (2, 17000, 3) if lengths is None else (1, sum(lengths), 2)
    x = -torch.rand(batch, time, heads, generator=gen, dtype=torch.float64) * 0.01
    cu_seqlens = None if lengths is None else torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()],
                                                           dtype=torch.int32)
    bounds = [(0, time)] if lengths is None else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(),
                                                         strict=True))
    ahead = torch.cat([x[:, lo:hi].cumsum(1) for lo, hi in bounds], 1)
    behind = torch.cat([x[:, lo:hi].flip(1).cumsum(1).flip(1) for lo, hi in bounds], 1)
    c = launch.gate_cumsum(x.float(), cu_seqlens)                                     # (B, H, T)
    assert (c.transpose(1, 2).double() - ahead).abs().max() < 1e-4
    reverse = launch.gate_cumsum(x.float().transpose(1, 2).contiguous(), cu_seqlens, reverse=True)   # (B, T, H)
    assert (reverse.double() - behind).abs().max() < 1e-4


def test_query_row_sums_of_ds_vanish():
    """sum_j dS_ij = 0 (softmax shift invariance): why the gate gradient needs only the column sums."""
    q, k, v, log_f = _inputs(1, 50, 50, 1, 1, 16, torch.float64)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
    c = log_f.double().cumsum(1).transpose(1, 2)
    s = (s + c[..., :, None] - c[..., None, :]).masked_fill(torch.ones(50, 50).triu(1).bool(), float("-inf"))
    s.requires_grad_()
    p = s.softmax(-1)
    (p @ v.transpose(1, 2)).mul(torch.randn(1, 1, 50, 16, dtype=torch.float64)).sum().backward()
    assert s.grad.sum(-1).abs().max() < 1e-12
    assert s.grad.sum(-2).abs().max() > 1e-3


def test_api_dispatches_cpu_to_reference():
    q, k, v, log_f = _inputs(1, 40, 40, 2, 1, 32, torch.float32)
    out = forgetting_attention(q, k, v, log_f)
    torch.testing.assert_close(out, forgetting_attention_reference(q, k, v, log_f))
    with pytest.raises(TypeError, match="float32"):
        forgetting_attention(q, k, v, log_f.half())


@pytest.fixture
def interpreted_ops(monkeypatch):
    """The custom operators call whatever fox_kernels.launch is: here, this module's interpreted kernels."""
    monkeypatch.setattr(fox_kernels, "launch", launch)
    from fox_kernels import api

    return api


@pytest.mark.parametrize("acp", [False, True])
def test_operators_pass_opcheck(interpreted_ops, acp):
    """Schema, fake (shape-only) implementations and autograd registration of both operators, as
    torch.compile relies on them; the backward operator with the forward's saved outputs."""
    q, k, v, log_f = _inputs(1, 70, 130, 2, 1, 32, torch.float32, gate_range=(2.0, 16.0))
    threshold = torch.full((1, 2), -4.0) if acp else None
    leaves = [x.clone().requires_grad_() for x in (q, k, v, log_f)]
    forward = torch.ops.fox_kernels.attention_forward.default
    torch.library.opcheck(forward, (*leaves, 32**-0.5, threshold, None, 0))
    o, lse, c, maps, order, kept = forward(q, k, v, log_f, 32**-0.5, threshold, None, 0)
    assert maps.numel() == (2 * 2 * 3 if acp else 0)
    torch.library.opcheck(torch.ops.fox_kernels.attention_backward.default,
                          (torch.randn_like(q), q, k, v, o, lse, c, maps, order, kept, 32**-0.5, None, 0))


@pytest.mark.parametrize("acp", [False, True])
def test_eager_path_matches_the_operators(interpreted_ops, acp):
    """Eager calls skip the operators' dispatch (_EagerAttention) and must compute what the operators and their
    autograd formula do: the same outputs and gradients, bit for bit (the same kernels, a deterministic
    backward)."""
    q, k, v, log_f = _inputs(1, 70, 130, 2, 1, 32, torch.float32, gate_range=(2.0, 16.0))
    threshold = torch.full((1, 2), -4.0) if acp else None
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for attend in (interpreted_ops._EagerAttention.apply, interpreted_ops.attention_forward_op):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, log_f)]
        outputs = attend(*leaves, 32**-0.5, threshold, None, 0)
        outputs[0].backward(do)
        results.append([*outputs, *(x.grad for x in leaves)])
    for eager, operator in zip(*results, strict=True):
        assert torch.equal(eager, operator)


def test_operators_count_their_flops(interpreted_ops):
    """FlopCounterMode (and so the compiler's recompute solver) sees the causal matmuls: Tq=70 queries as the
    last of Tk=130 keys make 70 * 60 + 70 * 71 / 2 query-key pairs; the backward counts 2.5x the forward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    fake = FakeTensorMode()
    q, k, v, log_f = (fake.from_tensor(x) for x in _inputs(3, 70, 130, 4, 2, 32, torch.float32))
    with fake:
        with FlopCounterMode(display=False) as forward_count:
            o, lse, c, maps, order, kept = torch.ops.fox_kernels.attention_forward(q, k, v, log_f, 0.1, None,
                                                                                   None, 0)
        with FlopCounterMode(display=False) as backward_count:
            torch.ops.fox_kernels.attention_backward(o, q, k, v, o, lse, c, maps, order, kept, 0.1, None, 0)
    pairs = 70 * 60 + 70 * 71 // 2
    assert forward_count.get_total_flops() == 4 * 3 * 4 * 32 * pairs
    assert backward_count.get_total_flops() == 10 * 3 * 4 * 32 * pairs


@pytest.mark.parametrize("lengths", [None, [70, 1, 129]], ids=["batch", "varlen"])
def test_compiled_operator_matches_reference(interpreted_ops, lengths):
    """torch.compile(fullgraph=True) through the operators: no graph break, nothing traced into the kernels,
    output and all four gradients as the float64 reference's, with ACP pruning."""
    batch, t = (2, 200) if lengths is None else (1, sum(lengths))
    q, k, v, log_f = _inputs(batch, t, t, 2, 1, 32, torch.float32, gate_range=(8.0, 16.0), seed=5)
    cu_seqlens = None if lengths is None else torch.tensor([0, 70, 71, 200], dtype=torch.int32)
    threshold = torch.full((batch if lengths is None else 3, 2), -4.0)

    def attend(q, k, v, log_f):
        out, _, _, _, _, kept = interpreted_ops.attention_forward_op(q, k, v, log_f, 32**-0.5, threshold,
                                                                         cu_seqlens, 129)
        return out, kept

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, log_f)]
    out, kept = compiled(*leaves)
    do = torch.randn_like(out)
    out.backward(do)
    want, (want_visited, want_total) = _run_reference(q, k, v, log_f, do, threshold, cu_seqlens)
    for name, x, ref in zip(["o", "dq", "dk", "dv", "dlog_f"], [out] + [x.grad for x in leaves], want,
                            strict=True):
        assert _rel(x.detach(), ref) <= 2e-4, name
    assert bool((want_visited < want_total).any()), "the case must prune"
    torch.testing.assert_close(kept.view(-1, 2).double(), want_visited.double())


def test_varlen_auto_threshold_needs_no_host_sync():
    """"auto" with cu_seqlens: each sequence's own norm bound, gathered on the device (an empty one too)."""
    from fox_kernels.api import _varlen_threshold_from_norms

    q, k, _, _ = _inputs(1, 300, 300, 4, 2, 32, torch.float32)
    bounds = [0, 5, 5, 170, 300]
    got = _varlen_threshold_from_norms(q, k, 32**-0.5, torch.tensor(bounds, dtype=torch.int32))
    for index, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if b > a:
            torch.testing.assert_close(got[index], acp_threshold_from_norms(q[:, a:b], k[:, a:b], 32**-0.5)[0])
    assert torch.isfinite(got).all()


def _block_graphs(interpreted_ops, monkeypatch, budget: float) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The forward and backward graphs that the compiler's min-cut partitioner makes of one FoX (Pro) block at
    an activation memory budget (inductor's partitioner, without its code generation)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    import fox.model.model as model_module
    from fox.model import model_config

    def attend(q, k, v, log_f, *, sm_scale, **_):
        return interpreted_ops.attention_forward_op(q, k, v, log_f, sm_scale, None, None, 0)[0]

    monkeypatch.setattr(model_module, "forgetting_attention", attend)
    monkeypatch.setattr(torch._functorch.config, "activation_memory_budget", budget)
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = model_module.Block(model_config("fox", "pro", "tiny"))
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
    x = torch.randn(1, 128, block.attn.cfg.d_model, requires_grad=True)
    torch.compile(block, backend=backend, fullgraph=True)(x, None).sum().backward()
    torch._dynamo.reset()
    return graphs[0], graphs[1]


def _calls(graph: fx.GraphModule, name: str) -> int:
    return sum(node.op == "call_function" and name in str(node.target) for node in graph.graph.nodes)


def _saved_numel(forward: fx.GraphModule) -> int:
    """Elements of the activations the forward graph hands to the backward (its outputs after the first)."""
    outputs = next(node for node in forward.graph.nodes if node.op == "output").args[0]
    return sum(node.meta["val"].numel() for node in outputs[1:] if isinstance(node, fx.Node)
               and isinstance(node.meta.get("val"), torch.Tensor) and 128 in node.meta["val"].shape)


def test_compile_memory_budget_recomputes_elementwise_work_only(interpreted_ops, monkeypatch):
    """train.compile_memory_budget's default (0.7) on a FoX (Pro) block: the backward reruns neither the
    attention forward nor any matmul of the forward (as at budget 1), and the forward saves less for it."""
    forward_full, backward_full = _block_graphs(interpreted_ops, monkeypatch, 1.0)
    forward, backward = _block_graphs(interpreted_ops, monkeypatch, 0.7)
    assert _calls(backward, "fox_kernels.attention_forward") == 0
    assert _calls(backward, "aten.mm") == _calls(backward_full, "aten.mm")
    assert _saved_numel(forward) < 0.8 * _saved_numel(forward_full)
