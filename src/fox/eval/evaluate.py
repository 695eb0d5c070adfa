"""`fox evaluate`: everything measured on one averaged model, written to eval/{run}.json and logged to MLflow.

JSON keys (the report stage reads them): run, grid, params, tokens, train_ctx, acp, train_tokens_per_s, mfu,
val_loss, val_ppl_at_train_ctx, val_ppl_at_4x_ctx, loss_by_position {positions, loss}, ppl_by_length
{lengths, ppl}, lm_eval {task: {metric: value}}, niah {lengths, depths, acc, mean_acc}, acp_stats
{pruned_fraction, per_layer_head} (null for dense runs).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import tiktoken
import torch

from fox.data import TokenizerConfig, check_manifest, get_tokenizer, load_manifest
from fox.eval.acp import AcpTally
from fox.eval.average import load_model
from fox.eval.lm_eval_adapter import FoxLM, run_lm_eval
from fox.eval.local_tasks import LOCAL_TASKS, write_local_tasks
from fox.eval.niah import needle_in_haystack
from fox.eval.perplexity import validation_metrics
from fox.files import write_atomic
from fox.model import LanguageModel
from fox.tracking import log_evaluation

T = TypeVar("T")


def inference_mode(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs (the Triton attention kernels take 16-bit inputs); fp32 on the CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _timed(seconds: dict, name: str, compute: Callable[[], T]) -> T:
    start = time.perf_counter()
    value = compute()
    seconds[name] = time.perf_counter() - start
    return value


def lm_eval_scores(run_cfg: dict, model: LanguageModel, tokenizer: tiktoken.Encoding) -> dict:
    """Zero-shot lm-eval results; the local tasks are (re)written first when the task list names them."""
    cfg, context = run_cfg["evaluate"]["lm_eval"], run_cfg["train"]["context"]
    if not cfg["tasks"]:
        return {}
    tasks_dir = Path(run_cfg["results_dir"]) / "eval" / "tasks"
    if set(cfg["tasks"]) & set(LOCAL_TASKS):
        write_local_tasks(run_cfg["data_dir"], tokenizer, tasks_dir, cfg["local_tasks"])
    tasks_dir.mkdir(parents=True, exist_ok=True)
    lm = FoxLM(model, tokenizer, context, batch_size=cfg["batch_size"], max_gen_tokens=cfg["max_gen_tokens"],
               bos=True)
    return run_lm_eval(lm, cfg["tasks"], tasks_dir, cfg["limit"])


def measure(run_cfg: dict, model: LanguageModel, tokenizer: tiktoken.Encoding) -> dict:
    """The model-dependent part of the results: validation, lm-eval, NIAH and ACP."""
    cfg, context, data_dir = run_cfg["evaluate"], run_cfg["train"]["context"], run_cfg["data_dir"]
    tally, seconds = AcpTally(), {}
    with torch.no_grad(), inference_mode(model.lm_head.weight.device):
        acp_batch = (lambda: tally.add(model)) if run_cfg["grid"]["acp"] else None
        results = _timed(seconds, "validation", lambda: validation_metrics(model, data_dir, context, cfg, acp_batch))
        results["lm_eval"] = _timed(seconds, "lm_eval", lambda: lm_eval_scores(run_cfg, model, tokenizer))
        results["niah"] = _timed(seconds, "niah", lambda: needle_in_haystack(model, tokenizer, data_dir, context,
                                                                             cfg["niah"]))
    results["acp_stats"] = tally.summary() if run_cfg["grid"]["acp"] else None
    print(f"[fox] {run_cfg['run']}: evaluated in " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()),
          flush=True)
    return results


def check_manifest_of_run(run_cfg: dict) -> dict:
    manifest = load_manifest(run_cfg["data_dir"])
    check_manifest(manifest, run_cfg["data_dir"], run_cfg["tokenizer"], run_cfg["windows"])
    return manifest


def evaluate(run_cfg: dict, model_path: Path, out: Path) -> dict:
    """Evaluate the averaged model at model_path; writes `out` (JSON) and logs it to the run's MLflow run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_path).to(device)
    # the data's own tokenizer, JSON escaping included: what the model was trained on decides how text is scored
    made = check_manifest_of_run(run_cfg)["tokenizer"]
    tokenizer = get_tokenizer(TokenizerConfig(name=made["name"], rank_file=made["rank_file"],
                                              json_escape=made.get("json_escape", False)))
    train = json.loads((Path(run_cfg["run_dir"]) / "train.json").read_text())
    grid = run_cfg["grid"]
    result = {"run": run_cfg["run"], "grid": grid, "params": model.param_counts()["paper"],
              "tokens": train["tokens"], "train_ctx": run_cfg["train"]["context"], "acp": grid["acp"],
              "train_tokens_per_s": train["tokens_per_s"], "mfu": train["mfu"]}
    result |= measure(run_cfg, model, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=1) + "\n")
    log_evaluation(run_cfg, result, out, step=train["steps"])
    return result
