"""FoX and Transformer language models with the LLaMA or the Pro block (DESIGN.md §1).

Shape suffixes: B batch, T new tokens, S all keys (cached + new), H heads, D head dim, C model width,
V vocabulary. Reads top to bottom: norms, attention, MLP, block, the language model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from fox_kernels import (
    acp_threshold_from_gains,
    acp_threshold_from_norms,
    forgetting_attention,
    forgetting_attention_reference,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import KVCache, LayerCache, RecurrentCache
from .config import RECURRENT_ARCHS, ModelConfig
from .loss import linear_cross_entropy
from .rope import apply_rope, rope_cos_sin

NORM_EPS = 1e-6  # pre-norms, final norm and the Pro output norm (LLaMA's and the official FoX code's)
QK_NORM_EPS = 1e-5
LOSS_CHUNK = 2048  # token_losses: time steps per LM-head call, so (B, T, V) fp32 logits never exist at once


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit and fp32 tensors, fp64 for fp64 (the exactness tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(_compute_dtype(x))


def _numel(p: nn.Parameter) -> int:
    """Full size, also under ZeRO-3, which partitions parameters in place and keeps the size in ds_numel."""
    return getattr(p, "ds_numel", p.numel())


class RMSNorm(nn.Module):
    """x / rms(x) * gain over the last dim, in fp32 at least; gain (C,), or (H, D): one gain row per head."""

    def __init__(self, shape: int | tuple[int, ...], eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _upcast(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.to(x32.dtype)).to(x.dtype)


class ForgetGate(nn.Linear):
    """log f (B, T, H) = logsigmoid(W_f x + b_f), in fp32 whatever the model dtype (fp64 for fp64 models): its
    cumsum over thousands of tokens is the attention bias, which 16-bit would wash out. A module of its own so
    that ZeRO-3 gathers W_f and b_f in this module's hooks, also under torch.compile."""

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x_BTC)
        with torch.autocast(x_BTC.device.type, enabled=False):
            logits_BTH = F.linear(x_BTC.to(dtype), self.weight.to(dtype), self.bias.to(dtype))
        return F.logsigmoid(logits_BTH)


def token_shift(y_BTHD: torch.Tensor, y_before_B1HD: torch.Tensor, a_BTH: torch.Tensor) -> torch.Tensor:
    """(1 - a_t) y_t + a_t y_{t-1}, with y_before the y of the token before the first."""
    y_prev_BTHD = torch.cat([y_before_B1HD, y_BTHD[:, :-1]], dim=1)
    return torch.lerp(y_BTHD, y_prev_BTHD, a_BTH[..., None])


