from .base import Objective
from .classification import ClassificationConfig, ClassificationObjective, soft_target_cross_entropy
from .nepa import NepaLossConfig, NepaObjective, embedding_distance, nepa_loss

__all__ = ["ClassificationConfig", "ClassificationObjective", "NepaLossConfig", "NepaObjective", "Objective",
           "embedding_distance", "nepa_loss", "soft_target_cross_entropy"]
