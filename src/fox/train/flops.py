"""Model FLOPs utilisation: achieved training FLOP/s over the device's dense bf16 peak."""

from __future__ import annotations

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "A6000": 155e12}
"""Dense bf16 tensor-core peaks by datasheet, matched against the CUDA device name."""


def peak_flops(precision: str) -> float | None:
    """Peak of this process's device, or None where unknown (CPU, fp32, an unlisted GPU): MFU stays empty."""
    if precision != "bf16" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    matches = [key for key in PEAK_BF16_FLOPS if key in name]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def mfu(train_flops_per_token: float, tokens_per_second: float, world_size: int, peak: float | None) -> float | None:
    if peak is None:
        return None
    return train_flops_per_token * tokens_per_second / (peak * world_size)
