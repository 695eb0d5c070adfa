"""Held-out loss as the FoX paper measures it: per-token loss over long held-out sequences, and from it the
validation loss and the perplexity at each evaluation length.

The validation split is read as sequences of the longest evaluation length (max(length_multipliers) x the
training context; the paper: 65,536-token LongCrawl64 documents), evaluate.val_tokens tokens in all. The loss
at position t (predicting token t + 1 of a sequence from tokens 0..t) is averaged over the sequences; the
perplexity at length l is exp of the mean loss over positions [0, l), so every length is measured on the same
text and a longer length only adds later positions: past the training length that is what length
extrapolation measures (a RoPE Transformer's loss rises there, FoX's keeps falling). The same prefixes read as
windows of their own would give the same losses (causal attention), except with ACP, whose threshold depends on
the number of keys (it still keeps the pruned mass per query below eps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from fox.data import validation_windows
from fox.model import LanguageModel


@torch.no_grad()
def position_losses(model: LanguageModel, data_dir: str | Path, seq_len: int, batch_size: int, max_windows: int,
                    after_batch: Callable[[], None] | None = None) -> tuple[torch.Tensor, int]:
    """(sum over the first max_windows validation windows of the per-token loss (seq_len,) fp64 on the CPU,
    number of windows)."""
    device = model.lm_head.weight.device
    total_T, count = torch.zeros(seq_len, dtype=torch.float64), 0
    for inputs_BT, targets_BT in validation_windows(data_dir, seq_len, batch_size, max_windows):
        losses_BT = model.token_losses(inputs_BT.to(device), targets_BT.to(device))
        total_T += losses_BT.double().sum(dim=0).cpu()
        count += len(inputs_BT)
        if after_batch is not None:
            after_batch()
    return total_T, count


def validation_metrics(model: LanguageModel, data_dir: str | Path, context: int, cfg: dict,
                       acp_batch: Callable[[], None] | None = None) -> dict:
    """val_loss and perplexity at the training context and at each of cfg["length_multipliers"] x context, and
    the per-token loss by position, from cfg["val_tokens"] tokens of sequences of the longest length. With
    acp_batch, cfg["val_windows"] training-context windows are run first and acp_batch is called after each
    batch (the ACP statistics, measured at the length the model trained at)."""
    lengths = list(dict.fromkeys(round(m * context) for m in cfg["length_multipliers"]))
    longest = max(*lengths, context)
    n_sequences = cfg["val_tokens"] // longest
    if n_sequences < 1:
        raise ValueError(f"evaluate.val_tokens={cfg['val_tokens']}: fewer than one sequence of the longest "
                         f"evaluation length {longest} (max(length_multipliers) x context)")
    if acp_batch is not None:
        position_losses(model, data_dir, context, cfg["batch_size"], cfg["val_windows"], acp_batch)
    batch_size = max(1, cfg["batch_size"] * context // longest)  # about the same tokens per forward
    total_T, count = position_losses(model, data_dir, longest, batch_size, n_sequences)
    loss_T = total_T / count
    prefix_mean = lambda n: loss_T[:n].mean().item()
    val_loss = prefix_mean(context)
    return {"val_loss": val_loss, "val_ppl_at_train_ctx": math.exp(val_loss),
            "val_ppl_at_4x_ctx": math.exp(prefix_mean(4 * context)) if 4 * context <= longest else None,
            "val_sequences": count, "val_sequence_tokens": longest,
            "loss_by_position": {"positions": list(range(longest)), "loss": loss_T.tolist()},
            "ppl_by_length": {"lengths": lengths, "ppl": [math.exp(prefix_mean(n)) for n in lengths]}}
