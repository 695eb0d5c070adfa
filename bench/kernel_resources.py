"""Registers, spills and shared memory of the attention kernels, compiled for Hopper (sm_90a) without a GPU.

    python bench/kernel_resources.py [--dims 64 128]

Triton compiles for a named target on any machine; ptxas -v (shipped with Triton) reports the spills. The code
is the installed Triton's, which may differ from the device's version in detail, not in trend. A kernel
variant that spills more than its sibling is slower on the device: this is how the ACP kernels were found to
pay ~10% with nothing pruned while they had a pipelined loop of their own (bench/results, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from fox_kernels import _bwd, _fwd, launch  # noqa: E402

BF16, F32, I32 = "*bf16", "*fp32", "*i32"
POINTERS = {
    "fwd": dict(Q=BF16, K=BF16, V=BF16, C=F32, O=BF16, LSE=F32, START=I32, ORDER=I32, CU_SEQLENS=I32),
    "dkdv": dict(Q=BF16, K=BF16, V=BF16, C=F32, DO=BF16, LSE=F32, DELTA=F32, DK=BF16, DV=BF16, DC=F32, START=I32,
                 QEND=I32, ORDER=I32, CU_SEQLENS=I32),
    "dq": dict(Q=BF16, K=BF16, V=BF16, C=F32, DO=BF16, O=BF16, LSE=F32, DELTA=F32, DQ=BF16, DR=F32, START=I32,
               ORDER=I32, CU_SEQLENS=I32),
}
KERNELS = {"fwd": _fwd._attn_fwd, "dkdv": _bwd._attn_bwd_dkdv, "dq": _bwd._attn_bwd_dq}


def ptxas() -> str:
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):                 # the newer one reads the newest PTX versions
        if (folder / name).exists():
            return str(folder / name)
    raise FileNotFoundError(f"no ptxas under {folder}")


def resources(kind: str, dim: int, use_acp: bool) -> str:
    fn = KERNELS[kind]
    block_m, block_n, warps, stages = launch.block_config(kind, dim, use_acp)
    constexprs = {"HEAD_DIM": dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "ACP_BLOCK": 64, "USE_ACP": use_acp,
                  "IS_VARLEN": False}
    signature = {name: "constexpr" if name in constexprs else POINTERS[kind].get(
        name, "fp32" if name in ("qk_scale", "sm_scale") else "i32") for name in fn.arg_names}
    # as the launcher specializes them for the benchmark shapes: 16-byte aligned pointers, strides and lengths
    # that are multiples of 16 (without these hints no load is vectorised and the counts mean little)
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*") or name.startswith("stride_") or name in ("T_q", "T_k")}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        Path(ptx).write_text(compiled.asm["ptx"])
        report = subprocess.run([ptxas(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return (f"{kind:<5} D={dim:<3} {'acp' if use_acp else 'dense':<5} {block_m}x{block_n} w{warps} s{stages}: "
            f"{registers.group(1) if registers else '?'} registers, spill stores {spills.group(1)} B, "
            f"loads {spills.group(2)} B, shared {compiled.metadata.shared} B")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    args = parser.parse_args()
    for dim in args.dims:
        for kind in KERNELS:
            for use_acp in (False, True):
                print(resources(kind, dim, use_acp), flush=True)


if __name__ == "__main__":
    main()
