"""The training machinery shared by every task: engine, optimizer groups and schedules, checkpoints,
data order, distributed set-up and logging."""
from .config import TrainConfig
from .engine import Trainer

__all__ = ["TrainConfig", "Trainer"]
