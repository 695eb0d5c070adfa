"""Training throughput: tokenize, then `fox train` one grid cell on this machine's GPUs, and record the numbers.

    python bench/training.py --model fox --block pro --size tiny --context 2048 --tokens 4194304 --gpus 1
    python bench/training.py ... --gpus 2        # launched through torchrun, one process per GPU

Prints a table and appends a record (device, versions, commit, tokens/s, MFU, loss) to bench/results/.
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


def experiment(args, results: Path) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(results_dir=str(results), experiment="fox-bench-training")
    config["corpus"] = {"name": "stdlib", "source": "stdlib", "max_tokens": args.corpus_tokens, "val_fraction": 0.01}
    config["tokenizer"] = {"name": args.tokenizer, "rank_file": args.rank_file}
    config["grid"] = [{"model": [args.model], "block": [args.block], "size": [args.size], "context": [args.context],
                       "acp": [args.acp]}]
    config["train"] = {"tokens": args.tokens, "tokens_per_step": args.tokens_per_step,
                       "micro_batch_size": args.micro_batch_size, "warmup_tokens": args.tokens // 10,
                       "checkpoint_every_tokens": args.tokens, "keep_checkpoints": 1, "log_every_steps": 5,
                       "zero_stage": args.zero_stage, "precision": "auto",
                       "activation_checkpointing": args.activation_checkpointing}
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fox")
    parser.add_argument("--block", default="pro")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--acp", action="store_true")
    parser.add_argument("--tokens", type=int, default=2**22)
    parser.add_argument("--tokens-per-step", type=int, default=2**17)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--rank-file", default=None)
    parser.add_argument("--corpus-tokens", type=int, default=2**24)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "training.json"))
    args = parser.parse_args()

    from fox import config as fox_config

    work = Path(tempfile.mkdtemp(prefix="fox-bench-"))
    cfg = fox_config.validate(experiment(args, work / "results"))
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    run = fox_config.run_ids(cfg)[0]
    fox = [sys.executable, "-m", "fox.cli"]
    subprocess.run([*fox, "tokenize", "--config", str(config_path)], check=True)
    subprocess.run([*fox, "resolve", "--config", str(config_path), "--run", run, "--out", str(work / "run.json")],
                   check=True)
    launch = fox if args.gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         f"--nproc_per_node={args.gpus}", "-m", "fox.cli"]
    subprocess.run([*launch, "train", "--config", str(work / "run.json")], check=True, env=os.environ)

    summary = json.loads((work / "results" / "runs" / run / "train.json").read_text())
    record = {"date": datetime.date.today().isoformat(), "commit": commit(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "gpus": args.gpus, "torch": torch.__version__, "run": run, "context": args.context,
              "tokens": summary["tokens"], "tokens_per_step": args.tokens_per_step, "zero_stage": args.zero_stage,
              "precision": summary["precision"], "params_paper": summary["params"]["paper"],
              "tokens_per_s": summary["tokens_per_s"], "mfu": summary["mfu"], "final_loss": summary["final_loss"],
              "attn_pruned_fraction": summary["attn_pruned_fraction"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(records + [record], indent=1) + "\n")
    print(f"\n{'run':<32} {'gpus':>4} {'tokens/s':>12} {'mfu':>6} {'loss':>7}")
    mfu = f"{record['mfu']:.3f}" if record["mfu"] is not None else "-"
    print(f"{run:<32} {args.gpus:>4} {record['tokens_per_s']:>12,.0f} {mfu:>6} {record['final_loss']:>7.3f}")


if __name__ == "__main__":
    main()
