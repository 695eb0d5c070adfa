"""Greedy decoding with the KV cache, stopped by strings (lm-eval's `until`) rather than by token ids.

A stop string may span several tokens or sit inside one (GPT-2 has tokens such as ".\\n"), so the generated
text is decoded and searched after every token; the answer is the text before the first stop string. With
first_line the answer is the first line, leading newlines dropped, and decoding stops once that line is complete:
the FoX paper's LongBench scoring keeps only that line, so the tokens after it would be wasted.
"""

from __future__ import annotations

from collections.abc import Sequence

import tiktoken
import torch

from fox.model import LanguageModel


def cut_at_stop(text: str, until: Sequence[str]) -> str | None:
    """text before the earliest stop string, or None when it holds none."""
    hits = [text.index(stop) for stop in until if stop and stop in text]
    return text[: min(hits)] if hits else None


def first_line(text: str) -> str:
    """The first line of text after its leading newlines (the official FoX LongBench scorer's prediction)."""
    return text.lstrip("\n").split("\n")[0]


@torch.no_grad()
def greedy_until(model: LanguageModel, prompt: list[int], tokenizer: tiktoken.Encoding, until: Sequence[str],
                 max_new_tokens: int, *, only_first_line: bool = False) -> str:
    """Greedy continuation of prompt, at most max_new_tokens tokens, ending before the first stop string or
    end-of-text; with only_first_line, its first_line (decoding ends once the line is complete)."""
    device = model.lm_head.weight.device
    stops = [*until, tokenizer.decode([tokenizer.eot_token])]
    finish = first_line if only_first_line else (lambda text: text)
    cache = model.new_cache(1)
    logits_V = model.decode(torch.tensor([prompt], device=device), cache, last_only=True)[0, -1]
    tokens: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        tokens.append(int(logits_V.argmax()))
        text = tokenizer.decode(tokens, errors="replace")
        answer = cut_at_stop(text, stops)
        if answer is not None:
            return finish(answer)
        if only_first_line and "\n" in text.lstrip("\n"):
            return finish(text)
        if len(tokens) < max_new_tokens:
            logits_V = model.decode(torch.tensor([tokens[-1:]], device=device), cache)[0, -1]
    return finish(text)
