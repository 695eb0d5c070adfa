"""Model configuration: the architecture switches of DESIGN.md §1 and the paper's size presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

ATTENTION_ARCHS = ("fox", "transformer")
RECURRENT_ARCHS = ("mamba2", "hgrn2", "deltanet")
"""The FoX paper's recurrent baselines (fox.model.baselines): no attention, no block variants, no ACP."""
ARCHS = ATTENTION_ARCHS + RECURRENT_ARCHS
BLOCKS = ("llama", "pro")
ACP_BOUNDS = ("gains", "norms")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: Literal["fox", "transformer", "mamba2", "hgrn2", "deltanet"]
    """fox: a forget gate per head and no positional embedding; transformer: RoPE and no gate; mamba2, hgrn2,
    deltanet: the recurrent baselines (n_head x head_dim: Mamba-2's heads of the expanded 2 x d_model, HGRN2's
    and DeltaNet's key dim per head)."""
    block: Literal["llama", "pro"] | None
    """pro adds QK-norm, an output gate with a per-head output norm and KV-shift, and an MLP ratio of 3.5;
    None for the recurrent baselines, whose blocks are their own."""
    n_layer: int
    d_model: int
    n_head: int
    head_dim: int
    vocab_size: int = 50257  # GPT-2; the data stage's manifest may override it (byte-level tokenizers)
    acp: bool = False
    """Adaptive Computation Pruning in every FoX attention layer."""
    acp_bound: Literal["gains", "norms"] = "gains"
    """ACP's bound on |s q.k|: "gains" from the QK-norm gains (Pro only, no data pass), "norms" from q, k."""
    log_eps: float = -10.0
    """ln of the attention mass ACP may drop per query."""
    rope_theta: float = 500000.0
    init_std: float = 0.02
    fgate_bias_init: tuple[float, float] = (0.0, 0.0)
    """Forget-gate bias at init, spread linearly from the first to the last head of each layer. (0, 0) is the
    paper's (f ~ 0.5 everywhere); the training benchmark sets a spread that makes ACP prune as much as in a
    trained model, whose heads range from short to long memories."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass (training only): memory for time."""
    state_size: int = 128
    """Mamba-2's state size N per head (the FoX paper's: 128); unused by the other architectures."""

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, ARCHS)
        if self.arch in ATTENTION_ARCHS:
            _check_choice("block", self.block, BLOCKS)
        _check_choice("acp_bound", self.acp_bound, ACP_BOUNDS)
        for key in ("n_layer", "d_model", "n_head", "head_dim", "vocab_size", "state_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key}={value!r}: must be a positive integer")
        for key in ("init_std", "rope_theta"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key}={getattr(self, key)!r}: must be positive")
        if not self.log_eps < 0:
            raise ValueError(f"model.log_eps={self.log_eps!r}: must be negative (eps = e^log_eps < 1)")
        if self.arch == "transformer" and self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim}: RoPE rotates pairs, the head dim must be even")
        if self.acp and self.arch != "fox":
            raise ValueError(f"model.acp=True: ACP prunes by the forget gate, allowed only with arch fox "
                             f"(model.arch={self.arch!r})")
        if self.acp and self.acp_bound == "gains" and not self.qk_norm:
            raise ValueError(f"model.acp_bound='gains': needs the QK-norm of block pro (model.block="
                             f"{self.block!r}); allowed with block llama is 'norms'")
        if self.arch in RECURRENT_ARCHS:
            _check_recurrent(self)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: the vocabulary rounded up to a multiple of 128, so the head's
        matmuls run on aligned tensor-core kernels (50257 -> 50304; at 50257 cuBLAS falls back to align1
        kernels, 61 of 155 ms of GEMM time in a 760M step). The padding rows are never a class."""
        return 128 * math.ceil(self.vocab_size / 128)

    @property
    def qk_norm(self) -> bool:
        return self.block == "pro"

    @property
    def mlp_ratio(self) -> float:
        """The Pro block spends 0.5 d^2 fewer MLP parameters per layer to pay for its output gate."""
        return 3.5 if self.block == "pro" else 4.0

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU width: 2/3 of ratio * d (three matrices instead of two), rounded up to a multiple of 256."""
        return 256 * math.ceil(int(self.d_model * self.mlp_ratio * 2 / 3) / 256)


def _check_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"model.{key}={value!r}: allowed are {', '.join(allowed)}")


def _check_recurrent(cfg: ModelConfig) -> None:
    """A recurrent baseline has no block variant, and its heads tile its mixing width."""
    if cfg.block is not None:
        raise ValueError(f"model.block={cfg.block!r} with arch {cfg.arch}: the block (llama, pro) applies to fox "
                         "and transformer only; allowed is None")
    width = 2 * cfg.d_model if cfg.arch == "mamba2" else cfg.d_model
    if cfg.n_head * cfg.head_dim != width:
        raise ValueError(f"model.n_head x head_dim = {cfg.n_head} x {cfg.head_dim} with arch {cfg.arch}: must be "
                         f"{width} ({'2 x ' if cfg.arch == 'mamba2' else ''}d_model={cfg.d_model})")


