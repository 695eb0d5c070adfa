"""FoX and Transformer language models (LLaMA and Pro blocks) with Adaptive Computation Pruning, and the FoX
paper's recurrent baselines (Mamba-2, HGRN2, DeltaNet)."""

from .cache import KVCache, LayerCache, RecurrentCache
from .config import PRESETS, ModelConfig, Preset, model_config, peak_lr
from .model import LanguageModel

__all__ = ["PRESETS", "KVCache", "LanguageModel", "LayerCache", "ModelConfig", "Preset", "RecurrentCache",
           "model_config", "peak_lr"]
