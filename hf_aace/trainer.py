"""AACETrainer: the Trainer with the two-pass sharpness-aware step, image batches and the paper's recipe."""

import bisect
import json
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .hub import build_model_card, saved_processor_class
from .image_batches import ImageBatchMixin
from .sharding import perturbation_scope
from .sharpness_aware import sharpness_aware
from .trainer_internals import mark_scheduler_created


class AACETrainer(ImageBatchMixin, sharpness_aware(Trainer)):
    """A [`~transformers.Trainer`] whose training step is the two-pass sharpness-aware step: `sharpness_aware(Trainer)`
    plus uint8 image batches, the paper's recipe settings and hf_aace's model card.

    For each micro-batch (Ratchatorn & Tanaka 2024, Algorithm 1; Foret et al. 2021):

    1. forward at w (BatchNorm statistics update here), gradient g of the perturbation loss (AACE on the pairs the
       model's own loss uses for "aace", the Trainer's own training loss for "sam"/"asam"), with the accumulated
       `.grad` set aside and without gradient all-reduce;
    2. perturb the weights to w + e (see `hf_aace.perturbation`);
    3. forward and backward at w + e through the Trainer's usual path (loss scaling, gradient accumulation and
       all-reduce unchanged) with BatchNorm statistics frozen;
    4. restore w from a saved copy; the optimizer then steps with the second pass's gradient.

    Everything else (optimizers, clipping, checkpoints, evaluation, callbacks, `push_to_hub`) is the Trainer's. A
    [`~hf_aace.DivergenceCallback`] is added unless `stop_on_divergence=False`: non-finite weights end training with a
    `TrainingDivergedError` before they are logged or saved.

    The settings come from `args` when it is an [`AACETrainingArguments`] (or from `sharpness_aware_args=`). Image
    datasets that yield uint8 batches are handled by [`~hf_aace.image_batches.ImageBatchMixin`]: the augmentation runs
    once per micro-batch before the first pass (both passes see the same augmented batch). The recipe settings
    (`weight_decay_all_parameters`, `lr_milestones`, `lr_gamma`, `channels_last`) are read where `args` has them.

    Args:
        augmentation: optional batch augmentation called on the device batch's `pixel_values` before the first pass;
            evaluation calls its `normalize`. Its random stream is seeded with `args.seed + process_index` and saved
            with every checkpoint. Without it, batches reach the model as the data collator made them.
        sharpness_aware_args, aace_pairs_func: see [`~hf_aace.sharpness_aware.SharpnessAwareMixin`].
        *args, **kwargs: those of [`~transformers.Trainer`].

    Example:
    ```python
    >>> from hf_aace import AACETrainer, AACETrainingArguments
    >>> args = AACETrainingArguments(output_dir="out", sam_method="aace", rho=0.2)
    >>> trainer = AACETrainer(model=model, args=args, train_dataset=train, eval_dataset=test)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        if getattr(self.args, "weight_decay_all_parameters", False):
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if getattr(self.args, "lr_milestones", None) is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        # Step decay by lr_gamma at each milestone (a milestone that rounds to step 0 counts as step 1), in closed form
        # from the initial rate like the Trainer's own schedules: another train() on this Trainer starts again from
        # the initial rate, where torch's MultiStepLR would go on from the last one.
        milestones = sorted(max(1, round(m * num_training_steps)) for m in self.args.lr_milestones)
        gamma = self.args.lr_gamma
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer if optimizer is not None else self.optimizer,
            lambda step: gamma ** bisect.bisect_right(milestones, step),
        )
        mark_scheduler_created(self)
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

        Works for any model the Trainer trains: the pipeline task comes from the model's Auto mapping, PEFT adapters
        get an adapter card, and only hf_aace's own architectures get remote-code instructions.

        Args:
            model_name: the card's title; defaults to the Hub repository name or the output folder's name.
            dataset_id: Hub id of the training dataset, for the metadata.
            dataset_name: readable dataset name.
            test_split: split the test metrics come from.
            metrics: measured results; defaults to `output_dir/all_results.json` when it exists.
            run_arguments: the run's exact arguments; defaults to the training arguments.
            **kwargs: the Trainer's own card options: language, license, tags, finetuned_from, tasks, dataset_tags,
                dataset, dataset_args.
        """
        if not self.is_world_process_zero():
            return
        output_dir = self.args.output_dir
        results_path = os.path.join(output_dir, "all_results.json")
        if metrics is None and os.path.isfile(results_path):
            with open(results_path) as file:
                metrics = json.load(file)
        name = model_name or (self.args.hub_model_id or os.path.basename(os.path.abspath(output_dir)))
        plots = (
            sorted(f"plots/{file}" for file in os.listdir(os.path.join(output_dir, "plots")) if file.endswith(".png"))
            if os.path.isdir(os.path.join(output_dir, "plots"))
            else []
        )
        settings = self.sharpness_aware_args
        perturbation = {}
        if settings.method.perturbs:
            rho, normalized = self.perturbation_settings()
            perturbation = {"rho": rho, "normalized": normalized}
            if settings.method.needs_class_labels:
                perturbation.update(threshold=settings.aace_threshold, mode=settings.aace_mode)
        card = build_model_card(
            self.accelerator.unwrap_model(self.model),
            run_arguments if run_arguments is not None else {**self.args.to_dict(), **self.resolved_sharpness_aware()},
            metrics or {},
            method=settings.sam_method,
            model_name=name.split("/")[-1],
            dataset_id=dataset_id,
            dataset_name=dataset_name,
            test_split=test_split,
            repo_id=self.args.hub_model_id or name,
            processor_class=saved_processor_class(output_dir),
            plots=plots,
            perturbation=perturbation,
            perturbation_scope=perturbation_scope(self) if settings.method.perturbs else None,
            **kwargs,
        )
        card.save(os.path.join(output_dir, "README.md"))
