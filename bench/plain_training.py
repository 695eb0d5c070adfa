"""Training throughput of one model in a plain PyTorch harness: the yardstick, and the same harness for any
other FoX implementation, so that fox's model and another's are timed the same way.

    python bench/plain_training.py --model yardstick                 # plain LLaMA 760M, compiled
    python bench/plain_training.py --model fox-pro-760m [--acp 0.65]   # fox's model, this harness
    python bench/plain_training.py --factory MODULE:FUNCTION ...      # any model: FUNCTION(context) returns
                                                                      # (module, loss_fn(module, ids, targets))
    python bench/plain_training.py --model fox-pro-760m --compile-blocks --profile   # where a step's time goes
    python bench/plain_training.py --model fox-pro-760m --kernels /tmp/old/kernels   # another checkout's kernels

Harness: fp32 weights on one GPU, bf16 autocast, fused AdamW, micro-batch 1 x context, `--accumulation`
micro-batches per optimizer step, no activation checkpointing; tokens/s over the steps after `--warmup`, peak
memory. Prints one line and appends a JSON record to --out. --profile adds one more step under torch.profiler:
device time per kernel family (attention, GEMMs, inductor's fused kernels, optimizer, the rest) and the top
kernels, printed and kept in the record.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import commit

REPO = Path(__file__).resolve().parents[1]


def fox_model(name: str, context: int, acp_bias: tuple[float, float] | None):
    """fox's LanguageModel, e.g. fox-pro-760m; acp_bias: ACP on, with this forget-gate bias spread."""
    from fox.model import LanguageModel, model_config

    arch, block, size = name.split("-")
    extra = {"acp": True, "fgate_bias_init": acp_bias} if acp_bias is not None else {}
    model = LanguageModel(model_config(arch, block, size, **extra))
    return model, lambda module, ids, targets: module(ids, targets)


def yardstick(context: int):
    from yardstick import Llama

    return Llama(), lambda module, ids, targets: module(ids, targets)


def profile_step(step) -> dict:
    """Device time of one optimizer step by kernel family and the longest kernels, in ms (as `fox train`'s
    train.profile_step reports it)."""
    from fox.train.profiling import StepProfile

    with tempfile.TemporaryDirectory() as folder, StepProfile(Path(folder), 1, torch.device("cuda")) as profile:
        step()
    return profile.summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="yardstick, or fox's <arch>-<block>-<size>")
    parser.add_argument("--factory", help="MODULE:FUNCTION building another implementation")
    parser.add_argument("--label", help="name of the record (default: --model or --factory)")
    parser.add_argument("--acp-bias", type=float, nargs=2, help="fox models: ACP with this gate-bias spread")
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole module")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="fox models: compile as fox train does (fox.train.compile, its default memory budget)")
    parser.add_argument("--profile", action="store_true", help="one more step under torch.profiler, by kernel family")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps timed")
    parser.add_argument("--kernels", default=str(REPO / "kernels"),
                        help="the folder holding fox_kernels to train with (default: this checkout's)")
    parser.add_argument("--out", default="bench/results/plain_training.json")
    args = parser.parse_args()
    if not (Path(args.kernels) / "fox_kernels").is_dir():
        parser.error(f"--kernels {args.kernels}: no fox_kernels package in it (want a checkout's kernels/ folder)")
    sys.path[:0] = [str(REPO / "src"), args.kernels]

    torch.manual_seed(0)
    if args.factory:
        module_name, function = args.factory.split(":")
        model, loss_fn = getattr(importlib.import_module(module_name), function)(args.context)
    elif args.model == "yardstick":
        model, loss_fn = yardstick(args.context)
    else:
        model, loss_fn = fox_model(args.model, args.context, tuple(args.acp_bias) if args.acp_bias else None)
    model = model.cuda()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    step_fn = torch.compile(model) if args.compile else model
    if args.compile_blocks:
        from fox.train.compile import compile_model

        compile_model(model)
    vocab = 50257
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step() -> torch.Tensor:
        total = torch.zeros((), device="cuda")
        for _ in range(args.accumulation):
            ids = torch.randint(0, vocab, (1, args.context + 1), device="cuda", generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(step_fn, ids[:, :-1], ids[:, 1:])
            (loss / args.accumulation).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / args.accumulation

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = args.steps * args.accumulation * args.context / elapsed
    record = {"date": datetime.date.today().isoformat(), "commit": commit(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "label": args.label or args.model or args.factory,
              "compile": args.compile, "acp_bias": args.acp_bias, "context": args.context,
              "accumulation": args.accumulation, "params_total": params, "tokens_per_s": tokens_per_s,
              "compile_blocks": args.compile_blocks, "kernels": str(Path(args.kernels).resolve()),
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}
    if args.profile:
        record["profile"] = profile_step(step)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(records + [record], indent=1) + "\n")
    print(f"[plain] {record['label']:<32} compile={args.compile!s:<5} {tokens_per_s:>10,.0f} tok/s  "
          f"peak {record['peak_memory_gb']:.1f} GiB  loss {record['loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
