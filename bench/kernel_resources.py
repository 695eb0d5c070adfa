"""Registers, spills, shared memory and Hopper instructions of the attention kernels, compiled for sm_90a without
a GPU.

    python bench/kernel_resources.py [--dims 64 128] [--variants portable tma tma_ws gluon] [--configs 128x64x4x2 ...]
                                     [--dtype fp16] [--loops] [--persistent PROGRAMS]

Triton compiles for a named target on any machine; ptxas -v (shipped with Triton) reports the spills. The code
is the installed Triton's, which may differ from the device's version in detail, not in trend (run it under the
device's Triton, 3.6, in a venv of its own). A kernel variant that spills more than its sibling is slower on the
device: this is how the ACP kernels were found to pay ~10% with nothing pruned while they had a pipelined loop
of their own (bench/results, docs/PERFORMANCE.md). For the Hopper variants (launch.VARIANTS) each line also
counts the TMA copies (cp.async.bulk.tensor) and wgmma instructions in the PTX and says whether Triton split the
loops into producer and consumer warpgroups (ttg.warp_specialize in the TTGIR) and with how many threads.
For the Gluon kernels (dense and ACP, at the head dims launch.py runs them at) it says whether a loop overlaps: a
`wgmma.wait_group 1` that waits for one wgmma while another stays in flight (the forward's q.k and p.v; dk/dv's
scores and dP, then dP and dv), and whether ptxas serialised the wgmmas (its warning C7515). `--dtype fp16`
compiles the Gluon kernels for fp16 inputs; `--loops` lists each innermost SASS loop's instruction count, CTA
barriers and opcodes (sass_loops): at D=64 the forward is bound by instruction issue, so its unmasked loop's count
per key tile is what a change to it moves (docs/PERFORMANCE.md quotes these counts). `--persistent N` compiles the Gluon
forward and dq with N persistent programs per SM (0: a program per tile) instead of as launch.py runs them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from fox_kernels import _bwd, _fwd, _gluon, _gluon_fused, _hopper, launch  # noqa: E402

BF16, F32, I32 = "*bf16", "*fp32", "*i32"
POINTERS = {
    "fwd": dict(Q=BF16, K=BF16, V=BF16, C=F32, O=BF16, LSE=F32, START=I32, ORDER=I32, CU_SEQLENS=I32),
    "dkdv": dict(Q=BF16, K=BF16, V=BF16, C=F32, DO=BF16, LSE=F32, DELTA=F32, DK=BF16, DV=BF16, DC=F32, START=I32,
                 QEND=I32, ORDER=I32, CU_SEQLENS=I32),
    "dq": dict(Q=BF16, K=BF16, V=BF16, C=F32, DO=BF16, O=BF16, LSE=F32, DELTA=F32, DQ=BF16, DR=F32, START=I32,
               ORDER=I32, CU_SEQLENS=I32),
}
KERNELS = {
    "portable": {"fwd": _fwd._attn_fwd, "dkdv": _bwd._attn_bwd_dkdv, "dq": _bwd._attn_bwd_dq},
    "tma": {"fwd": _hopper._attn_fwd_tma, "dkdv": _hopper._attn_bwd_dkdv_tma, "dq": _hopper._attn_bwd_dq_tma},
}
KERNELS["tma_ws"] = KERNELS["tma"]
OVERLAP_WAIT = "wgmma.wait_group.sync.aligned 1;"
SERIALIZED = "C7515"
"""ptxas's warning that it serialised the wgmmas (an accumulator written by another instruction while in flight),
which undoes any overlap in the source."""


def sass_loops(cubin: bytes, shortest: int = 24) -> list[dict]:
    """The innermost loops of a kernel's SASS (nvdisasm's, shipped with Triton): each predicated backward branch
    to a label closes one (the unpredicated ones at the end return from barrier-wait stubs). Per loop of at least
    `shortest` instructions (shorter ones are those waits) that holds no other: its first address, its static
    instruction count, its CTA barriers (BAR.SYNC: where all the program's warps meet; Triton's shared-memory
    analysis puts them between operations on one allocation, mbarriers included) and the count per opcode. A
    block that the loop branches over still counts: the count is the code a trip may run, the instructions
    issued per tile where the loop is a kernel's tile loop."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    labels, instructions = {}, []
    for line in text.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            labels[label.group(1)] = len(instructions)
        elif instruction := re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line):
            instructions.append((int(instruction.group(1), 16), instruction.group(2)))
    spans = []
    for end, (_, text) in enumerate(instructions):
        target = re.search(r"^@!?P\d\s+BRA\s+`\((\.L_x_\d+)\)", text)
        start = labels.get(target.group(1), end + 1) if target else end + 1
        if start <= end and end + 1 - start >= shortest:
            spans.append((start, end))
    loops = []
    for start, end in spans:
        if any(start <= inner_start and inner_end <= end and (inner_start, inner_end) != (start, end)
               for inner_start, inner_end in spans):
            continue
        opcodes = {}
        barriers = 0
        for _, body in instructions[start:end + 1]:
            instruction = re.sub(r"^@!?U?P\w+\s+", "", body).split()[0]
            opcode = instruction.split(".")[0]
            opcodes[opcode] = opcodes.get(opcode, 0) + 1
            barriers += instruction.startswith("BAR.SYNC")
        loops.append({"address": instructions[start][0], "instructions": end + 1 - start, "cta_barriers": barriers,
                      "opcodes": dict(sorted(opcodes.items(), key=lambda item: -item[1]))})
    return loops


