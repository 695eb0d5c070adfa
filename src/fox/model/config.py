"""Model configuration: the architecture switches of DESIGN.md §1, the paper's size presets, and the
component edits of the FoX paper's Table 3 ablations ("FoX (Pro) - QK-norm", "Transformer (LLaMA) + forget gate")."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal

ATTENTION_ARCHS = ("fox", "transformer")
RECURRENT_ARCHS = ("mamba2", "hgrn2", "deltanet")
"""The FoX paper's recurrent baselines (fox.model.baselines): no attention, no block variants, no ACP."""
ARCHS = ATTENTION_ARCHS + RECURRENT_ARCHS
BLOCKS = ("llama", "pro")
ACP_BOUNDS = ("gains", "norms")
COMPONENTS = {  # grid name -> (ModelConfig field, the paper's name in Table 3), in the table's column order
    "rope": ("rope", "RoPE"),
    "fgate": ("forget_gate", "forget gate"),
    "qknorm": ("qk_norm", "QK-norm"),
    "ogate": ("output_gate", "output gate"),
    "onorm": ("output_norm", "output norm"),
    "kvshift": ("kv_shift", "KV-shift"),
}
VARIANT_EDIT = re.compile(r"([+-])([a-z]+)")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: Literal["fox", "transformer", "mamba2", "hgrn2", "deltanet"]
    """fox: a forget gate per head and no positional embedding; transformer: RoPE and no gate; mamba2, hgrn2,
    deltanet: the recurrent baselines (n_head x head_dim: Mamba-2's heads of the expanded 2 x d_model, HGRN2's
    and DeltaNet's key dim per head)."""
    block: Literal["llama", "pro"] | None
    """pro adds QK-norm, an output gate with a per-head output norm and KV-shift, and an MLP ratio of 3.5;
    None for the recurrent baselines, whose blocks are their own."""
    rope: bool | None = None
    """Rotary position embedding on q and k. None: as the arch has it (transformer)."""
    forget_gate: bool | None = None
    """Forgetting Attention: a data-dependent forget gate per head. None: as the arch has it (fox)."""
    qk_norm: bool | None = None
    """Per-head RMSNorm of q and k. None (as for the four below): as the block has it (pro)."""
    output_gate: bool | None = None
    """sigmoid(W_g x) times the attention output, per channel."""
    output_norm: bool | None = None
    """Per-head RMSNorm of the attention output (before the output gate)."""
    kv_shift: bool | None = None
    """k_t, v_t mixed with the previous token's by a data-dependent weight per head."""
    mlp_ratio: float | None = None
    """SwiGLU width in multiples of d (before the 2/3). None: 3.5 with an output gate (its d x d weight is paid
    for by the MLP, as the paper's Pro block does), 4 without."""
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
        for field, value in default_components(self.arch, self.block).items():
            if getattr(self, field) is None:  # frozen: the defaults are filled in once, here
                object.__setattr__(self, field, value)
            elif not isinstance(getattr(self, field), bool):
                raise ValueError(f"model.{field}={getattr(self, field)!r}: must be true, false or null")
        if self.mlp_ratio is None:
            object.__setattr__(self, "mlp_ratio", 3.5 if self.output_gate else 4.0)
        if not self.mlp_ratio > 0:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio!r}: must be positive")
        for key in ("n_layer", "d_model", "n_head", "head_dim", "vocab_size", "state_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key}={value!r}: must be a positive integer")
        for key in ("init_std", "rope_theta"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key}={getattr(self, key)!r}: must be positive")
        if not self.log_eps < 0:
            raise ValueError(f"model.log_eps={self.log_eps!r}: must be negative (eps = e^log_eps < 1)")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim}: RoPE rotates pairs, the head dim must be even")
        if self.acp and not self.forget_gate:
            raise ValueError(f"model.acp=True: ACP prunes by the forget gate, allowed only with one (model.arch="
                             f"{self.arch!r}, forget_gate={self.forget_gate})")
        if self.acp and self.acp_bound == "gains" and not self.qk_norm:
            raise ValueError(f"model.acp_bound='gains': needs QK-norm (model.block={self.block!r}, "
                             f"qk_norm={self.qk_norm}); allowed without it is 'norms'")
        if self.arch in RECURRENT_ARCHS:
            _check_recurrent(self)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: the vocabulary rounded up to a multiple of 128, so the head's
        matmuls run on aligned tensor-core kernels (50257 -> 50304; at 50257 cuBLAS falls back to align1
        kernels, 61 of 155 ms of GEMM time in a 760M step). The padding rows are never a class."""
        return 128 * math.ceil(self.vocab_size / 128)

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


def default_components(arch: str, block: str | None) -> dict[str, bool]:
    """The attention components (ModelConfig field -> on) of one of the four standard architectures; all off for
    the recurrent baselines, which have no attention."""
    pro = block == "pro"
    return {"rope": arch == "transformer", "forget_gate": arch == "fox", "qk_norm": pro, "output_gate": pro,
            "output_norm": pro, "kv_shift": pro}


def parse_variant(arch: str, block: str, variant: str) -> dict[str, bool]:
    """The component fields a Table 3 variant changes, e.g. "-qknorm" on (fox, pro): {"qk_norm": False}.

    A variant is a sequence of edits to the architecture's components, each "+name" (add) or "-name" (remove)
    with a name of COMPONENTS, as the paper writes its rows ("- forget gate + RoPE"); "" is the architecture
    itself. An edit that changes nothing (adding what is there) is an error, so one model has one spelling."""
    defaults = default_components(arch, block)
    if variant and arch in RECURRENT_ARCHS:
        raise ValueError(f"variant={variant!r} with arch {arch}: Table 3's edits apply to fox and transformer only")
    if VARIANT_EDIT.sub("", variant):
        raise ValueError(f"variant={variant!r}: expected edits such as '-qknorm' or '+fgate+rope', each + or - "
                         f"and one of {', '.join(COMPONENTS)}")
    changes: dict[str, bool] = {}
    for sign, name in VARIANT_EDIT.findall(variant):
        if name not in COMPONENTS:
            raise ValueError(f"variant={variant!r}: unknown component {name!r}; allowed are {', '.join(COMPONENTS)}")
        field = COMPONENTS[name][0]
        if field in changes:
            raise ValueError(f"variant={variant!r}: {name} is edited twice")
        if defaults[field] == (sign == "+"):
            allowed = ", ".join(("-" if defaults[f] else "+") + n for n, (f, _) in COMPONENTS.items())
            raise ValueError(f"variant={variant!r}: {arch} {block} {'has' if defaults[field] else 'has no'} "
                             f"{name} already; allowed edits are {allowed}")
        changes[field] = sign == "+"
    return changes


def _ordered_edits(arch: str, block: str, variant: str) -> list[tuple[str, str, str]]:
    """(sign, name, label) of the variant's edits as the paper orders them: removals, then additions, each in
    Table 3's column order ("- forget gate + RoPE")."""
    changes = parse_variant(arch, block, variant)
    edits = [("+" if changes[field] else "-", name, label) for name, (field, label) in COMPONENTS.items()
             if field in changes]
    return sorted(edits, key=lambda edit: edit[0] == "+")  # stable: column order within each sign


def canonical_variant(arch: str, block: str, variant: str) -> str:
    """The variant's one spelling (removals, then additions, in column order), e.g. "-fgate+rope"."""
    return "".join(sign + name for sign, name, _ in _ordered_edits(arch, block, variant))


def variant_label(arch: str, block: str, variant: str = "") -> str:
    """The paper's name of the model: "FoX (Pro)", "FoX (Pro) - QK-norm", "FoX (Pro) - forget gate + RoPE"."""
    base = f"{'FoX' if arch == 'fox' else 'Transformer'} ({'Pro' if block == 'pro' else 'LLaMA'})"
    return " ".join([base, *(f"{sign} {label}" for sign, _, label in _ordered_edits(arch, block, variant))])


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


def model_config(arch: str, block: str | None, size: str, *, vocab_size: int = 50257, variant: str = "",
                 **overrides: object) -> ModelConfig:
    """The preset's config for (arch, block, size), block None for the recurrent baselines, with a Table 3
    variant's edits (parse_variant); overrides replace any ModelConfig field."""
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
    return ModelConfig(**(fields | parse_variant(arch, block, variant) | overrides))


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