def causal_sdpa(q_BTHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention, the T queries being the last T of S positions (FlashAttention on CUDA)."""
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BSHD, v_BSHD))  # (B, H, T or S, D)
    T, S = q.shape[2], k.shape[2]
    if T == S:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # is_causal aligns the mask top-left; a cache needs it bottom-right
        mask_TS = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TS)
    return o.transpose(1, 2)


class Attention(nn.Module):
    """Causal multi-head attention: Forgetting Attention with a forget gate, softmax attention without, each
    component of the config switched on or off on its own (RoPE, QK-norm, KV-shift, output gate and norm: the
    Pro block has the last four). A component that is off has no parameters (its attribute is None)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, H, D = cfg.d_model, cfg.n_head, cfg.head_dim
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, H * D, bias=False)
        self.v_proj = nn.Linear(C, H * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        self.fgate_proj = ForgetGate(C, H, bias=True) if cfg.forget_gate else None
        self.q_norm = RMSNorm((H, D), QK_NORM_EPS) if cfg.qk_norm else None
        self.k_norm = RMSNorm((H, D), QK_NORM_EPS) if cfg.qk_norm else None
        # a_t = sigmoid(w_a . x_t), one per head
        self.k_shift_proj = nn.Linear(C, H, bias=False) if cfg.kv_shift else None
        self.v_shift_proj = nn.Linear(C, H, bias=False) if cfg.kv_shift else None
        self.ogate_proj = nn.Linear(C, H * D, bias=False) if cfg.output_gate else None
        self.o_norm = RMSNorm((H, D), NORM_EPS) if cfg.output_norm else None
        self.last_acp_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (visited, total) tiles, (B, H)

    def forward(self, x_BTC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        q_BTHD = self.q_proj(x_BTC).view(B, T, H, D)
        k_BTHD = self.k_proj(x_BTC).view(B, T, H, D)
        v_BTHD = self.v_proj(x_BTC).view(B, T, H, D)
        if self.cfg.kv_shift:
            k_BTHD, v_BTHD = self._kv_shift(x_BTC, k_BTHD, v_BTHD, cache)
        if self.cfg.qk_norm:
            q_BTHD, k_BTHD = self.q_norm(q_BTHD), self.k_norm(k_BTHD)
        if rope is not None:
            q_BTHD, k_BTHD = apply_rope(q_BTHD, *rope), apply_rope(k_BTHD, *rope)
        log_fgate_BTH = self.fgate_proj(x_BTC) if self.fgate_proj is not None else None

        k_BSHD, v_BSHD, log_fgate_BSH = k_BTHD, v_BTHD, log_fgate_BTH
        if cache is not None:
            k_BSHD, v_BSHD, log_fgate_BSH = cache.append(k_BTHD, v_BTHD, log_fgate_BTH, x_BTC[:, -1:])
        if log_fgate_BSH is None:
            o_BTHD = causal_sdpa(q_BTHD, k_BSHD, v_BSHD)
        else:
            o_BTHD = self._forgetting_attention(q_BTHD, k_BSHD, v_BSHD, log_fgate_BSH)

        if self.cfg.output_norm:
            o_BTHD = self.o_norm(o_BTHD)
        if self.cfg.output_gate:
            o_BTHD = o_BTHD * torch.sigmoid(self.ogate_proj(x_BTC)).view(B, T, H, D)
        return self.o_proj(o_BTHD.reshape(B, T, H * D))

    def _kv_shift(self, x_BTC: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor,
                  cache: LayerCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """k_t = (1 - a_t) W_k x_t + a_t W_k x_{t-1}, a_t = sigmoid(w_a . x_t) per head; same for v.

        x_{-1} = 0 without a cache (the official code's zero padding); with one, the last cached input."""
        B, _, C = x_BTC.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        has_past = cache is not None and cache.x_last_B1C is not None
        x_before_B1C = cache.x_last_B1C if has_past else x_BTC.new_zeros(B, 1, C)
        k_before_B1HD = self.k_proj(x_before_B1C).view(B, 1, H, D)
        v_before_B1HD = self.v_proj(x_before_B1C).view(B, 1, H, D)
        k_BTHD = token_shift(k_BTHD, k_before_B1HD, torch.sigmoid(self.k_shift_proj(x_BTC)))
        v_BTHD = token_shift(v_BTHD, v_before_B1HD, torch.sigmoid(self.v_shift_proj(x_BTC)))
        return k_BTHD, v_BTHD

    def _forgetting_attention(self, q_BTHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor,
                              log_fgate_BSH: torch.Tensor) -> torch.Tensor:
        """Forgetting Attention, with ACP when configured; records the ACP tile counts of this call."""
        scale = self.cfg.head_dim**-0.5
        # the public entry takes fp32 gates only; fp64 models (tests) call its PyTorch reference directly
        fp32_gates = log_fgate_BSH.dtype == torch.float32
        attend = forgetting_attention if fp32_gates else forgetting_attention_reference
        if not self.cfg.acp:
            return attend(q_BTHD, k_BSHD, v_BSHD, log_fgate_BSH, sm_scale=scale)
        threshold = self._acp_threshold(q_BTHD, k_BSHD, scale)
        o_BTHD, stats = attend(q_BTHD, k_BSHD, v_BSHD, log_fgate_BSH, sm_scale=scale, acp_threshold=threshold,
                               return_stats=True)
        self.last_acp_stats = stats
        return o_BTHD

    @torch.no_grad()
    def _acp_threshold(self, q_BTHD: torch.Tensor, k_BSHD: torch.Tensor, scale: float) -> torch.Tensor:
        """delta = -2U - ln S + ln eps; U from the QK-norm gains (H,) or the largest q, k norms (B, H)."""
        if self.cfg.acp_bound == "gains":
            return acp_threshold_from_gains(self.q_norm.weight, self.k_norm.weight, k_BSHD.shape[1],
                                            self.cfg.log_eps)
        return acp_threshold_from_norms(q_BTHD, k_BSHD, scale, self.cfg.log_eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BTC)) * self.up_proj(x_BTC))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, NORM_EPS)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, NORM_EPS)
        self.mlp = MLP(cfg)

    def forward(self, x_BTC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: LayerCache | None = None) -> torch.Tensor:
        x_BTC = x_BTC + self.attn(self.attn_norm(x_BTC), rope, cache)
        return x_BTC + self.mlp(self.mlp_norm(x_BTC))


