"""The FoX paper's recurrent baselines, Mamba-2, HGRN2 and DeltaNet, as fox blocks.

Each mixer is the layer the official FoX code trained (its copies of fla's HGRN2 and DeltaNet layers and of a
Mamba-2 mixer on mamba_ssm's kernels), written here: the same parameters, function and initialisation, with the
recurrence from fox.model.recurrences (fla's kernels on CUDA, Mamba-2's SSD as fla's simple GLA; PyTorch
elsewhere) and the small parts (short convolutions, norms, gates) in PyTorch, where torch.compile fuses them.
Each mixer loads the state dict of fla's layer of the same name, and tests/test_baselines_gpu.py checks that
they compute the same function. Where the official code and fla 0.6 differ, fox follows the official code:
- HGRN2: the official HGRN2Block never passes its per-layer lower bounds to the layer, so the paper's HGRN2 ran
  with forget gates sigmoid(f) in every layer and its `lower_bounds` parameter unused; fox has neither (36,864
  parameters at 760M, the paper's 756M either way).
- Mamba-2: A = 1..H over the heads (the official init), not fla's random A in [1, 16].
- Initialisation: Mamba-2's projections and convolution keep PyTorch's default init, out_proj scaled by
  1/sqrt(n_layer), dt_bias the inverse softplus of dt ~ logUniform(1e-3, 0.1); HGRN2's and DeltaNet's mixer
  projections xavier_uniform(gain 2^-2.5), their MLP's down_proj scaled by 1/sqrt(2 n_layer); embeddings and LM
  head N(0, 0.02) as fox's other models.

Shape suffixes as model.py's, plus K and V the key and value dims per head and N Mamba-2's state size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import RecurrentLayerCache
from .config import ModelConfig
from .model import MLP, NORM_EPS, RMSNorm, _upcast
from .recurrences import delta_rule, gla, simple_gla

CONV_SIZE = 4
"""Width of the short causal convolutions (Mamba-2's and DeltaNet's)."""
MAMBA2_NORM_EPS = 1e-5
"""Mamba-2's layer_norm_epsilon (block norms and the gated output norm); HGRN2 and DeltaNet use 1e-6."""
L2_NORM_EPS = 1e-6
XAVIER_GAIN = 2**-2.5
"""HGRN2's and DeltaNet's mixer projections (fla's layers' own init at the time)."""


def short_conv(x_BTC: torch.Tensor, conv: nn.Conv1d, cache: RecurrentLayerCache | None, name: str) -> torch.Tensor:
    """Causal depthwise convolution over time, y_t = b + sum_w weight_w * x_{t-W+1+w}, as W shifted products
    (one fused kernel under torch.compile). With a cache, x continues the inputs it holds under `name`, and
    the last W - 1 inputs are stored back."""
    W, (B, T, C) = conv.kernel_size[0], x_BTC.shape
    past_BWC = cache.conv.get(name) if cache is not None else None
    if past_BWC is None:
        past_BWC = x_BTC.new_zeros(B, W - 1, C)
    x_BSC = torch.cat([past_BWC.to(x_BTC.dtype), x_BTC], dim=1)      # S = W - 1 + T
    weight_CW = conv.weight[:, 0]
    y_BTC = sum(x_BSC[:, w:w + T] * weight_CW[:, w] for w in range(W))
    if conv.bias is not None:
        y_BTC = y_BTC + conv.bias
    if cache is not None:
        cache.conv[name] = x_BSC[:, T:]
    return y_BTC.to(x_BTC.dtype)


def _depthwise_conv(channels: int, bias: bool) -> nn.Conv1d:
    """Holds the weights (C, 1, W) in nn.Conv1d's (and fla's ShortConvolution's) layout; short_conv runs it."""
    return nn.Conv1d(channels, channels, CONV_SIZE, groups=channels, padding=CONV_SIZE - 1, bias=bias)


def _no_weight_decay(*params: nn.Parameter) -> None:
    for param in params:
        param._no_weight_decay = True


def _run(recurrence, cache: RecurrentLayerCache | None, *args, scale: float) -> torch.Tensor:
    """The recurrence over the new tokens, continuing from and updating the cached state when there is one."""
    state = cache.state_BHKV if cache is not None else None
    o, final = recurrence(*args, scale=scale, initial_state=state, output_final_state=cache is not None)
    if cache is not None:
        cache.state_BHKV = final
    return o


