"""Evaluation of averaged checkpoints: held-out loss by position and length, lm-eval-harness, needle in a
haystack, ACP pruning statistics."""

from fox.eval.average import average_checkpoints, load_model
from fox.eval.evaluate import evaluate

__all__ = ["average_checkpoints", "evaluate", "load_model"]
