"""Forgetting Attention (FoX) with Adaptive Computation Pruning: Triton kernels and a PyTorch reference."""

from .api import attention_kernels, forgetting_attention
from .reference import (
    ACP_BLOCK,
    LOG_EPS,
    acp_threshold_from_gains,
    acp_threshold_from_norms,
    forgetting_attention_reference,
)

__all__ = [
    "ACP_BLOCK",
    "LOG_EPS",
    "acp_threshold_from_gains",
    "acp_threshold_from_norms",
    "attention_kernels",
    "forgetting_attention",
    "forgetting_attention_reference",
]
