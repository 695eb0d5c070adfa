"""Held-out loss: at the training context, per token position, and perplexity vs evaluation length.

Every length is evaluated on its own windows (consecutive, non-overlapping, from the start of the validation
split), never as a prefix of a longer one: with ACP the pruning threshold depends on the number of keys.
Loss at position t is the loss of predicting token t + 1 from tokens 0..t of a window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from fox.data import validation_windows
from fox.model import LanguageModel


@torch.no_grad()
def window_losses(model: LanguageModel, data_dir: str | Path, seq_len: int, batch_size: int, max_windows: int,
                  after_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Per-token losses (N, seq_len) fp32 on the CPU of the first max_windows validation windows."""
    device = model.lm_head.weight.device
    losses = []
    for inputs_BT, targets_BT in validation_windows(data_dir, seq_len, batch_size, max_windows):
        losses.append(model.token_losses(inputs_BT.to(device), targets_BT.to(device)).float().cpu())
        if after_batch is not None:
            after_batch()
    return torch.cat(losses)


def bin_positions(loss_T: torch.Tensor, bins: int) -> dict:
    """{positions, loss}: the mean loss of at most `bins` equal runs of positions, each at its middle position."""
    edges = torch.linspace(0, len(loss_T), min(bins, len(loss_T)) + 1).round().long().tolist()
    runs = list(zip(edges[:-1], edges[1:], strict=True))
    return {"positions": [(start + end - 1) // 2 for start, end in runs],
            "loss": [loss_T[start:end].mean().item() for start, end in runs]}


def validation_metrics(model: LanguageModel, data_dir: str | Path, context: int, cfg: dict,
                       after_context_batch: Callable[[], None] | None = None) -> dict:
    """val_loss and perplexity at the training context, perplexity at each of cfg["length_multipliers"] x
    context, loss by position at the longest. after_context_batch runs after each training-length batch
    (the ACP tally)."""
    lengths = list(dict.fromkeys(round(m * context) for m in cfg["length_multipliers"]))
    mean_losses, longest = {}, max(lengths)
    for length in sorted({*lengths, context}):
        batch_size = max(1, cfg["batch_size"] * context // length)  # about the same tokens per forward
        hook = after_context_batch if length == context else None
        losses_NT = window_losses(model, data_dir, length, batch_size, cfg["val_windows"], hook)
        mean_losses[length] = losses_NT.mean().item()
        if length == longest:
            by_position = bin_positions(losses_NT.mean(dim=0), cfg["position_bins"])
    return {"val_loss": mean_losses[context], "val_ppl_at_train_ctx": math.exp(mean_losses[context]),
            "val_ppl_at_4x_ctx": math.exp(mean_losses[4 * context]) if 4 * context in mean_losses else None,
            "loss_by_position": by_position,
            "ppl_by_length": {"lengths": lengths, "ppl": [math.exp(mean_losses[n]) for n in lengths]}}