def ptxas() -> str:
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):                 # the newer one reads the newest PTX versions
        if (folder / name).exists():
            return str(folder / name)
    raise FileNotFoundError(f"no ptxas under {folder}")


FUSED_TILES = {dim: (_gluon_fused.HALF.value, _gluon_fused.KEYS.value, 9, stages)
               for dim, stages in launch.GLUON_FUSED_BWD.items()}
"""The fused backward's (queries per step, keys, warps, stages) per head dim."""
GLUON_KERNELS = {"fwd": (_gluon._attn_fwd_hopper, dict(O=BF16, START=I32, ORDER=I32, NEXT=I32),
                         launch.GLUON["fwd"]),
                 "dq": (_gluon._attn_bwd_dq_hopper,
                        dict(O=BF16, DELTA=F32, DQ=BF16, DR=F32, START=I32, ORDER=I32, NEXT=I32),
                        launch.GLUON["dq"]),
                 "dkdv": (_gluon._attn_bwd_dkdv_hopper,
                          dict(DELTA=F32, DK=BF16, DV=BF16, DC=F32, START=I32, QEND=I32, ORDER=I32),
                          launch.GLUON["dkdv"]),
                 "fused": (_gluon_fused._attn_bwd_fused,
                           dict(DK=BF16, DV=BF16, DC=F32, DR=F32, QEND=I32, ORDER=I32, NEXT=I32, KG=BF16),
                           (FUSED_TILES, FUSED_TILES))}
"""Per kernel kind: the Gluon kernel, its pointer arguments besides C and LSE, and the head dims it runs at, dense
and with ACP (launch.GLUON's tiles for them; the fused backward's from launch.GLUON_FUSED_BWD)."""
PERSISTENT_TABLES = {"fwd": launch.GLUON_FWD_PERSISTENT, "dq": launch.GLUON_DQ_PERSISTENT}
"""The Gluon kernels that can run persistent programs: (dense, ACP) programs per SM by head dim, as launched."""