@dataclass(frozen=True)
class Preset:
    n_layer: int
    d_model: int
    fox_heads: tuple[int, int]  # (n_head, head_dim)
    transformer_heads: tuple[int, int]
    peak_lr: float


PRESETS: dict[str, Preset] = {
    "tiny": Preset(2, 64, (2, 32), (2, 32), 3e-3),  # CPU tests; head_dim 32, the kernels' smallest
    "small": Preset(4, 128, (4, 32), (4, 32), 3e-3),  # CPU pipeline runs
    "125m": Preset(12, 768, (12, 64), (12, 64), 2e-3),
    "360m": Preset(24, 1024, (16, 64), (16, 64), 2e-3),
    "760m": Preset(24, 1536, (24, 64), (12, 128), 1e-3),  # FoX paper: the Transformer keeps 128-dim heads
}
"""Sizes and peak learning rates of DESIGN.md §1 (FoX paper, Appendix); "tiny" and "small" are ours."""


def _preset(size: str) -> Preset:
    if size not in PRESETS:
        raise ValueError(f"model.size={size!r}: allowed are {', '.join(PRESETS)}")
    return PRESETS[size]


RECURRENT_SHAPES: dict[str, dict[str, tuple[int, int, int]]] = {
    "mamba2": {"tiny": (4, 4, 32), "small": (8, 8, 32), "125m": (24, 24, 64), "360m": (48, 32, 64),
               "760m": (48, 48, 64)},
    "hgrn2": {"tiny": (2, 2, 32), "small": (4, 4, 32), "125m": (12, 6, 128), "360m": (24, 8, 128),
              "760m": (24, 12, 128)},
    "deltanet": {"tiny": (2, 2, 32), "small": (4, 4, 32), "125m": (12, 6, 128), "360m": (24, 8, 128),
                 "760m": (24, 12, 128)},
}
"""(n_layer, n_head, head_dim) of the baselines per size, d_model as the preset's: the official FoX code's
configs/experiment/longcrawl64/{mamba2,hgrn2,delta_net}/*.yaml. Mamba-2 has no MLP and twice the layers, heads
of 64 over 2 x d_model; HGRN2's expand ratio (key dim per head) and DeltaNet's heads are 128 wide."""
MAMBA2_STATE_SIZES = {"tiny": 16, "small": 32}
"""Mamba-2's state size for our CPU sizes; the paper's sizes use 128 (ModelConfig.state_size)."""


def model_config(arch: str, block: str | None, size: str, *, vocab_size: int = 50257,
                 **overrides: object) -> ModelConfig:
    """The preset's config for (arch, block, size), block None for the recurrent baselines; overrides replace any
    ModelConfig field."""
    preset = _preset(size)
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"model.{key}: unknown key; allowed are {', '.join(sorted(known))}")
    fields = dict(arch=arch, block=block, n_layer=preset.n_layer, d_model=preset.d_model, vocab_size=vocab_size)
    if arch in RECURRENT_ARCHS:
        fields["n_layer"], fields["n_head"], fields["head_dim"] = RECURRENT_SHAPES[arch][size]
        if arch == "mamba2" and size in MAMBA2_STATE_SIZES:
            fields["state_size"] = MAMBA2_STATE_SIZES[size]
    else:
        fields["n_head"], fields["head_dim"] = preset.fox_heads if arch == "fox" else preset.transformer_heads
    return ModelConfig(**(fields | overrides))


MAIN_RUN_TOKENS = 45 * 2**30
"""The FoX paper's main 760M runs (Table 1, "48B tokens"); shorter runs use the size preset's lr."""
MAIN_RUN_LR = {("fox", "pro"): 2e-3, ("transformer", "pro"): 1e-3, ("fox", "llama"): 1e-3,
               ("transformer", "llama"): 5e-4, ("mamba2", None): 2e-3, ("hgrn2", None): 2e-3,
               ("deltanet", None): 1e-3}
"""FoX paper Table 5 (760M, 45 x 2^30 tokens), as in the official configs pro_760m_48b / llama_760m_48b and
{mamba2,hgrn2,delta_net}/760m_48b."""


def peak_lr(arch: str, block: str | None, size: str, tokens: int | None = None) -> float:
    """The papers' peak learning rate: Table 5's per-architecture values for 760M models trained on at least
    45 x 2^30 tokens, else the size preset's (125M, 360M: 2e-3; 760M at 15 x 2^30 tokens: 1e-3; the baselines'
    official configs use the same)."""
    _check_choice("arch", arch, ARCHS)
    _check_choice("block", block, (None,) if arch in RECURRENT_ARCHS else BLOCKS)
    if size == "760m" and tokens is not None and tokens >= MAIN_RUN_TOKENS:
        return MAIN_RUN_LR[(arch, block)]
    return _preset(size).peak_lr