class Mamba2Mixer(nn.Module):
    """Mamba-2 (Dao & Gu, 2024): in_proj -> z | conv(x, B, C) | dt; SSD y_t = C_t h_t + D x_t with
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t (one head of P = head_dim channels sharing B, C of size N), a
    simple GLA with q = C, k = B, v = dt x, log decay dt A, scale 1; out_proj(RMSNorm(y * silu(z)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, P, N = cfg.n_head, cfg.head_dim, cfg.state_size
        self.d_inner, self.conv_dim = H * P, H * P + 2 * N
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + H, bias=False)
        self.conv1d = _depthwise_conv(self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        _no_weight_decay(self.dt_bias, self.A_log, self.D)
        self.norm = RMSNorm(self.d_inner, MAMBA2_NORM_EPS)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        H = self.cfg.n_head
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        self.out_proj.reset_parameters()
        with torch.no_grad():
            self.out_proj.weight /= math.sqrt(self.cfg.n_layer)
            dt_H = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            self.dt_bias.copy_(dt_H + torch.log(-torch.expm1(-dt_H)))         # softplus(dt_bias) = dt
            self.A_log.copy_(torch.arange(1, H + 1, dtype=torch.float32).log())
            self.D.fill_(1.0)

    def forward(self, x_BTC: torch.Tensor, cache: RecurrentLayerCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        H, P, N = self.cfg.n_head, self.cfg.head_dim, self.cfg.state_size
        z_BTE, xbc_BTF, dt_BTH = self.in_proj(x_BTC).split([self.d_inner, self.conv_dim, H], dim=-1)
        xbc_BTF = F.silu(short_conv(xbc_BTF, self.conv1d, cache, "xbc"))
        x_BTE, b_BTN, c_BTN = xbc_BTF.split([self.d_inner, N, N], dim=-1)
        dt_BTH = F.softplus(_upcast(dt_BTH) + _upcast(self.dt_bias))           # fp32 (fp64 in fp64 tests)
        log_decay_BTH = -_upcast(self.A_log).exp() * dt_BTH
        x_BTHP = x_BTE.view(B, T, H, P)
        v_BTHP = (x_BTHP * dt_BTH[..., None]).to(x_BTHP.dtype)
        q_BTHN, k_BTHN = (t[:, :, None].expand(B, T, H, N) for t in (c_BTN, b_BTN))     # one group: shared
        y_BTHP = _run(simple_gla, cache, q_BTHN, k_BTHN, v_BTHP, log_decay_BTH, scale=1.0)
        y_BTHP = y_BTHP + x_BTHP * self.D[:, None]
        y_BTE = self.norm(y_BTHP.reshape(B, T, self.d_inner) * F.silu(z_BTE))   # norm after the gate
        return self.out_proj(y_BTE)

    def flops_per_token(self) -> float:
        """The recurrence's matmul FLOPs per token beyond 2 per weight: write k^T v and read q S, N x P each."""
        return 4.0 * self.cfg.n_head * self.cfg.state_size * self.cfg.head_dim


