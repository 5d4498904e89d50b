"""Data pipeline: Hub datasets as cached uint8 tensors, batched on-device augmentation and training-label noise."""

from .augmentation import AugmentationDraws, BatchAugmentation, augmentation_for
from .loading import PRESETS, ImageClassificationData, ImageClassificationSplit, load_image_classification_dataset
from .noise import symmetric_label_noise

__all__ = [
    "PRESETS",
    "AugmentationDraws",
    "BatchAugmentation",
    "ImageClassificationData",
    "ImageClassificationSplit",
    "augmentation_for",
    "load_image_classification_dataset",
    "symmetric_label_noise",
]
