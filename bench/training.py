"""Training throughput through `fox train` (the real DeepSpeed path) for several grid cells in one run.

    python bench/training.py --cells fox-pro-760m-ctx16384-dense fox-pro-760m-ctx16384-acp@0.65 \
        transformer-llama-760m-ctx16384-dense [--steps 12] [--micro-batch-size 1] [--accumulation 8]
    python bench/training.py --cells fox-pro-tiny-ctx2048-dense --gpus 2      # torchrun, one process per GPU
    python bench/training.py --cells mamba2-125m-ctx16384-dense deltanet-125m-ctx16384-dense   # needs fla

A cell is a run id; `acp@F` sets the forget-gate biases at init (a linear spread over the heads of each layer,
model.fgate_bias_init) so that ACP prunes a fraction F of the attention tiles, as in a trained FoX (Pro) (the
papers: ~70%): calibrated here by bisection on the untrained model's first forward. Plain `acp` keeps the
paper's init (f ~ 0.5: nearly everything pruned at long contexts). Data: the standard library's sources through
the byte tokenizer, with model.vocab_size 50257 so the embedding and LM head cost what GPT-2's do.
tokens/s is the mean over the log intervals after the first (which holds compilation). Prints a table and
appends one JSON record per cell to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from provenance import commit

REPO = Path(__file__).resolve().parents[1]
GATE_SPREAD = 4.0
"""Forget-gate bias range across the heads of a layer: windows e^4 ~ 55x apart, short to long memories."""
PROFILED_STEP = 2
"""--profile's step: after the compiling step, inside the first log interval, which tokens/s leaves out."""


def parse_cell(cell: str) -> tuple[str, float | None]:
    run, _, target = cell.partition("@")
    return run, float(target) if target else None


