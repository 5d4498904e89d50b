"""AACETrainer: the transformers Trainer with the two-pass sharpness-aware step of AACE, SAM or ASAM."""

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from .hub import build_model_card
from .losses import aace_loss_unchecked
from .perturbation import (
    WeightPerturbation,
    frozen_batchnorm_statistics,
    perturbation_from_gradients_,
    unscale_gradients_,
)
from .training_args import AACETrainingArguments

logger = logging.get_logger(__name__)

AUGMENTATION_STATE_NAME = "augmentation_state_{}.pth"
METRIC_NAMES = ("perturbation_loss", "perturbation_grad_norm", "perturbation_norm", "clean_loss", "clean_accuracy")


class AACETrainer(Trainer):
    """A [`~transformers.Trainer`] whose training step is the two-pass sharpness-aware step.

    For each micro-batch (Ratchatorn & Tanaka 2024, Algorithm 1; Foret et al. 2021):

    1. forward at the weights w (BatchNorm statistics update here), gradient g of the perturbation loss (AACE for
       "aace", cross-entropy for "sam"/"asam"), taken without touching `.grad` and without gradient all-reduce;
    2. perturb the weights to w + e (see `hf_aace.perturbation`);
    3. forward and backward at w + e through the Trainer's usual path (loss scaling, gradient accumulation and
       all-reduce unchanged) with BatchNorm statistics frozen;
    4. restore w from a saved copy; the optimizer then steps with the second pass's gradient.

    Everything else (optimizers, clipping, checkpoints, evaluation, callbacks, `push_to_hub`) is the Trainer's.

    Args:
        augmentation: optional batch augmentation called on the device batch's `pixel_values` before the first pass
            (both passes see the same augmented batch); evaluation calls its `normalize`. Its random stream is
            seeded with `args.seed + process_index` and saved with every checkpoint. Without it, batches reach the
            model as the data collator made them.
        *args, **kwargs: those of [`~transformers.Trainer`]; `args` must be an [`AACETrainingArguments`].

    Example:
    ```python
    >>> from hf_aace import AACETrainer, AACETrainingArguments
    >>> args = AACETrainingArguments(output_dir="out", sam_method="aace", rho=0.2)
    >>> trainer = AACETrainer(model=model, args=args, train_dataset=train, eval_dataset=test)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    def __init__(self, *args, augmentation: Any | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, AACETrainingArguments):
            raise ValueError(
                f"AACETrainer needs AACETrainingArguments, got {type(self.args).__name__}; "
                "build the arguments with hf_aace.AACETrainingArguments(...)."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "AACETrainer does not support DeepSpeed or FSDP yet: the perturbation needs the full parameters on "
                "every process. Launch with DDP instead (accelerate launch --multi_gpu ...)."
            )
        if self.args.channels_last:
            # In place: the parameters stay the same objects, so optimizers and DDP built later see the new layout.
            self.model.to(memory_format=torch.channels_last)
        self.augmentation = augmentation
        if augmentation is not None:
            # Every process draws its own augmentations; a resumed run reloads the streams from the checkpoint.
            augmentation.manual_seed(self.args.seed + self.args.process_index)
        self._perturbation = WeightPerturbation()
        self._metric_sums: dict[str, torch.Tensor] = {}

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = self._prepare_inputs(inputs)
        if self.augmentation is not None:
            inputs["pixel_values"] = self.augmentation(inputs["pixel_values"])
        inputs = self._to_memory_format(inputs)
        if self.args.sam_method == "sgd":
            return super().training_step(model, inputs, num_items_in_batch)

        if "labels" not in inputs:
            raise ValueError(
                f"AACETrainer needs class labels under 'labels' in every training batch (got keys {sorted(inputs)}): "
                "the perturbation loss is computed from them. Rename the label column to 'labels'."
            )
        params = [p for p in model.parameters() if p.requires_grad]
        # Pass 1 at w. Under no_sync, DDP neither prepares nor runs a gradient all-reduce: each process perturbs
        # with its own micro-batch's gradient (SAM's m-sharpness).
        model.train()
        with self.accelerator.no_sync(model):
            with self.compute_loss_context_manager():
                logits = model(**inputs).logits
            perturbation_loss = self._perturbation_loss(logits, inputs["labels"])
            scaler = self.accelerator.scaler
            objective = scaler.scale(perturbation_loss) if scaler is not None else perturbation_loss
            grads = torch.autograd.grad(objective, params, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None]
        params, grads = [params[i] for i in used], [grads[i] for i in used]
        skipped = None
        if scaler is not None:
            skipped = unscale_gradients_(grads, scaler)
        grad_norm, perturbation_norm = perturbation_from_gradients_(
            grads, params, self.args.sam_method, self.args.rho, self.args.normalize_perturbation
        )
        # fp16 only: an overflowed first pass gives no perturbation. This reads one flag back from the device.
        perturb = skipped is None or not bool(skipped.item())

        # Pass 2 at w + e through the Trainer's own step, then back to w exactly.
        if perturb:
            self._perturbation.apply_(params, grads)
        try:
            with frozen_batchnorm_statistics(model):
                loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            if perturb:
                self._perturbation.restore_(params)
        del grads

        self._accumulate_metrics(
            perturbation_loss=perturbation_loss.detach(),
            perturbation_grad_norm=grad_norm,
            perturbation_norm=perturbation_norm if perturb else torch.zeros_like(perturbation_norm),
            # Cross-entropy and accuracy at w come free from the first pass's logits.
            clean_loss=F.cross_entropy(logits.detach().float(), inputs["labels"]),
            clean_accuracy=(logits.detach().argmax(-1) == inputs["labels"]).float().mean(),
            skipped_perturbations=skipped,
        )
        return loss

    def _perturbation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss whose gradient sets the perturbation: AACE for "aace", cross-entropy for "sam" and "asam"."""
        if self.args.sam_method == "aace":
            return aace_loss_unchecked(logits, labels, self.args.aace_threshold, self.args.aace_mode)
        return F.cross_entropy(logits.float(), labels)

    def _accumulate_metrics(self, **values: torch.Tensor | None) -> None:
        # On-device running sums: no host sync per step; `log` reduces them across processes.
        values = {name: value.detach().float().reshape(()) for name, value in values.items() if value is not None}
        values["count"] = torch.ones_like(values["perturbation_loss"])
        for name, value in values.items():
            self._metric_sums[name] = self._metric_sums[name] + value if name in self._metric_sums else value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metric_sums:
            names = sorted(self._metric_sums)
            totals = self.accelerator.reduce(torch.stack([self._metric_sums[n] for n in names]), reduction="sum")
            totals = dict(zip(names, totals.tolist()))
            count = totals.pop("count")
            for name in METRIC_NAMES:
                logs[name] = round(totals[name] / count, 6)
            if totals.get("skipped_perturbations"):
                logs["skipped_perturbations"] = int(totals["skipped_perturbations"])
            self._metric_sums = {}
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.augmentation is not None and inputs["pixel_values"].dtype == torch.uint8:
            inputs = self._prepare_inputs(inputs)
            inputs["pixel_values"] = self.augmentation.normalize(inputs["pixel_values"])
        inputs = self._to_memory_format(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _to_memory_format(self, inputs: dict[str, Any]) -> dict[str, Any]:
        pixel_values = inputs.get("pixel_values")
        if self.args.channels_last and isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4:
            inputs["pixel_values"] = pixel_values.contiguous(memory_format=torch.channels_last)
        return inputs

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        if self.args.weight_decay_all_parameters:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.args.lr_milestones is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        milestones = [max(1, round(m * num_training_steps)) for m in self.args.lr_milestones]
        self.lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer if optimizer is not None else self.optimizer, milestones=milestones, gamma=self.args.lr_gamma
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_id: str | None = None,
        dataset_name: str | None = None,
        test_split: str = "test",
        metrics: dict[str, float] | None = None,
        run_arguments: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        """Writes the hf_aace model card to `output_dir/README.md` (the Trainer's `push_to_hub` uploads it).

        Args:
            model_name: the card's title; defaults to the Hub repository name or the output folder's name.
            dataset_id: Hub id of the training dataset, for the metadata.
            dataset_name: readable dataset name.
            test_split: split the test metrics come from.
            metrics: measured results; defaults to `output_dir/all_results.json` when it exists.
            run_arguments: the run's exact arguments; defaults to the training arguments.
            **kwargs: the Trainer's own card options (tags, language, ...), which this card does not use.
        """
        if not self.is_world_process_zero():
            return
        results_path = os.path.join(self.args.output_dir, "all_results.json")
        if metrics is None and os.path.isfile(results_path):
            with open(results_path) as file:
                metrics = json.load(file)
        name = model_name or (self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir)))
        card = build_model_card(
            self.accelerator.unwrap_model(self.model).config,
            run_arguments if run_arguments is not None else self.args.to_dict(),
            metrics or {},
            method=self.args.sam_method,
            model_name=name.split("/")[-1],
            dataset_id=dataset_id,
            dataset_name=dataset_name,
            test_split=test_split,
            repo_id=self.args.hub_model_id or name,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

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
