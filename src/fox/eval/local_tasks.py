"""Two lm-eval tasks built from the pipeline's own held-out split, so zero-shot evaluation runs offline.

fox_heldout_ppl  rolling word/byte perplexity of held-out passages (lm-eval's loglikelihood_rolling type, as
                 wikitext), each several training contexts long.
fox_heldout_mc   multiple choice: after a held-out prompt, pick its true continuation among continuations of the
                 same length taken from other passages (acc, acc_norm).
Both come from the first passages of the validation split and a seeded shuffle: the same files for every run
of a config, written atomically, so evaluations running side by side may all write them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import tiktoken
import yaml

from fox.data import open_split
from fox.files import write_atomic

LOCAL_TASKS = ("fox_heldout_ppl", "fox_heldout_mc")


def heldout_passages(data_dir: str | Path, n_passages: int, n_tokens: int) -> list[np.ndarray]:
    """The first n_passages runs of n_tokens tokens of the validation split that lie within one document
    (documents are cut into consecutive passages)."""
    split = open_split(data_dir, "val")
    passages: list[np.ndarray] = []
    for doc, length in enumerate(split.lengths()):
        passages += [split.read_document(doc, i, n_tokens) for i in range(0, int(length) - n_tokens + 1, n_tokens)]
        if len(passages) >= n_passages:
            return passages[:n_passages]
    raise ValueError(f"{data_dir}: the validation split holds {len(passages)} passages of {n_tokens} tokens; "
                     f"evaluate.lm_eval.local_tasks needs docs={n_passages} (lower docs or the token lengths)")


def perplexity_docs(passages: list[np.ndarray], tokenizer: tiktoken.Encoding, n_tokens: int) -> list[dict]:
    return [{"text": tokenizer.decode(passage[:n_tokens].tolist(), errors="replace")} for passage in passages]


def choice_docs(passages: list[np.ndarray], tokenizer: tiktoken.Encoding, cfg: dict) -> list[dict]:
    """One question per passage: its prompt, and its continuation shuffled among those of other passages."""
    n_context, n_cont, n_choices = cfg["mc_context_tokens"], cfg["mc_continuation_tokens"], cfg["mc_choices"]
    if len(passages) < n_choices:
        raise ValueError(f"evaluate.lm_eval.local_tasks.docs={len(passages)}: must be >= mc_choices={n_choices}")
    decode = lambda tokens: tokenizer.decode(tokens.tolist(), errors="replace")
    continuations = [decode(passage[n_context:n_context + n_cont]) for passage in passages]
    rng = random.Random(cfg["seed"])
    questions = []
    for index, passage in enumerate(passages):
        others = rng.sample([i for i in range(len(passages)) if i != index], n_choices - 1)
        label = rng.randrange(n_choices)
        choices = [continuations[i] for i in others]
        choices.insert(label, continuations[index])
        questions.append({"context": decode(passage[:n_context]), "choices": choices, "label": label})
    return questions


def task_yaml(name: str, data_file: Path) -> dict:
    common = {"task": name, "dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0},
              # an absolute path: lm-eval resolves relative data_files against the working directory
              "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}}}
    if name == "fox_heldout_ppl":
        metrics = ("word_perplexity", "byte_perplexity", "bits_per_byte")
        return common | {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                         "metric_list": [{"metric": m, "aggregation": "weighted_perplexity" if m != "bits_per_byte"
                                          else "bits_per_byte", "higher_is_better": False} for m in metrics]}
    return common | {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
                     "doc_to_target": "label", "target_delimiter": "",
                     "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                     for m in ("acc", "acc_norm")]}


def write_local_tasks(data_dir: str | Path, tokenizer: tiktoken.Encoding, out_dir: Path, cfg: dict) -> Path:
    """Write both tasks' YAML and JSONL files into out_dir (the include_path for lm-eval); returns out_dir."""
    min_tokens = max(cfg["ppl_tokens"], cfg["mc_context_tokens"] + cfg["mc_continuation_tokens"])
    passages = heldout_passages(data_dir, cfg["docs"], min_tokens)
    records = {"fox_heldout_ppl": perplexity_docs(passages, tokenizer, cfg["ppl_tokens"]),
               "fox_heldout_mc": choice_docs(passages, tokenizer, cfg)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in records.items():
        data_file = out_dir / f"{name}.jsonl"
        write_atomic(data_file, "".join(json.dumps(row) + "\n" for row in rows))
        write_atomic(out_dir / f"{name}.yaml", yaml.safe_dump(task_yaml(name, data_file), sort_keys=False))
    return out_dir

