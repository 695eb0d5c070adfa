"""Checks of a valid config against this machine, run before any job (Snakemake's parse, `fox validate`).

fox.config.validate judges the values alone; these need files and installed packages: the corpus settings,
that the tokenizer loads here (a GPT-2 rank file, or tiktoken's cache on an offline machine), that every
lm-eval task name resolves through lm-eval's own TaskManager, and that each needle-in-a-haystack prompt
leaves room for its haystack. Each failure is one ConfigError naming the key and what to do.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from fox.config import ConfigError, expand_grid

LOCAL_TASKS = ("fox_heldout_ppl", "fox_heldout_mc")
"""The tasks fox writes from the held-out split (fox.eval.local_tasks; a test keeps the two lists equal)."""
NIAH_TEXT = ("\nThe secret code is 00000.\n", "\nWhat is the secret code? The secret code is")
"""The needle and question of fox.eval.niah around the haystack (a test keeps them equal)."""


def check(config: dict) -> None:
    """Raise ConfigError on the first setting this machine cannot run."""
    from fox.data import CorpusConfig, TokenizerConfig
    from fox.data.sources import matched_files

    try:
        corpus = CorpusConfig(**config["corpus"])
        tokenizer_cfg = TokenizerConfig(**config["tokenizer"])
        matched_files(corpus.files if corpus.source == "files" else corpus.data_files)
    except ValueError as error:
        raise ConfigError(f"config: {error}") from None
    tokenizer = load_tokenizer(tokenizer_cfg)
    check_niah_lengths(config, sum(len(tokenizer.encode_ordinary(text)) for text in NIAH_TEXT))
    check_lm_eval_tasks(config["evaluate"]["lm_eval"]["tasks"])


def load_tokenizer(cfg):
    """The tokenizer as the tokenize job will load it; a missing rank file or download is a ConfigError."""
    from fox.data import get_tokenizer

    if cfg.rank_file is not None and not os.path.isfile(cfg.rank_file):
        raise ConfigError(f"config: tokenizer.rank_file={cfg.rank_file!r}: no such file")
    try:
        return get_tokenizer(cfg)
    except ValueError as error:  # tiktoken's hash check of a rank file
        raise ConfigError(f"config: tokenizer.rank_file={cfg.rank_file!r}: not GPT-2's BPE ranks ({error})") from None
    except OSError as error:  # requests' ConnectionError is an OSError
        raise ConfigError(f"config: tokenizer.name={cfg.name!r}: tiktoken cannot download its BPE here "
                          f"({type(error).__name__}); offline, set tokenizer.rank_file to a copy of gpt2.tiktoken "
                          "(or seed TIKTOKEN_CACHE_DIR, see README)") from None


def check_niah_lengths(config: dict, needle_tokens: int) -> None:
    """Every NIAH prompt (length multiplier x context) must hold the needle, the question and some haystack."""
    for multiplier in config["evaluate"]["niah"]["length_multipliers"]:
        for cell in expand_grid(config):
            if round(multiplier * cell["context"]) <= needle_tokens:
                raise ConfigError(f"config: evaluate.niah.length_multipliers: {multiplier} x context "
                                  f"{cell['context']} = {round(multiplier * cell['context'])} tokens, no room for "
                                  f"a haystack beside the {needle_tokens}-token needle and question")


def check_lm_eval_tasks(tasks: list[str]) -> None:
    unknown = [task for task in tasks if task not in LOCAL_TASKS]
    if not unknown:
        return
    known = set(lm_eval_task_names())
    unknown = [task for task in unknown if task not in known]
    if unknown:
        hints = {task: difflib.get_close_matches(task, known, n=3) for task in unknown}
        shown = "; ".join(f"{task!r}" + (f" (did you mean {', '.join(hints[task])}?)" if hints[task] else "")
                          for task in unknown)
        raise ConfigError(f"config: evaluate.lm_eval.tasks: lm-eval has no task {shown}; fox's offline tasks are "
                          f"{', '.join(LOCAL_TASKS)}; `lm_eval ls tasks` lists the rest")


def lm_eval_task_names() -> list[str]:
    """The task, group and tag names of the installed lm-eval, from its TaskManager (which reads every task
    YAML, ~10 s, no network); cached per lm-eval installation under ~/.cache/fox."""
    import importlib.metadata
    import importlib.util

    version = importlib.metadata.version("lm_eval")
    home = Path(importlib.util.find_spec("lm_eval").origin).resolve().parent  # without importing it (~2 s)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fox" / f"lm_eval_tasks-{version}.json"
    try:
        cached = json.loads(cache.read_text())
        if cached["lm_eval"] == str(home):
            return cached["tasks"]
    except (OSError, ValueError, KeyError):
        pass
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager().all_tasks)
    try:
        from fox.files import write_atomic

        write_atomic(cache, json.dumps({"lm_eval": str(home), "tasks": names}))
    except OSError:
        pass  # a read-only home: indexed again next time
    return names