def compile_gluon(kind: str, dim: int, use_acp: bool, config: tuple[int, int, int, int], dtype: str = "bf16",
                  persistent: int | None = None):
    """A Gluon kernel for sm_90a, with tensor descriptors as the launchers make them (dtype's tiles, bf16 gate
    operands, fp32 vectors; the fused backward's dq added into fp32); persistent: programs per SM for a kernel
    that can be persistent (0: a program per tile; None: as launch.py's PERSISTENT_TABLES)."""
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    block_m, block_n, warps, stages = config
    tile_type = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def descriptor(block, dtype=tile_type, columns=dim):
        rows = torch.empty(1024, 2 * columns, dtype=dtype)
        layout = _gluon._tile_layout(block, columns, dtype)
        return mangle_type(TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [block, columns], layout))

    def vector(block):                                   # gate cumsums, lse, delta: fp32 by element
        elements = torch.empty(4096, dtype=torch.float32)
        layout = gl.NVMMASharedLayout.get_default_for([block], gl.float32)
        return mangle_type(TensorDescriptor(elements, [4096], [1], [block], layout))

    fn, pointers, _ = GLUON_KERNELS[kind]
    pointers = {name: f"*{dtype}" if pointer == BF16 and name != "KG" else pointer
                for name, pointer in pointers.items()}
    gate = partial(descriptor, dtype=torch.bfloat16, columns=_gluon.GATE_COLUMNS.value)
    q_rows = block_m
    constexprs = {"HEAD_DIM": dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages}
    gate_mma = (launch.GLUON_FUSED_GATE_MMA if kind == "fused"         # as launch.py runs them
                else kind == "fwd" and dim in launch.GLUON_FWD_GATE_MMA)
    options = {}
    if warps % 4 == 1:          # warp-specialised: consumer warpgroups and a producer warp, a 4-warp default
        if kind == "fwd":       # the split forward, 64 query rows per consumer
            fn, q_rows = _gluon._attn_fwd_split, _gluon.SPLIT_ROWS.value
            parts = _gluon.split_parts(warps)
            options["maxnreg"], constexprs["CONSUMER_REGS"] = _gluon.split_registers(parts, dim)
            constexprs["PARTS"] = parts
            constexprs["Q_REGISTERS"] = dim in launch.GLUON_FWD_Q_REGISTERS
            constexprs["PERSISTENT"] = (dim in launch.GLUON_FWD_SPLIT_PERSISTENT[use_acp] if persistent is None
                                        else bool(persistent))
        warps = 4
    constexprs = {name: value for name, value in {**constexprs, "num_warps": warps}.items() if name in fn.arg_names}
    constexprs.update((name, value) for name, value in (("ACP_BLOCK", 64), ("USE_ACP", use_acp))
                      if name in fn.arg_names)
    if "GATE_MMA" in fn.arg_names:                   # forward: c_desc over k_gate, else qg_desc is None
        constexprs["GATE_MMA"] = gate_mma
        if kind == "fwd" and not gate_mma:
            constexprs["qg_desc"] = None
    if "LAZY_RESCALE" in fn.arg_names:
        constexprs["LAZY_RESCALE"] = dim in launch.GLUON_FWD_LAZY_RESCALE[use_acp]
    options["num_warps"] = warps
    if "PERSISTENT" in fn.arg_names and "PERSISTENT" not in constexprs:
        programs = PERSISTENT_TABLES[kind][use_acp].get(dim, 0) if persistent is None else persistent
        constexprs["PERSISTENT"] = bool(programs)
        if programs:
            options["maxnreg"] = _gluon.register_cap(programs, warps)
    if "VECTORS_BY_TMA" in fn.arg_names:             # without, the vectors' descriptors are None
        by_tma = dim in launch.GLUON_VECTORS_BY_TMA[kind] and not gate_mma
        constexprs["VECTORS_BY_TMA"] = by_tma
        if not by_tma:
            constexprs.update((name, None) for name in ("c_desc", "cq_desc", "lse_desc", "delta_desc")
                              if name in fn.arg_names and not (gate_mma and name == "c_desc"))
    types = {"q_desc": descriptor(q_rows), "do_desc": descriptor(block_m), "k_desc": descriptor(block_n),
             "dq_desc": descriptor(block_m, torch.float32),
             "v_desc": descriptor(block_n), "o_desc": descriptor(q_rows), "qg_desc": gate(q_rows),
             "c_desc": gate(block_n) if gate_mma else vector(block_n),           # the fused kernel has no c_desc
             "cq_desc": gate(block_m) if gate_mma else vector(block_m),          # nor the forward a cq_desc
             "lse_desc": vector(block_m), "delta_desc": vector(block_m), "C": F32, "LSE": F32, "qk_scale": "fp32",
             "sm_scale": "fp32", **pointers}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, entry in signature.items()
               if entry.startswith("*") or name.startswith("stride_") or name == "T"}
    return triton.compile(GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32), options=options)


