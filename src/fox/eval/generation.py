"""Greedy decoding with the KV cache, stopped by strings (lm-eval's `until`) rather than by token ids.

A stop string may span several tokens or sit inside one (GPT-2 has tokens such as ".\\n"), so the generated
text is decoded and searched after every token; the answer is the text before the first stop string.
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


@torch.no_grad()
def greedy_until(model: LanguageModel, prompt: list[int], tokenizer: tiktoken.Encoding, until: Sequence[str],
                 max_new_tokens: int) -> str:
    """Greedy continuation of prompt, at most max_new_tokens tokens, ending before the first stop string or
    end-of-text."""
    device = model.lm_head.weight.device
    stops = [*until, tokenizer.decode([tokenizer.eot_token])]
    cache = model.new_cache(1)
    logits_V = model.decode(torch.tensor([prompt], device=device), cache)[0, -1]
    tokens: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        tokens.append(int(logits_V.argmax()))
        text = tokenizer.decode(tokens, errors="replace")
        answer = cut_at_stop(text, stops)
        if answer is not None:
            return answer
        if len(tokens) < max_new_tokens:
            logits_V = model.decode(torch.tensor([tokens[-1:]], device=device), cache)[0, -1]
    return text
