"""How the backward's rounding reaches d log f: the gate gradient from dS's row and column sums, in float32 as the
kernels compute it, against float64, for the ways a kernel can take those sums.

    python bench/gate_gradient_precision.py [--time 2048] [--dim 64]

d log f[t] = reverse_cumsum(rowsum(dS) - colsum(dS)). The row sums are zero in exact arithmetic, but delta comes
from the 16-bit output: the kernels' row sums carry that rounding, which cancels against the column sums only
when both are sums of the same dS (kernels/fox_kernels/_bwd.py). The fused backward
(kernels/fox_kernels/_gluon_fused.py) sums the 16-bit dS that its matmuls read, rows and columns alike. Prints,
per gate, the largest error of d log f relative to its largest value, and writes JSON
(bench/results/gate_gradient_precision_<date>.json by default). CPU, seconds.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F
from provenance import record_path, write_record

SCHEMES = {
    "rows and columns of float32 dS (the unfused kernels)": ("fp32", "fp32"),
    "rows and columns of 16-bit dS (the fused backward)": ("bf16", "bf16"),
    "rows of 16-bit dS, columns of float32 dS": ("bf16", "fp32"),
    "columns only": (None, "fp32"),
}


def gate_gradient(q, k, v, log_f, do, dtype, scheme=("fp32", "fp32")):
    """d log f of causal forgetting attention (B, H, T, D inputs); in float32 delta comes from the 16-bit output,
    as in the kernels."""
    q, k, v, do = (x.to(dtype) for x in (q, k, v, do))
    time, dim = q.shape[-2:]
    c = log_f.to(dtype).cumsum(-1)
    scores = q @ k.transpose(-1, -2) / dim ** 0.5 + c[..., :, None] - c[..., None, :]
    p = scores.masked_fill(torch.ones(time, time, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    o = p @ v
    if dtype == torch.float32:
        o = o.bfloat16().float()
    ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    as_summed = {"fp32": ds, "bf16": ds.bfloat16().to(dtype)}
    rows, columns = scheme
    dc = -as_summed[columns].sum(-2)
    if rows is not None:
        dc = dc + as_summed[rows].sum(-1)
    return dc.flip(-1).cumsum(-1).flip(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    generator = torch.Generator().manual_seed(0)
    for gate, bias in (("sharp", 0.0), ("mild", 6.0)):
        shape = (1, args.heads, args.time, args.dim)
        q, k, v, do = (torch.randn(shape, generator=generator).bfloat16() for _ in range(4))
        q, k = (F.rms_norm(x.float(), (args.dim,)).bfloat16() for x in (q, k))
        log_f = F.logsigmoid(2 * torch.randn(shape[:3], generator=generator) + bias)
        exact = gate_gradient(q, k, v, log_f, do, torch.float64)
        for name, scheme in SCHEMES.items():
            error = (gate_gradient(q, k, v, log_f, do, torch.float32, scheme).double() - exact).abs().max()
            relative = error.item() / exact.abs().max().item()
            rows.append({"gate": gate, "scheme": name, "relative_error": relative})
            print(f"{gate:>5}  {name:<55} {relative:.2e}")
    date = datetime.date.today().isoformat()
    out = record_path("gate_gradient_precision", args.out, date)
    write_record(out, {"date": date, "torch": torch.__version__, "time": args.time, "dim": args.dim,
                       "heads": args.heads, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
