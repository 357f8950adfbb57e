"""Evaluation: frozen features (by block and pooling), DINO's weighted kNN, a linear probe, AIM's attentive probe,
classifier accuracy, and the per-process shards of an evaluation set."""
from .attentive import AttentivePooler, attentive_eval, attentive_probe, extract_tokens
from .classify import evaluate_classifier
from .features import FeatureSpec, extract_features, pool_tokens, pooled_features
from .knn import knn_classify, knn_eval, knn_scores, topk_accuracy
from .linear import linear_eval, linear_probe, train_linear
from .sharding import EvalShard

__all__ = ["AttentivePooler", "attentive_eval", "attentive_probe", "extract_tokens", "EvalShard", "evaluate_classifier",
           "FeatureSpec", "extract_features", "pool_tokens", "pooled_features", "knn_classify", "knn_eval", "knn_scores",
           "topk_accuracy", "linear_eval", "linear_probe", "train_linear"]
