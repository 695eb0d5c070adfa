"""Incremental-decoding state: what each attention or recurrent layer needs from the tokens already seen."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerCache:
    """One layer's past, S tokens: keys and values as attended (after KV-shift, QK-norm and RoPE), FoX log
    forget gates (fp32; the kernel forms their cumsum), and the last attention input (KV-shift's x_{t-1})."""

    k_BSHD: torch.Tensor | None = None
    v_BSHD: torch.Tensor | None = None
    log_fgate_BSH: torch.Tensor | None = None
    x_last_B1C: torch.Tensor | None = None

    def append(self, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, log_fgate_BTH: torch.Tensor | None,
               x_last_B1C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add T new tokens; returns all keys, values and log gates (S + T tokens)."""
        self.k_BSHD = _cat(self.k_BSHD, k_BTHD)
        self.v_BSHD = _cat(self.v_BSHD, v_BTHD)
        self.log_fgate_BSH = _cat(self.log_fgate_BSH, log_fgate_BTH)
        self.x_last_B1C = x_last_B1C
        return self.k_BSHD, self.v_BSHD, self.log_fgate_BSH


def _cat(past: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    return new if past is None else torch.cat([past, new], dim=1)


class KVCache:
    """Per-layer caches plus the number of tokens seen, which is the RoPE position of the next token."""

    def __init__(self, n_layer: int, batch_size: int):
        self.batch_size = batch_size
        self.length = 0
        self.layers = [LayerCache() for _ in range(n_layer)]


@dataclass
class RecurrentLayerCache:
    """One recurrent layer's past: its state (B, H, K, V), fp32, and the last W - 1 inputs of each short
    convolution by name, (B, W - 1, channels). Constant size, whatever the number of tokens seen."""

    state_BHKV: torch.Tensor | None = None
    conv: dict[str, torch.Tensor] = field(default_factory=dict)


class RecurrentCache:
    """KVCache's counterpart for the recurrent baselines."""

    def __init__(self, n_layer: int, batch_size: int):
        self.batch_size = batch_size
        self.length = 0
        self.layers = [RecurrentLayerCache() for _ in range(n_layer)]
