from .nepa import NepaLossConfig, NepaObjective, embedding_distance, nepa_loss

__all__ = ["NepaLossConfig", "NepaObjective", "embedding_distance", "nepa_loss"]
