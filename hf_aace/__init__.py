"""hf_aace: Adaptive Adversarial Cross-Entropy sharpness-aware training for the Hugging Face Trainer."""

from .convert import convert_reference_checkpoint
from .data import BatchAugmentation, ImageClassificationData, augmentation_for, load_image_classification_dataset
from .divergence import DivergenceCallback, TrainingDivergedError
from .image_processing_aace import AACEImageProcessor
from .losses import AACELoss, aace_loss
from .models import (
    PyramidNetConfig,
    PyramidNetForImageClassification,
    PyramidNetModel,
    WideResNetConfig,
    WideResNetForImageClassification,
    WideResNetModel,
)
from .sharpness_aware import sharpness_aware
from .trainer import AACETrainer
from .training_args import AACETrainingArguments, SharpnessAwareArguments

__version__ = "0.1.0"

__all__ = [
    "AACEImageProcessor",
    "AACELoss",
    "AACETrainer",
    "AACETrainingArguments",
    "BatchAugmentation",
    "DivergenceCallback",
    "ImageClassificationData",
    "PyramidNetConfig",
    "PyramidNetForImageClassification",
    "PyramidNetModel",
    "SharpnessAwareArguments",
    "TrainingDivergedError",
    "WideResNetConfig",
    "WideResNetForImageClassification",
    "WideResNetModel",
    "aace_loss",
    "augmentation_for",
    "convert_reference_checkpoint",
    "load_image_classification_dataset",
    "sharpness_aware",
]
