"""Rotary position embedding (rotate-half layout, as LLaMA and FlashAttention's non-interleaved rotary)."""

from __future__ import annotations

import torch


def rope_cos_sin(start: int, length: int, head_dim: int, theta: float, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, D/2) for positions start..start+length-1.

    Angles are formed in float64: at position 16k, fp32 angles would already be off by ~1e-3 rad.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    positions = torch.arange(start, start + length, device=device, dtype=torch.float64)
    angles_TD2 = positions[:, None] * inv_freq[None, :]
    return angles_TD2.cos().to(dtype), angles_TD2.sin().to(dtype)


def apply_rope(x_BTHD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+D/2}) pair by its position's angle, in cos's precision."""
    x1, x2 = x_BTHD.to(cos_TD2.dtype).chunk(2, dim=-1)  # (B, T, H, D/2) each
    cos, sin = cos_TD2[:, None, :], sin_TD2[:, None, :]  # (T, 1, D/2): broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BTHD.dtype)
