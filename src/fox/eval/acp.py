"""How much attention Adaptive Computation Pruning skipped, overall and per layer and head.

The model records (visited, total) attention tiles per (batch, head) for each layer in its last forward; a
tally sums them over the evaluation batches, so every tile weighs the same, whatever the batch it came from.
"""

from __future__ import annotations

import torch

from fox.model import LanguageModel


class AcpTally:
    """Visited and total tiles per (layer, head), summed over the forward calls it has been shown."""

    def __init__(self) -> None:
        self.visited_LH: torch.Tensor | None = None
        self.total_LH: torch.Tensor | None = None

    def add(self, model: LanguageModel) -> None:
        """Count the model's last forward; a dense model records nothing and adds nothing."""
        stats = model.acp_stats()
        if stats is None:
            return
        visited_LH = torch.stack([visited_BH.sum(dim=0) for visited_BH, _ in stats]).double().cpu()
        total_LH = torch.stack([total_BH.sum(dim=0) for _, total_BH in stats]).double().cpu()
        if self.visited_LH is None:
            self.visited_LH, self.total_LH = visited_LH, total_LH
        else:
            self.visited_LH += visited_LH
            self.total_LH += total_LH

    def summary(self) -> dict | None:
        """{pruned_fraction, per_layer_head: [[fraction per head] per layer]}, or None when nothing was seen."""
        if self.visited_LH is None:
            return None
        pruned = 1.0 - self.visited_LH.sum() / self.total_LH.sum()
        return {"pruned_fraction": pruned.item(), "per_layer_head": (1.0 - self.visited_LH / self.total_LH).tolist()}
