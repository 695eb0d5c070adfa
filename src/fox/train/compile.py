"""torch.compile for training: each block and the LM head compiled on their own, around opaque attention ops.

Per-block compilation (torchtitan's choice): every block has the same code and shapes, so one compiled graph
serves all of them (their parameters are the graph's inputs), compilation takes one block's time, and
activation checkpointing and ZeRO keep wrapping whole blocks. Forgetting Attention is a pair of custom
operators (fox_kernels.api) that the compiler treats as opaque calls, so the elementwise work around it
(norms, gates, KV-shift, SwiGLU, residuals) fuses into a few Triton kernels of inductor's own.
"""

from __future__ import annotations

import torch
import torch._functorch.config

from fox.model import LanguageModel


def compile_enabled(setting: bool | str, device: torch.device, zero_stage: int) -> bool:
    """train.compile: true, false, or auto: on CUDA, where it pays (on CPU compiling costs more than it saves
    for the small models run there), and not with ZeRO-3: it gathers each module's parameters in hooks that
    the compiler cannot trace, so the graphs break at every Linear and fuse only the elementwise work between
    them (compile true does that, with the eager losses)."""
    if setting == "auto":
        return device.type == "cuda" and zero_stage < 3
    return bool(setting)


def compile_model(model: LanguageModel, backend: str = "inductor", memory_budget: float = 0.7) -> None:
    """Compile the blocks, the final norm and the LM head in place (Module.compile keeps the state-dict keys,
    so checkpoints do not depend on the setting). backend: tests use aot_eager, which skips code generation.
    memory_budget < 1: the compiler keeps about that share of the activations it would save for the backward
    and recomputes the rest, ranked by FLOPs (elementwise work counts as free, so it goes first; the attention
    operators count theirs): memory for time, finer than checkpointing blocks. At 0.7 the FoX, Transformer and
    Pro blocks recompute norms, gates, RoPE and SwiGLU's product from the saved matmul outputs, nothing more."""
    torch._functorch.config.activation_memory_budget = memory_budget
    for module in (*model.blocks, model.norm, model.lm_head):
        module.compile(backend=backend, dynamic=False)
