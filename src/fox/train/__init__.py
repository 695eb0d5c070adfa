"""Training through the DeepSpeed engine: schedule, checkpoints, resume, metrics."""

from .checkpoint import fp32_state_dict, read_manifest
from .trainer import RunBusy, TrainConfig, TrainingDiverged, train

__all__ = ["RunBusy", "TrainConfig", "TrainingDiverged", "fp32_state_dict", "read_manifest", "train"]