class HGRN2Mixer(nn.Module):
    """HGRN2 (Qin et al., 2024): a GLA with q = silu(W_q x), forget gate f = sigmoid(W_f x) per key dim as the
    decay and 1 - f as the key, v = W_i x; o_proj(RMSNorm(o)) with one norm over all heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, HK = cfg.d_model, cfg.n_head * cfg.head_dim
        self.q_proj = nn.Linear(C, HK, bias=False)
        self.f_proj = nn.Linear(C, HK, bias=False)
        self.i_proj = nn.Linear(C, C, bias=False)
        self.g_norm = RMSNorm(C, NORM_EPS)
        self.o_proj = nn.Linear(C, C, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        for linear in (self.q_proj, self.f_proj, self.i_proj, self.o_proj):
            nn.init.xavier_uniform_(linear.weight, gain=XAVIER_GAIN)

    def forward(self, x_BTC: torch.Tensor, cache: RecurrentLayerCache | None = None) -> torch.Tensor:
        B, T, C = x_BTC.shape
        H, K = self.cfg.n_head, self.cfg.head_dim
        q_BTHK = F.silu(self.q_proj(x_BTC)).view(B, T, H, K)
        f_BTHK = _upcast(self.f_proj(x_BTC)).view(B, T, H, K)                # gates in fp32, as the official code
        log_forget_BTHK, k_BTHK = F.logsigmoid(f_BTHK), torch.sigmoid(-f_BTHK)   # log f, 1 - f
        v_BTHV = self.i_proj(x_BTC).view(B, T, H, C // H)
        o_BTHV = _run(gla, cache, q_BTHK, k_BTHK.to(v_BTHV.dtype), v_BTHV, log_forget_BTHK, scale=K**-0.5)
        return self.o_proj(self.g_norm(o_BTHV.reshape(B, T, C)))

    def flops_per_token(self) -> float:
        return 4.0 * self.cfg.n_head * self.cfg.head_dim * (self.cfg.d_model // self.cfg.n_head)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    x32 = _upcast(x)
    return (x32 * torch.rsqrt(x32.pow(2).sum(dim=-1, keepdim=True) + L2_NORM_EPS)).to(x.dtype)


class DeltaNetMixer(nn.Module):
    """DeltaNet (Schlag et al., 2021; Yang et al., 2024): q, k, v through short convolutions and silu, q and k
    L2-normalised per head, beta = sigmoid(W_b x); the delta rule; o_proj(per-head RMSNorm(o))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, H = cfg.d_model, cfg.n_head
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.b_proj = nn.Linear(C, H, bias=False)
        self.q_conv1d = _depthwise_conv(C, bias=False)
        self.k_conv1d = _depthwise_conv(C, bias=False)
        self.v_conv1d = _depthwise_conv(C, bias=False)
        self.o_norm = RMSNorm(cfg.head_dim, NORM_EPS)
        self.o_proj = nn.Linear(C, C, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.o_proj):
            nn.init.xavier_uniform_(linear.weight, gain=XAVIER_GAIN)
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()

    def forward(self, x_BTC: torch.Tensor, cache: RecurrentLayerCache | None = None) -> torch.Tensor:
        B, T, C = x_BTC.shape
        H, K = self.cfg.n_head, self.cfg.head_dim
        q_BTHK, k_BTHK, v_BTHK = (
            F.silu(short_conv(proj(x_BTC), conv, cache, name)).view(B, T, H, K)
            for proj, conv, name in ((self.q_proj, self.q_conv1d, "q"), (self.k_proj, self.k_conv1d, "k"),
                                     (self.v_proj, self.v_conv1d, "v")))
        q_BTHK, k_BTHK = _l2_normalize(q_BTHK), _l2_normalize(k_BTHK)
        beta_BTH = torch.sigmoid(self.b_proj(x_BTC)).to(q_BTHK.dtype)
        o_BTHK = _run(delta_rule, cache, q_BTHK, k_BTHK, v_BTHK, beta_BTH, scale=K**-0.5)
        return self.o_proj(self.o_norm(o_BTHK).reshape(B, T, C))

    def flops_per_token(self) -> float:
        """Predict k S, write, read: three K x V products per head."""
        return 6.0 * self.cfg.n_head * self.cfg.head_dim**2


MIXERS: dict[str, type[nn.Module]] = {"mamba2": Mamba2Mixer, "hgrn2": HGRN2Mixer, "deltanet": DeltaNetMixer}


class RecurrentBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then + mlp(norm(x)) (SwiGLU, ratio 4) except for Mamba-2,
    whose blocks are the mixer alone (and twice as many)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        eps = MAMBA2_NORM_EPS if cfg.arch == "mamba2" else NORM_EPS
        self.mixer_norm = RMSNorm(cfg.d_model, eps)
        self.mixer = MIXERS[cfg.arch](cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, eps) if cfg.arch != "mamba2" else None
        self.mlp = MLP(cfg) if cfg.arch != "mamba2" else None

    def init_weights(self) -> None:
        """The official init, again over LanguageModel's N(0, 0.02) for every Linear (module docstring)."""
        self.mixer.init_weights()
        if self.mlp is not None:
            with torch.no_grad():
                self.mlp.down_proj.weight /= math.sqrt(2 * self.cfg.n_layer)

    def forward(self, x_BTC: torch.Tensor, rope: None = None, cache: RecurrentLayerCache | None = None) -> torch.Tensor:
        """rope: always None (the blocks of all architectures share one signature)."""
        x_BTC = x_BTC + self.mixer(self.mixer_norm(x_BTC), cache)
        if self.mlp is not None:
            x_BTC = x_BTC + self.mlp(self.mlp_norm(x_BTC))
        return x_BTC

    def mixing_flops_per_token(self) -> float:
        return self.mixer.flops_per_token()
