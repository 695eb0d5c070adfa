"""Needle in a haystack: can the model retrieve a fact planted at a given depth of a long held-out prompt?

The haystack is held-out text; the needle is a sentence with a random 5-digit code; the prompt ends with a
question whose answer is the code. The model continues greedily with its KV cache and a cell scores the exact
match of the answer (its first word, a final period dropped) with the code: no judge model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from fox.data import open_split
from fox.eval.generation import greedy_until
from fox.model import LanguageModel

NEEDLE = "\nThe secret code is {code}.\n"
QUESTION = "\nWhat is the secret code? The secret code is"


def haystack_prompt(filler: Sequence[int], tokenizer: tiktoken.Encoding, length: int, depth: float,
                    code: str) -> tuple[list[int], int]:
    """A prompt of exactly `length` tokens: filler with the needle inserted after a fraction `depth` of it,
    then the question. Returns the prompt and the needle's first token index."""
    needle = tokenizer.encode_ordinary(NEEDLE.format(code=code))
    question = tokenizer.encode_ordinary(QUESTION)
    n_filler = length - len(needle) - len(question)
    if n_filler < 0 or len(filler) < n_filler:
        raise ValueError(f"a {length}-token haystack needs {len(needle) + len(question)} tokens for the needle "
                         f"and question plus {n_filler} of filler ({len(filler)} given)")
    at = round(depth * n_filler)
    filler = [int(token) for token in filler[:n_filler]]
    return filler[:at] + needle + filler[at:] + question, at


def answer_of(generated: str) -> str:
    """The answer in a generated continuation: its first word without a final period."""
    words = generated.split()
    return words[0].rstrip(".") if words else ""


def exact_match(generated: str, code: str) -> bool:
    return answer_of(generated) == code


def needle_in_haystack(model: LanguageModel, tokenizer: tiktoken.Encoding, data_dir: str | Path, context: int,
                       cfg: dict) -> dict:
    """Accuracy per (length, depth) cell over cfg["samples"] haystacks, each from its own stretch of the
    validation split with its own code; lengths are cfg["length_multipliers"] x the training context."""
    stream = open_split(data_dir, "val")
    lengths = [round(multiplier * context) for multiplier in cfg["length_multipliers"]]
    if max(lengths) > stream.n_tokens:
        raise ValueError(f"evaluate.niah: a {max(lengths)}-token haystack needs more than the validation split's "
                         f"{stream.n_tokens} tokens")
    rng = random.Random(cfg["seed"])
    acc = []
    for length in lengths:
        row = []
        for depth in cfg["depths"]:
            hits = 0
            for sample in range(cfg["samples"]):
                code = str(rng.randrange(10_000, 100_000))
                filler = stream.read(sample * max(lengths) % (stream.n_tokens - length + 1), length)
                prompt, _ = haystack_prompt(filler, tokenizer, length, depth, code)
                max_new = len(tokenizer.encode_ordinary(f" {code}.")) + 1
                hits += exact_match(greedy_until(model, prompt, tokenizer, ["\n"], max_new), code)
            row.append(hits / cfg["samples"])
        acc.append(row)
    cells = [value for row in acc for value in row]
    return {"lengths": lengths, "depths": list(cfg["depths"]), "acc": acc, "mean_acc": sum(cells) / len(cells)}
