"""The yardstick: a plain PyTorch LLaMA, the Transformer a user gets without fox (DESIGN.md section 2).

RMSNorm, RoPE, SDPA attention (cuDNN's on Hopper), SwiGLU, untied head on a vocabulary padded to a multiple of
128, plain cross-entropy on the logits; no DeepSpeed. bench/plain_training.py trains it with fp32 weights,
bf16 autocast, fused AdamW and torch.compile; `fox train`'s Transformer (LLaMA) is held to 0.95x its speed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, head_dim: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.qkv = nn.Linear(d_model, 3 * n_head * head_dim, bias=False)
        self.out = nn.Linear(n_head * head_dim, d_model, bias=False)

    def forward(self, x_BTC: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        q, k, v = self.qkv(x_BTC).view(B, T, 3, self.n_head, self.head_dim).transpose(1, 3).unbind(2)  # (B,H,T,D)
        q, k = (rotate(t, cos_TD, sin_TD) for t in (q, k))
        o_BHTD = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o_BHTD.transpose(1, 2).reshape(B, T, -1))


def rotate(x: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """RoPE on the two halves of the head dim."""
    first, second = x.chunk(2, dim=-1)
    return x * cos_TD + torch.cat([-second, first], dim=-1) * sin_TD


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, head_dim: int, hidden: int):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d_model, eps=1e-6), nn.RMSNorm(d_model, eps=1e-6)
        self.attn = Attention(d_model, n_head, head_dim)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self, n_layer=24, d_model=1536, n_head=12, head_dim=128, hidden=4096, vocab=50257,
                 rope_theta=500000.0):
        super().__init__()
        self.vocab, self.head_dim, self.rope_theta = vocab, head_dim, rope_theta
        padded = 128 * math.ceil(vocab / 128)
        self.embed = nn.Embedding(padded, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, head_dim, hidden) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, padded, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        T = ids_BT.shape[1]
        inv = self.rope_theta ** -(torch.arange(0, self.head_dim, 2, device=ids_BT.device) / self.head_dim)
        angles = torch.outer(torch.arange(T, device=ids_BT.device), inv).repeat(1, 2)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(ids_BT)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))[..., :self.vocab].float()
        return F.cross_entropy(logits.flatten(0, 1), targets_BT.flatten())

    def paper_params(self) -> int:
        """Non-embedding + LM head, real vocabulary only (756.7M at the default shape)."""
        padding = (self.embed.weight.shape[0] - self.vocab) * self.embed.weight.shape[1]
        return sum(p.numel() for p in self.parameters()) - self.embed.weight.numel() - padding
