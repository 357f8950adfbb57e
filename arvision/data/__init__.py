"""Datasets (synthetic shapes, image folders, Hugging Face save_to_disk folders) and the NEPA transforms."""
from .datasets import (
    HFDiskDataset, ImageFolderDataset, SkipCorruptDataset, available_splits, build_dataset, is_hf_disk, is_synthetic,
    resolve_split,
)
from .synthetic import SyntheticShapes
from .transforms import eval_transform, finetune_transform, pretrain_transform

__all__ = [
    "HFDiskDataset", "ImageFolderDataset", "SkipCorruptDataset", "SyntheticShapes", "available_splits", "build_dataset",
    "eval_transform", "finetune_transform", "is_hf_disk", "is_synthetic", "pretrain_transform", "resolve_split",
]