def compile_kernel(variant: str, kind: str, dim: int, use_acp: bool, config: tuple[int, int, int, int],
                   dtype: str = "bf16", persistent: int | None = None):
    if variant == "gluon":
        return compile_gluon(kind, dim, use_acp, config, dtype, persistent)
    fn = KERNELS[variant][kind]
    block_m, block_n, warps, stages = config
    constexprs = {"HEAD_DIM": dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "ACP_BLOCK": 64, "USE_ACP": use_acp,
                  "IS_VARLEN": False}
    if variant != "portable":
        constexprs["WARP_SPECIALIZE"] = variant == "tma_ws" and kind in launch.WARP_SPECIALIZED
    signature = {name: "constexpr" if name in constexprs else POINTERS[kind].get(
        name, "fp32" if name in ("qk_scale", "sm_scale") else "i32") for name in fn.arg_names}
    # as the launcher specializes them for the benchmark shapes: 16-byte aligned pointers, strides and lengths
    # that are multiples of 16 (without these hints no load is vectorised and the counts mean little)
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*") or name.startswith("stride_") or name in ("T_q", "T_k")}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def resources(variant: str, kind: str, dim: int, use_acp: bool, config=None, dtype: str = "bf16",
              loops: bool = False, persistent: int | None = None) -> dict:
    """Compile one kernel for sm_90a and read its resources (with its SASS loops: sass_loops); a compile error is
    reported, not raised."""
    config = config or (FUSED_TILES[dim] if kind == "fused" else launch.variant_config(kind, dim, use_acp, variant))
    row = {"variant": variant, "kernel": kind, "dim": dim, "acp": use_acp, "config": list(config)}
    try:
        compiled = compile_kernel(variant, kind, dim, use_acp, config, dtype, persistent)
    except Exception as error:                                   # noqa: BLE001 (report, go on)
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}"
        return row
    ptx_text = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        Path(ptx).write_text(ptx_text)
        report = subprocess.run([ptxas(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    threads = re.search(r"\.reqntid (\d+)", ptx_text)
    row.update(registers=int(registers.group(1)) if registers else None,
               spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
               shared=compiled.metadata.shared, threads=int(threads.group(1)) if threads else 32 * config[2],
               tma_copies=ptx_text.count("cp.async.bulk.tensor"), tma_reduces=ptx_text.count("cp.reduce.async.bulk"),
               wgmma=ptx_text.count("wgmma.mma_async"),
               warp_specialized="ttg.warp_specialize" in compiled.asm["ttgir"],
               overlapped=OVERLAP_WAIT in ptx_text, serialized=SERIALIZED in report)
    if loops:
        row["loops"] = sass_loops(compiled.asm["cubin"])
    return row


def describe(row: dict) -> str:
    bm, bn, warps, stages = row["config"]
    head = (f"{row['variant']:<8} {row['kernel']:<4} D={row['dim']:<3} {'acp' if row['acp'] else 'dense':<5} "
            f"{bm}x{bn} w{warps} s{stages}:")
    if "error" in row:
        return f"{head} does not compile: {row['error']}"
    return (f"{head} {row['registers']} registers, spill stores {row['spill_stores']} B, loads {row['spill_loads']} B, "
            f"shared {row['shared']} B, {row['threads']} threads, TMA {row['tma_copies']}, wgmma {row['wgmma']}"
            + (", warp-specialised" if row["warp_specialized"] else "")
            + (", waits with a wgmma in flight" if row["overlapped"] else "")
            + (", wgmma serialised by ptxas" if row["serialized"] else "")
            + (f", TMA reduce-adds {row['tma_reduces']}" if row.get("tma_reduces") else "")
            + "".join(f"\n    loop at {loop['address']:#06x}: {loop['instructions']} instructions, "
                      f"{loop['cta_barriers']} CTA barriers ("
                      + ", ".join(f"{name} {count}" for name, count in list(loop["opcodes"].items())[:8]) + ")"
                      for loop in row.get("loops", [])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--variants", nargs="+", choices=[*KERNELS, "gluon"], default=[*KERNELS, "gluon"])
    parser.add_argument("--kernels", nargs="+", choices=[*POINTERS, "fused"], default=[*POINTERS, "fused"],
                        help="fused: the Gluon warp-specialised backward (dq, dk, dv in one kernel)")
    parser.add_argument("--configs", nargs="+", default=None, metavar="BMxBNxWARPSxSTAGES",
                        help="compile these block configurations instead of the launcher's")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16",
                        help="the Gluon kernels' q, k, v and output tiles (the portable ones compile bf16)")
    parser.add_argument("--loops", action="store_true",
                        help="each SASS loop's instruction count and its most frequent opcodes")
    parser.add_argument("--persistent", type=int, default=None, metavar="PROGRAMS",
                        help="the Gluon forward and dq with this many persistent programs per SM (0: one per "
                             "tile) instead of launch.py's setting")
    args = parser.parse_args()
    if args.persistent is not None and args.persistent < 0:
        parser.error(f"--persistent {args.persistent}: want 0 (a program per tile) or more programs per SM")
    configs = [tuple(int(x) for x in text.split("x")) for text in args.configs] if args.configs else [None]
    print(f"triton {triton.__version__}, sm_90a", flush=True)
    for variant in args.variants:
        for dim in args.dims:
            for kind in args.kernels:
                if kind == "fused" and variant != "gluon":
                    continue
                for use_acp in (False, True):
                    tiles = GLUON_KERNELS[kind][2]          # explicit --configs: ACP wherever dense runs
                    if variant == "gluon" and dim not in tiles[False if args.configs else use_acp]:
                        continue
                    for config in configs:
                        row = resources(variant, kind, dim, use_acp, config, args.dtype, args.loops,
                                        args.persistent)
                        print(describe(row), flush=True)


if __name__ == "__main__":
    main()
