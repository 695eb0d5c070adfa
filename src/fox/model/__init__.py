"""FoX and Transformer language models (LLaMA and Pro blocks) with Adaptive Computation Pruning."""

from .cache import KVCache, LayerCache
from .config import PRESETS, ModelConfig, Preset, model_config, peak_lr
from .model import LanguageModel

__all__ = ["PRESETS", "KVCache", "LanguageModel", "LayerCache", "ModelConfig", "Preset", "model_config",
           "peak_lr"]
