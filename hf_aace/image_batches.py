"""Trainer support for datasets that yield uint8 images: on-device augmentation, normalisation, memory format.

hf_aace's datasets keep images as uint8 tensors until they reach the training device, where a
[`~hf_aace.data.BatchAugmentation`] augments and normalises whole batches. [`ImageBatchMixin`] gives any
`transformers.Trainer` subclass that handling: [`AACETrainer`] trains with it, and [`ImageBatchTrainer`] (a plain
`Trainer` with it) evaluates saved models and trains without a sharpness-aware step.
"""

import os
from typing import Any

import torch
from transformers import Trainer
from transformers.utils import logging

from .trainer_internals import prepare_inputs

logger = logging.get_logger(__name__)

AUGMENTATION_STATE_NAME = "augmentation_state_{}.pth"


class ImageBatchMixin:
    """Image-batch handling for a `transformers.Trainer` subclass (list it before `Trainer` in the bases).

    - Training batches: [`prepare_image_batch`] augments `pixel_values` with `augmentation` (which also normalises
      them) and puts them in the model's memory format; the subclass's `training_step` calls it once per micro-batch.
    - Evaluation and prediction batches that arrive as uint8 are normalised with `augmentation.normalize`.
    - With `args.channels_last` (an [`AACETrainingArguments`] field; False for plain `TrainingArguments`), the model's
      weights and every 4-d image batch use the channels_last memory format, except under FSDP (contiguous weights
      only).
    - The augmentation's random stream is seeded with `args.seed + process_index`, so every process draws its own
      augmentations, and is saved with every checkpoint and reloaded on resume.

    Args:
        augmentation: a [`~hf_aace.data.BatchAugmentation`] (or any object with `__call__`, `normalize`,
            `manual_seed`, `state_dict` and `load_state_dict`); None leaves batches as the data collator made them.
        *args, **kwargs: those of the Trainer.
    """

    def __init__(self, *args, augmentation: Any | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.args, "channels_last", False) and self.is_fsdp_enabled:
            logger.warning(
                "channels_last is off under FSDP: FSDP2 shards contiguous parameters only. Weights and image batches "
                "keep PyTorch's default memory format (pass --channels_last false to silence this)."
            )
        if self.channels_last:
            # In place: the parameters stay the same objects, so optimizers and DDP built later see the new layout.
            self.model.to(memory_format=torch.channels_last)
        self.augmentation = augmentation
        if augmentation is not None:
            augmentation.manual_seed(self.args.seed + self.args.process_index)

    @property
    def channels_last(self) -> bool:
        """Whether weights and image batches use the channels_last memory format (never under FSDP)."""
        return bool(getattr(self.args, "channels_last", False)) and not self.is_fsdp_enabled

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        return super().training_step(model, self.prepare_image_batch(inputs), num_items_in_batch)

    def prepare_image_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A training micro-batch on the device, augmented and in the model's memory format."""
        inputs = prepare_inputs(self, inputs)
        if self.augmentation is not None:
            inputs["pixel_values"] = self.augmentation(inputs["pixel_values"])
        return self._to_memory_format(inputs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **kwargs):
        # **kwargs: Seq2SeqTrainer's generation keyword arguments pass through.
        pixel_values = inputs.get("pixel_values")
        if (
            self.augmentation is not None
            and isinstance(pixel_values, torch.Tensor)
            and pixel_values.dtype == torch.uint8
        ):
            inputs = prepare_inputs(self, inputs)
            inputs["pixel_values"] = self.augmentation.normalize(inputs["pixel_values"])
        inputs = self._to_memory_format(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **kwargs)

    def _to_memory_format(self, inputs: dict[str, Any]) -> dict[str, Any]:
        pixel_values = inputs.get("pixel_values")
        if self.channels_last and isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4:
            inputs["pixel_values"] = pixel_values.contiguous(memory_format=torch.channels_last)
        return inputs

    # Private Trainer hooks (listed in hf_aace.trainer_internals): the augmentation stream travels with the RNG state.
    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.augmentation is not None:
            path = os.path.join(output_dir, AUGMENTATION_STATE_NAME.format(self.args.process_index))
            torch.save(self.augmentation.state_dict(), path)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if self.augmentation is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, AUGMENTATION_STATE_NAME.format(self.args.process_index))
        if os.path.isfile(path):
            self.augmentation.load_state_dict(torch.load(path, weights_only=True))
        else:
            logger.warning(f"No augmentation state in {checkpoint}: the augmentation stream restarts from its seed.")


class ImageBatchTrainer(ImageBatchMixin, Trainer):
    """A plain `transformers.Trainer` for uint8 image datasets: evaluation with normalisation, ordinary training steps.

    Example:
    ```python
    >>> from transformers import TrainingArguments
    >>> from hf_aace.data import BatchAugmentation
    >>> from hf_aace.image_batches import ImageBatchTrainer
    >>> trainer = ImageBatchTrainer(
    ...     model=model, args=TrainingArguments("out"), augmentation=BatchAugmentation(processor.image_mean,
    ...     processor.image_std))  # doctest: +SKIP
    >>> trainer.evaluate(data.test)  # doctest: +SKIP
    ```
    """


__all__ = ["AUGMENTATION_STATE_NAME", "ImageBatchMixin", "ImageBatchTrainer"]
