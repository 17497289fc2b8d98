"""Training: run configs, the training loop, checkpoints, and the end-of-run report."""

from moekit.train.config import DataConfig, ParallelConfig, RunConfig, TrainConfig, load_config
from moekit.train.trainer import Trainer, TrainResult, build_model, lr_at

__all__ = [
    "DataConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_model",
    "load_config",
    "lr_at",
]
