"""Datasets (synthetic shapes, image folders, Hugging Face save_to_disk folders, segmentation sets) and transforms
(the NEPA image transforms, joint image + mask transforms for segmentation, uint8 transforms for generation)."""
from .datasets import (
    DataError, HFDiskDataset, ImageFolderDataset, SkipCorruptDataset, available_splits, build_dataset,
    fixed_subset, fixed_subset_indices, is_hf_disk, is_synthetic, labelled_subset, resolve_split,
)
from .segmentation import (
    ADE20KDataset, SegmentationFolder, SyntheticSegmentation, build_segmentation_dataset, read_class_list,
)
from .segmentation_transforms import PairTransform, seg_eval_transform, seg_train_transform
from .synthetic import SyntheticDigits, SyntheticShapes
from .transforms import (
    GenerationTransform, center_crop_arr, eval_transform, finetune_transform, generation_transform, pretrain_transform,
)

__all__ = [
    "ADE20KDataset", "DataError", "GenerationTransform", "HFDiskDataset", "ImageFolderDataset", "PairTransform",
    "SegmentationFolder", "SkipCorruptDataset", "SyntheticDigits", "SyntheticSegmentation", "SyntheticShapes", "available_splits",
    "build_dataset", "build_segmentation_dataset", "fixed_subset", "fixed_subset_indices", "center_crop_arr", "eval_transform", "finetune_transform",
    "generation_transform", "is_hf_disk", "is_synthetic", "labelled_subset", "pretrain_transform", "read_class_list", "resolve_split",
    "seg_eval_transform", "seg_train_transform",
]
