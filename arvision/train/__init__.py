"""The training machinery shared by every task: engine, optimizer groups and schedules, checkpoints,
data order, distributed set-up and logging."""
from .engine import Trainer

__all__ = ["Trainer"]