class LMHead(nn.Module):
    """The untied output projection, (padded vocabulary, C); its forward gives the logits of the real vocabulary
    or, with targets, the mean cross-entropy without materialising them (loss.py). The loss goes through this
    module's forward so that ZeRO-3 gathers the weight for it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.weight = nn.Parameter(torch.empty(cfg.padded_vocab_size, cfg.d_model))

    def forward(self, h_BTC: torch.Tensor, targets_BT: torch.Tensor | None = None) -> torch.Tensor:
        if targets_BT is None:
            return _upcast(F.linear(h_BTC, self.weight)[..., :self.vocab_size])
        return linear_cross_entropy(h_BTC.flatten(0, 1), self.weight, targets_BT.flatten(), self.vocab_size)


def _block(cfg: ModelConfig) -> nn.Module:
    """An attention block, or a recurrent baseline's (fox.model.baselines)."""
    if cfg.arch in RECURRENT_ARCHS:
        from .baselines import RecurrentBlock  # imported here: baselines builds on this module's norm and MLP

        return RecurrentBlock(cfg)
    return Block(cfg)


class LanguageModel(nn.Module):
    """Token embedding, n_layer blocks, final norm, untied LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(_block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, NORM_EPS)
        self.lm_head = LMHead(cfg)
        self.apply(self._init_weights)
        for block in self.blocks:
            if hasattr(block, "init_weights"):  # the recurrent baselines' own init, over the defaults above
                block.init_weights()

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, init_std) for every Linear and Embedding weight, zero biases, unit norm gains (the official
        FoX code's init). The forget-gate bias is 0 too, so f_t ~ 0.5 at init: the paper gives the
        data-dependent gate no special bias init (its T_min/T_max init is for data-independent ablations).
        The vocabulary's padding rows start at 0 and get no gradient: they stay inert."""
        if isinstance(module, nn.Linear | nn.Embedding | LMHead):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, Attention) and module.fgate_proj is not None:
            with torch.no_grad():
                module.fgate_proj.bias.copy_(torch.linspace(*self.cfg.fgate_bias_init, self.cfg.n_head))
        if isinstance(module, nn.Embedding | LMHead):
            with torch.no_grad():
                module.weight[self.cfg.vocab_size:] = 0.0

    def _hidden(self, input_ids_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, C); with a cache, positions continue after the cached tokens."""
        T = input_ids_BT.shape[1]
        x_BTC = self.embed(input_ids_BT)
        start = cache.length if cache is not None else 0
        rope = None
        if self.cfg.rope:
            rope = rope_cos_sin(start, T, self.cfg.head_dim, self.cfg.rope_theta, x_BTC.device,
                                _compute_dtype(x_BTC))
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            if cache is not None:
                x_BTC = block(x_BTC, rope, cache.layers[index])
            elif recompute:
                x_BTC = checkpoint(block, x_BTC, rope, use_reentrant=False)
            else:
                x_BTC = block(x_BTC, rope)
        if cache is not None:
            cache.length += T
        return self.norm(x_BTC)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """With targets (B, T): the mean cross-entropy, a scalar (targets of -100 are ignored), computed
        without (B, T, V) fp32 logits. Without: logits (B, T, V). Both fp32 (fp64 for an fp64 model)."""
        return self.lm_head(self._hidden(input_ids), targets)

    def token_losses(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (B, T), dtype as forward's; the LM head runs LOSS_CHUNK steps at a time."""
        h_BTC = self._hidden(input_ids)
        chunks = zip(h_BTC.split(LOSS_CHUNK, dim=1), targets.split(LOSS_CHUNK, dim=1), strict=True)
        losses = [F.cross_entropy(self.lm_head(h_chunk).transpose(1, 2), t_chunk, reduction="none")
                  for h_chunk, t_chunk in chunks]
        return torch.cat(losses, dim=1)

    # ---- incremental decoding ----

    def new_cache(self, batch_size: int) -> KVCache | RecurrentCache:
        cache = RecurrentCache if self.cfg.arch in RECURRENT_ARCHS else KVCache
        return cache(self.cfg.n_layer, batch_size)

    def decode(self, input_ids: torch.Tensor, cache: KVCache | RecurrentCache, last_only: bool = False) -> torch.Tensor:
        """Logits (B, t, V), as forward's, of t new tokens following those in the cache, appended to it; with
        last_only those of the last token (B, 1, V): a 15k-token prompt's full logits would be 3 GB (GPT-2)."""
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"decode: batch {input_ids.shape[0]} but the cache holds {cache.batch_size}")
        h_BTC = self._hidden(input_ids, cache)
        return self.lm_head(h_BTC[:, -1:] if last_only else h_BTC)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 stop_tokens: Sequence[int] = ()) -> torch.Tensor:
        """Greedy continuation (B, <= max_new_tokens): stops once every row has emitted a stop token; rows
        that stopped earlier repeat their stop token."""
        B = input_ids.shape[0]
        cache = self.new_cache(B)
        logits_BV = self.decode(input_ids, cache, last_only=True)[:, -1]
        stops = torch.tensor(list(stop_tokens), dtype=input_ids.dtype, device=input_ids.device)
        done_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new_tokens: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            token_B = logits_BV.argmax(dim=-1)
            if new_tokens:
                token_B = torch.where(done_B, new_tokens[-1], token_B)
            new_tokens.append(token_B)
            done_B |= torch.isin(token_B, stops)
            if bool(done_B.all()):
                break
            logits_BV = self.decode(token_B[:, None], cache)[:, -1]
        if not new_tokens:
            return input_ids.new_empty(B, 0)
        return torch.stack(new_tokens, dim=1)

    # ---- accounting for the trainer ----

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) where module's forward reads a parameter of another module: ACP's threshold from
        the QK-norm gains. ZeRO-3 gathers a module's own parameters in its hooks; these it must be told about
        (deepspeed.zero.register_external_parameter), or compiled blocks see them partitioned."""
        return [(block.attn, norm.weight) for block in self.blocks
                if isinstance(block, Block) and block.attn.cfg.acp and block.attn.cfg.acp_bound == "gains"
                for norm in (block.attn.q_norm, block.attn.k_norm)]

    def param_counts(self) -> dict[str, int]:
        """Parameter counts of the real vocabulary (the padding rows are not counted); works on the meta device.
        embedding: input embedding + LM head (V x C each); non_embedding: everything else; paper: total - input
        embedding (the FoX paper's count, e.g. 759M for 760M FoX Pro)."""
        padding = (self.cfg.padded_vocab_size - self.cfg.vocab_size) * self.cfg.d_model
        total = sum(_numel(p) for p in self.parameters()) - 2 * padding
        embed, head = _numel(self.embed.weight) - padding, _numel(self.lm_head.weight) - padding
        return {"total": total, "embedding": embed + head, "non_embedding": total - embed - head,
                "paper": total - embed}

    def forward_flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token at context length L (FoX paper Table 6): 2N + 2 n_layer d_attn L, with N
        the paper's count and d_attn = n_head * head_dim (d_model in every preset): 2 FLOPs per weight,
        plus QK^T and PV over the causal half of L keys."""
        if self.cfg.arch in RECURRENT_ARCHS:  # a recurrent state instead: its products, whatever the context
            return 2.0 * self.param_counts()["paper"] + sum(b.mixing_flops_per_token() for b in self.blocks)
        d_attn = self.cfg.n_head * self.cfg.head_dim
        return 2.0 * self.param_counts()["paper"] + 2.0 * self.cfg.n_layer * d_attn * context

    def train_flops_per_token(self, context: int) -> float:
        """Forward + backward: 3x the forward (the backward runs two matmuls per forward one); no ACP."""
        return 3.0 * self.forward_flops_per_token(context)

    def acp_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer, (visited, total) attention tiles per (batch, head) of the last forward or decode call;
        None without ACP or before the first call."""
        if not self.cfg.acp:
            return None
        stats = [block.attn.last_acp_stats for block in self.blocks]
        return None if any(s is None for s in stats) else stats

    def acp_tiles(self) -> torch.Tensor | None:
        """(visited, total) attention tiles of the last call over all layers, batches and heads, as one
        float64 tensor on the model's device (no host sync: the trainer sums these and reads them at log
        steps); None without ACP or before the first call."""
        stats = self.acp_stats()
        if stats is None:
            return None
        return torch.stack([torch.stack([v.sum(), t.sum()]) for v, t in stats]).sum(dim=0)

    def pruned_fraction(self) -> float | None:
        """Fraction of attention tiles ACP skipped in the last call, over all layers, batches and heads."""
        tiles = self.acp_tiles()
        return None if tiles is None else 1.0 - float(tiles[0] / tiles[1])

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices and embeddings; none on biases and norm gains. The per-head QK-norm
        and output-norm gains are 2-D, so norms are found by module type, not by ndim."""
        no_decay = {id(p) for m in self.modules() if isinstance(m, RMSNorm) for p in m.parameters()}
        no_decay |= {id(p) for name, p in self.named_parameters() if name.endswith(".bias")}
        no_decay |= {id(p) for p in self.parameters() if getattr(p, "_no_weight_decay", False)}  # Mamba-2's A, D, dt
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
