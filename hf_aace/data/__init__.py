"""Data pipeline: Hub datasets as cached uint8 tensors (or encoded images cropped in DataLoader workers), batched
on-device augmentation and training-label noise."""

from .arguments import DatasetArguments
from .augmentation import AugmentationDraws, BatchAugmentation, augmentation_for
from .encoded import EncodedImageSplit
from .loading import ImageClassificationData, ImageClassificationSplit, load_image_classification_dataset
from .noise import symmetric_label_noise
from .presets import PRESETS, AugmentationSettings, DatasetPreset, get_preset

__all__ = [
    "PRESETS",
    "AugmentationDraws",
    "AugmentationSettings",
    "BatchAugmentation",
    "DatasetArguments",
    "DatasetPreset",
    "EncodedImageSplit",
    "ImageClassificationData",
    "ImageClassificationSplit",
    "augmentation_for",
    "get_preset",
    "load_image_classification_dataset",
    "symmetric_label_noise",
]