def calibrate_gates(run: str, context: int, target: float, vocab: int) -> tuple[float, float]:
    """Gate-bias spread (lo, lo + GATE_SPREAD) at which the model's first forward prunes `target` of its tiles."""
    from fox.config import parse_run_id
    from fox.model import LanguageModel, model_config

    cell = parse_run_id(run)
    ids = torch.randint(0, 256, (1, context), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LanguageModel(model_config(cell["model"], cell["block"], cell["size"], vocab_size=vocab, acp=True))
    model.to(torch.bfloat16)

    def pruned(lo: float) -> float:
        for block in model.blocks:
            block.attn.fgate_proj.bias.data.copy_(torch.linspace(lo, lo + GATE_SPREAD, model.cfg.n_head))
        with torch.no_grad():
            model(ids, ids)
        return model.pruned_fraction()

    low, high = -4.0, 16.0                      # larger biases: f nearer 1, longer memories, less pruned
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if pruned(middle) > target else (low, middle)
    return low, low + GATE_SPREAD


def experiment(args, run: str, results: Path, gate_bias) -> dict:
    from fox.config import parse_run_id

    cell = parse_run_id(run)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    tokens_per_step = cell["context"] * args.micro_batch_size * args.accumulation * args.gpus
    config.update(results_dir=str(results), experiment="fox-bench-training")
    config["corpus"] = {"name": "stdlib", "source": "stdlib", "max_tokens": args.corpus_tokens, "val_fraction": 0.01}
    config["tokenizer"] = {"name": "bytes"}
    config["model"] = {"vocab_size": args.vocab, "fgate_bias_init": list(gate_bias or (0.0, 0.0))}
    config["grid"] = [{key: [cell[key]] for key in ("model", "block", "size", "context", "acp")
                       if cell[key] is not None}]                      # the recurrent baselines have no block
    # one step more than is run: the run stops before its final checkpoint (10 GB at 760M, not what is timed)
    config["train"] = {"tokens": tokens_per_step * (args.steps + 1), "tokens_per_step": tokens_per_step,
                       "micro_batch_size": args.micro_batch_size, "warmup_tokens": tokens_per_step,
                       "checkpoint_every_tokens": tokens_per_step * (args.steps + 2), "keep_checkpoints": 1,
                       "log_every_steps": args.log_every, "zero_stage": args.zero_stage,
                       "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
                       "compile_memory_budget": args.memory_budget,
                       "profile_step": PROFILED_STEP if args.profile else 0}
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["fox-pro-tiny-ctx2048-dense"])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per cell (no final checkpoint)")
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=8, help="micro-batches per optimizer step per GPU")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--memory-budget", type=float, default=0.7, help="train.compile_memory_budget")
    parser.add_argument("--profile", action="store_true",
                        help=f"profile step {PROFILED_STEP} (train.profile_step; in the first log interval, which the "
                             "tokens/s leaves out) and keep its time by kernel family in the record")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--corpus-tokens", type=int, default=2**24)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "training.json"))
    args = parser.parse_args()
    args.compile = {"true": True, "false": False}.get(args.compile, args.compile)
    if args.profile and args.log_every <= PROFILED_STEP:
        parser.error(f"--profile needs --log-every > {PROFILED_STEP}: the profiled step must not be timed")

    from fox import config as fox_config

    work = Path(tempfile.mkdtemp(prefix="fox-bench-"))
    fox = [sys.executable, "-m", "fox.cli"]
    launch = fox if args.gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         f"--nproc_per_node={args.gpus}", "-m", "fox.cli"]
    rows = []
    for spec in args.cells:
        run, target = parse_cell(spec)
        gate_bias = calibrate_gates(run, fox_config.parse_run_id(run)["context"], target, args.vocab) \
            if target is not None else None
        torch.cuda.empty_cache()                          # the calibration model's memory, before training
        cfg = fox_config.validate(experiment(args, run, work / "results", gate_bias))
        config_path = work / f"{run}.yaml"
        config_path.write_text(yaml.safe_dump(cfg))
        subprocess.run([*fox, "tokenize", "--config", str(config_path)], check=True)
        resolved = work / f"{run}.json"
        subprocess.run([*fox, "resolve", "--config", str(config_path), "--run", run, "--out", str(resolved)],
                       check=True)
        run_dir = work / "results" / "runs" / run
        subprocess.run([*launch, "train", "--config", str(resolved), "--stop-after-steps", str(args.steps)],
                       check=True, env=os.environ)
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        steady = log[1:] or log
        record = {"date": datetime.date.today().isoformat(), "commit": commit(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "gpus": args.gpus, "torch": torch.__version__, "cell": spec, "context": cfg["grid"][0]["context"][0],
                  "micro_batch_size": args.micro_batch_size, "accumulation": args.accumulation,
                  "zero_stage": args.zero_stage, "compile": args.compile, "memory_budget": args.memory_budget,
                  "gate_bias": gate_bias,
                  "steps": log[-1]["step"],
                  "tokens_per_s": sum(e["tokens_per_s"] for e in steady) / len(steady),
                  "mfu": steady[-1]["mfu"], "attn_pruned_fraction": steady[-1]["attn_pruned_fraction"],
                  "peak_memory_gb": log[-1].get("peak_memory_gb"), "loss": log[-1]["loss"],
                  "intervals_tokens_per_s": [e["tokens_per_s"] for e in log]}
        if args.profile:
            record["profile"] = json.loads((run_dir / "profile" / f"step{PROFILED_STEP}.json").read_text())
        rows.append(record)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        records = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps(records + [record], indent=1) + "\n")

    print(f"\n{'cell':<40} {'tokens/s':>10} {'mfu':>6} {'pruned':>7} {'peak GiB':>9} {'loss':>7}")
    for r in rows:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        pruned = f"{r['attn_pruned_fraction']:.3f}" if r["attn_pruned_fraction"] is not None else "-"
        peak = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        print(f"{r['cell']:<40} {r['tokens_per_s']:>10,.0f} {mfu:>6} {pruned:>7} {peak:>9} {r['loss']:>7.3f}")


if __name__ == "__main__":
    main()
