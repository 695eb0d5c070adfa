"""`fox longbench`: LongBench (v1) on one averaged model through lm-eval-harness's own `longbench_*` tasks, as the
FoX paper's Table 2 runs it, written to eval/longbench/{run}.json.

The paper's protocol (the official FoX code's LongBench scripts): the 14 English tasks, zero-shot, greedy
generation on the KV cache with each task's generation length (lm-eval's task YAMLs carry LongBench's), prompts
after BOS and cut in the middle to 15,500 tokens, and a generation scored by its first line (leading newlines
dropped) with LongBench's metric; scores on LongBench's 0-100 scale. lm-eval builds the prompts and scores;
fox.eval.lm_eval_adapter generates.

The real tasks read LongBench's data from the HF hub (lm-eval's copy of THUDM/LongBench). fox_heldout_longbench
is a task of the same shape that runs offline: lm-eval's own longbench_2wikimqa (prompt, generation length, QA-F1
metric) on held-out passages of the pipeline's data with a fact planted in them, from a local JSON file.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import tiktoken
import torch
import yaml

from fox.eval.average import load_model
from fox.eval.evaluate import check_manifest_of_run, inference_mode
from fox.eval.lm_eval_adapter import FoxLM, run_lm_eval
from fox.eval.local_tasks import heldout_passages
from fox.files import write_atomic
from fox.tracking import Tracker

LOCAL_TASK = "fox_heldout_longbench"
LOCAL_BASE = "2wikimqa"  # the lm-eval LongBench task whose prompt, generation length and metric it takes
FACT = " The secret code of this archive is {code}. "
QUESTION = "What is the secret code of this archive?"


def lm_eval_task_dir() -> Path:
    """lm-eval's own LongBench task folder (installed with lm_eval; its metrics need lm_eval[longbench])."""
    import lm_eval.tasks

    folder = Path(lm_eval.tasks.__file__).parent / "longbench"
    if not (folder / f"{LOCAL_BASE}.yaml").is_file():
        raise ValueError(f"longbench: {folder} holds no {LOCAL_BASE}.yaml; LongBench needs lm_eval >= 0.4.13 "
                         "with its longbench extra (pip install 'lm_eval[longbench]')")
    return folder


def local_docs(data_dir: str | Path, tokenizer: tiktoken.Encoding, cfg: dict) -> list[dict]:
    """LongBench-shaped records: held-out text as the context with the fact planted at a random depth, the
    question, and the answer list LongBench's metrics take."""
    rng = random.Random(cfg["seed"])
    docs = []
    for index, passage in enumerate(heldout_passages(data_dir, cfg["docs"], cfg["context_tokens"])):
        text = tokenizer.decode(passage.tolist(), errors="replace")
        code = str(rng.randrange(10_000, 100_000))
        at = rng.randrange(len(text) + 1)
        context = text[:at] + FACT.format(code=code) + text[at:]
        docs.append({"context": context, "question": QUESTION, "answers": [code], "all_classes": None,
                     "length": len(context.split()), "_id": f"{LOCAL_TASK}-{index}"})
    return docs


def write_local_task(data_dir: str | Path, tokenizer: tiktoken.Encoding, out_dir: Path, cfg: dict) -> Path:
    """fox_heldout_longbench's YAML (an include of lm-eval's longbench_2wikimqa) and JSONL in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data_file = out_dir / f"{LOCAL_TASK}.jsonl"
    write_atomic(data_file, "".join(json.dumps(doc) + "\n" for doc in local_docs(data_dir, tokenizer, cfg)))
    task = {"include": str(lm_eval_task_dir() / f"{LOCAL_BASE}.yaml"), "task": LOCAL_TASK, "tag": [],
            "dataset_path": "json", "dataset_name": None, "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}}}
    write_atomic(out_dir / f"{LOCAL_TASK}.yaml", yaml.safe_dump(task, sort_keys=False))
    return out_dir


def lm_eval_name(task: str) -> str:
    """longbench.tasks take LongBench's names (qasper) or lm-eval's (longbench_qasper); the local task is itself."""
    return task if task == LOCAL_TASK or task.startswith("longbench_") else f"longbench_{task}"


def scores(results: dict[str, dict]) -> dict[str, float]:
    """{task: score on LongBench's 0-100 scale}, tasks by LongBench's name; lm-eval reports 0-1 `score`."""
    return {task.removeprefix("longbench_"): 100.0 * values["score"] for task, values in results.items()
            if "score" in values}


def longbench(run_cfg: dict, model_path: Path, out: Path) -> dict:
    """LongBench on the averaged model at model_path; writes `out` (JSON) and logs the scores to the run's
    MLflow run."""
    from fox.data import TokenizerConfig, get_tokenizer

    cfg = run_cfg["longbench"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_path).to(device)
    made = check_manifest_of_run(run_cfg)["tokenizer"]  # the data's tokenizer, JSON escaping included
    tokenizer = get_tokenizer(TokenizerConfig(name=made["name"], rank_file=made["rank_file"],
                                              json_escape=made.get("json_escape", False)))
    tasks = [lm_eval_name(task) for task in cfg["tasks"]]
    tasks_dir = Path(run_cfg["results_dir"]) / "eval" / "tasks"
    if LOCAL_TASK in tasks:
        write_local_task(run_cfg["data_dir"], tokenizer, tasks_dir, cfg["local_task"])
    tasks_dir.mkdir(parents=True, exist_ok=True)
    lm = FoxLM(model, tokenizer, run_cfg["train"]["context"], bos=True, max_prompt_tokens=cfg["max_prompt_tokens"],
               only_first_line=cfg["first_line"])
    start = time.perf_counter()
    with torch.no_grad(), inference_mode(device):
        results = run_lm_eval(lm, tasks, tasks_dir, cfg["limit"])
    train = json.loads((Path(run_cfg["run_dir"]) / "train.json").read_text())
    result = {"run": run_cfg["run"], "grid": run_cfg["grid"], "params": model.param_counts()["paper"],
              "tokens": train["tokens"], "train_ctx": run_cfg["train"]["context"], "acp": run_cfg["grid"]["acp"],
              "max_prompt_tokens": cfg["max_prompt_tokens"], "first_line": cfg["first_line"],
              "scores": scores(results), "lm_eval": results, "seconds": time.perf_counter() - start}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=1) + "\n")
    tracker = Tracker(run_cfg)
    tracker.start()
    tracker.log_metrics({f"eval.longbench.{task}": value for task, value in result["scores"].items()}, train["steps"])
    tracker.log_artifact(out, "eval/longbench")
    tracker.end()
    print(f"[fox] {run_cfg['run']}: LongBench {len(result['scores'])} tasks in {result['seconds']:.0f}s -> {out}",
          flush=True)
    return result
