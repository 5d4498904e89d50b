"""Data pipeline: Hub image-classification datasets as cached uint8 tensors, and batched on-device augmentation."""

from .augmentation import AugmentationDraws, BatchAugmentation, augmentation_for
from .loading import PRESETS, ImageClassificationData, ImageClassificationSplit, load_image_classification_dataset

__all__ = [
    "PRESETS",
    "AugmentationDraws",
    "BatchAugmentation",
    "ImageClassificationData",
    "ImageClassificationSplit",
    "augmentation_for",
    "load_image_classification_dataset",
]
