"""Learning-rate schedule counted in tokens: linear warmup, then cosine to zero."""

from __future__ import annotations

import math


def lr_factor(tokens: int, warmup_tokens: int, total_tokens: int) -> float:
    """Multiplier of the peak lr after `tokens` tokens of training.

    1) linear warmup over warmup_tokens, 2) cosine from 1 to 0 at total_tokens, 3) zero past the end.
    """
    if tokens < warmup_tokens:
        return tokens / warmup_tokens
    if tokens >= total_tokens:
        return 0.0
    progress = (tokens - warmup_tokens) / max(1, total_tokens - warmup_tokens)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
