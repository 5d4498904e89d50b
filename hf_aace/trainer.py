"""AACETrainer: the transformers Trainer with the two-pass sharpness-aware step of AACE, SAM or ASAM."""

import bisect
import json
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import unwrap_peft_model

from .divergence import DivergenceCallback
from .hub import build_model_card, saved_processor_class
from .image_batches import ImageBatchMixin
from .perturbation import (
    WeightPerturbation,
    frozen_batchnorm_statistics,
    perturbation_from_gradients_,
    unscale_gradients_,
)
from .tasks import (
    aligned_aace_loss,
    check_multi_hot,
    count_targets,
    detect_task,
    is_causal_lm,
    output_logits,
    single_label_accuracy,
)
from .training_args import AACETrainingArguments

METRIC_NAMES = ("perturbation_loss", "perturbation_grad_norm", "perturbation_norm", "clean_loss", "clean_accuracy")


class AACETrainer(ImageBatchMixin, Trainer):
    """A [`~transformers.Trainer`] whose training step is the two-pass sharpness-aware step.

    For each micro-batch (Ratchatorn & Tanaka 2024, Algorithm 1; Foret et al. 2021):

    1. forward at the weights w (BatchNorm statistics update here), gradient g of the perturbation loss (AACE on the
       class logits for "aace", the Trainer's own training loss for "sam"/"asam"), with the accumulated `.grad` set
       aside and without gradient all-reduce;
    2. perturb the weights to w + e (see `hf_aace.perturbation`);
    3. forward and backward at w + e through the Trainer's usual path (loss scaling, gradient accumulation and
       all-reduce unchanged) with BatchNorm statistics frozen;
    4. restore w from a saved copy; the optimizer then steps with the second pass's gradient.

    Everything else (optimizers, clipping, checkpoints, evaluation, callbacks, `push_to_hub`) is the Trainer's. A
    [`~hf_aace.DivergenceCallback`] is added: non-finite weights end training with a `TrainingDivergedError` before
    they are logged or saved.

    Image datasets that yield uint8 batches are handled by [`~hf_aace.image_batches.ImageBatchMixin`]: the
    augmentation runs once per micro-batch before the first pass (both passes see the same augmented batch).

    Args:
        augmentation: optional batch augmentation called on the device batch's `pixel_values` before the first pass;
            evaluation calls its `normalize`. Its random stream is seeded with `args.seed + process_index` and saved
            with every checkpoint. Without it, batches reach the model as the data collator made them.
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
        super().__init__(*args, augmentation=augmentation, **kwargs)
        if not isinstance(self.args, AACETrainingArguments):
            raise ValueError(
                f"AACETrainer needs AACETrainingArguments, got {type(self.args).__name__}; "
                "build the arguments with hf_aace.AACETrainingArguments(...)."
            )
        checkpointing = self.args.activation_checkpointing_kwargs or {}
        if self.args.ddp_static_graph and self.args.activation_checkpointing and checkpointing.get("use_reentrant"):
            raise ValueError(
                "AACETrainer cannot combine ddp_static_graph with reentrant gradient checkpointing: static-graph DDP "
                "needs the first pass's gradient taken with torch.autograd.grad, which reentrant checkpointing "
                "refuses. Drop --ddp_static_graph or set activation_checkpointing_kwargs={'use_reentrant': False}."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "AACETrainer does not support DeepSpeed or FSDP yet: the perturbation needs the full parameters on "
                "every process. Launch with DDP instead (accelerate launch --multi_gpu ...)."
            )
        if not any(isinstance(callback, DivergenceCallback) for callback in self.callback_handler.callbacks):
            # Non-finite weights stop training before they reach a log, an evaluation or a checkpoint.
            self.add_callback(DivergenceCallback())
        self._perturbation = WeightPerturbation()
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._causal_lm = is_causal_lm(unwrap_peft_model(self.accelerator.unwrap_model(self.model)))
        self._class_label_items: torch.Tensor | None = None
        self._multi_hot_checked = False

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = self.prepare_image_batch(inputs)
        method = self.args.method
        if not method.perturbs:
            return super().training_step(model, inputs, num_items_in_batch)

        model.train()
        # Pass 1 at w on the module DDP wraps: DDP neither prepares nor runs a gradient all-reduce (each process
        # perturbs with its own micro-batch's gradient, SAM's m-sharpness), and static-graph DDP sees only pass 2.
        first_pass_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        with self.accelerator.no_sync(model):
            clean_loss, perturbation_loss, report_scale, accuracy = self._first_pass(
                first_pass_model, inputs, num_items_in_batch
            )
            params = [p for p in model.parameters() if p.requires_grad]
            scaler = self.accelerator.scaler
            grads = self._gradients(
                scaler.scale(perturbation_loss) if scaler is not None else perturbation_loss, params
            )
        used = [i for i, g in enumerate(grads) if g is not None]
        params, grads = [params[i] for i in used], [grads[i] for i in used]
        skipped = unscale_gradients_(grads, scaler) if scaler is not None else None
        grad_norm, perturbation_norm = perturbation_from_gradients_(
            grads, params, method, self.args.perturbation_rho, self.args.perturbation_normalized
        )
        # fp16 only: an overflowed first pass gives no perturbation. This reads one flag back from the device.
        perturb = skipped is None or not bool(skipped.item())

        # Pass 2 at w + e through the Trainer's own step, then back to w exactly. e is freed once applied: the restore
        # copies from the saved weights, so pass 2 holds one extra copy of the trainable weights.
        if perturb:
            self._perturbation.apply_(params, grads)
        del grads
        try:
            with frozen_batchnorm_statistics(model):
                loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            if perturb:
                self._perturbation.restore_(params)

        self._accumulate_metrics(
            perturbation_loss=perturbation_loss.detach() * report_scale,
            perturbation_grad_norm=grad_norm,
            perturbation_norm=perturbation_norm if perturb else torch.zeros_like(perturbation_norm),
            clean_loss=clean_loss,
            clean_accuracy=accuracy,
            skipped_perturbations=skipped,
        )
        return loss

    def _first_pass(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """Forward at w: the perturbation loss of the method, and the clean loss and accuracy for the logs.

        The Trainer's own `compute_loss` runs on a shallow copy of the inputs (it pops the labels when a loss function
        or label smoother is set), so the first pass computes exactly the loss plain `Trainer` trains with: the model's
        loss, `compute_loss_func`, label smoothing or a subclass's `compute_loss`, with `num_items_in_batch`.

        Returns:
            `(clean_loss, perturbation_loss, report_scale, accuracy)`: the training loss at w on the scale of the
            logged `loss` (detached); the loss to differentiate; the factor that brings it to that scale; the accuracy
            at w for single-label classification (else None).
        """
        labels = self._labels(inputs)
        if labels is None and self.args.method.needs_class_labels:
            raise ValueError(
                f"AACE (--sam_method aace) needs class labels in every training batch, under {self.label_names} (got "
                f"keys {sorted(inputs)}). Name the label column 'labels' or set --label_names; --sam_method sam or "
                "asam train with any loss."
            )
        with self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(
                model, {**inputs}, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if self.args.n_gpu > 1:
            loss = loss.mean()  # DataParallel returns one loss per GPU, as in Trainer.training_step
        # Losses normalised over the whole accumulated batch are a fraction of a step's loss; the logs show them at
        # the scale of the logged `loss` (the Trainer's own rule).
        steps = self.current_gradient_accumulation_steps
        loss_scale = steps if self._loss_is_scaled_for_ga(num_items_in_batch) else 1
        clean_loss = loss.detach() * loss_scale

        task, logits = None, None
        if self.args.method.needs_class_labels or labels is not None:
            try:
                # compute_loss calls the model without "labels" when a loss function or smoother takes them.
                popped = (self.label_smoother is not None or self.compute_loss_func is not None) and "labels" in inputs
                logits = output_logits(outputs, has_loss=not popped)
                task = detect_task(logits, labels, causal=self._causal_lm, problem_type=self._problem_type())
            except ValueError:
                if self.args.method.needs_class_labels:
                    raise
        accuracy = single_label_accuracy(logits.detach(), labels) if task == "single_label" else None
        if self.args.method.perturbation_loss == "training":
            return clean_loss, loss, loss_scale, accuracy

        if task == "multi_label" and not self._multi_hot_checked:
            check_multi_hot(labels)
            self._multi_hot_checked = True
        num_items = None
        if task == "causal" and num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            # transformers' causal-LM loss divides by the target tokens of the whole accumulated batch (and the Trainer
            # multiplies by the number of processes when it counts tokens across them).
            num_items = self._class_label_items
            if num_items is None:  # training_step called outside the Trainer's loop: this batch is the whole step
                num_items = count_targets([inputs], self.label_names[0], causal=True)
            if self.args.average_tokens_across_devices:
                num_items = num_items / self.accelerator.num_processes
        perturbation_loss = aligned_aace_loss(
            logits,
            labels,
            task,
            threshold=self.args.aace_threshold,
            mode=self.args.aace_mode,
            shift_labels=inputs.get("shift_labels"),
            num_items=num_items,
        )
        return clean_loss, perturbation_loss, steps if num_items is not None else 1, accuracy

    def _gradients(self, objective: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The gradient of `objective`, leaving the accumulated `.grad` of earlier micro-batches as it was.

        `backward()` rather than `torch.autograd.grad`, which reentrant gradient checkpointing refuses: the
        accumulated gradients are set aside (references, no copies) and put back.
        """
        if self.args.ddp_static_graph:
            # Static-graph DDP counts the gradient hooks that fire in its first iterations, pass 1's too, and would
            # then wait for twice as many in pass 2: take this gradient without accumulating into `.grad`.
            return list(torch.autograd.grad(objective, params, allow_unused=True))
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            objective.backward()
            return [p.grad for p in params]
        finally:
            for p, grad in zip(params, accumulated):
                p.grad = grad

    def _labels(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The batch's labels, under `label_names` (the Trainer's `label_names` or the model's)."""
        names = self.label_names or []
        if len(names) > 1 and self.args.method.needs_class_labels:
            raise ValueError(
                f"AACE (--sam_method aace) needs one label tensor per batch; this model takes {names}. Use "
                "--sam_method sam or asam, which train with the model's own loss."
            )
        return inputs.get(names[0]) if names else None

    def _loss_is_scaled_for_ga(self, num_items_in_batch: torch.Tensor | None) -> bool:
        """Whether `compute_loss` already divided by the accumulated batch (the rule of `Trainer.training_step`)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def _problem_type(self) -> str | None:
        return getattr(
            getattr(unwrap_peft_model(self.accelerator.unwrap_model(self.model)), "config", None), "problem_type", None
        )

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if (
            self.args.method.needs_class_labels
            and self._causal_lm
            and num_items_in_batch is not None
            and self.label_names
        ):
            # The Trainer counts shifted tokens only for models whose `loss_type` says so (GPT-2's is None); AACE
            # counts the targets of every causal LM after the shift, across processes as the Trainer does.
            count = count_targets(batch_samples, self.label_names[0], causal=True)
            if count is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count.to(device)).sum()
            self._class_label_items = count.to(device) if count is not None else None
        return batch_samples, num_items_in_batch

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
                if name in totals:
                    logs[name] = round(totals[name] / count, 6)
            if totals.get("skipped_perturbations"):
                logs["skipped_perturbations"] = int(totals["skipped_perturbations"])
            self._metric_sums = {}
        super().log(logs, start_time)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        if self.args.weight_decay_all_parameters:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.args.lr_milestones is None or self.lr_scheduler is not None:
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
        perturbation = {}
        if self.args.method.perturbs:
            perturbation = {"rho": self.args.perturbation_rho, "normalized": self.args.perturbation_normalized}
            if self.args.method.needs_class_labels:
                perturbation.update(threshold=self.args.aace_threshold, mode=self.args.aace_mode)
        card = build_model_card(
            self.accelerator.unwrap_model(self.model),
            run_arguments if run_arguments is not None else self.args.to_dict(),
            metrics or {},
            method=self.args.sam_method,
            model_name=name.split("/")[-1],
            dataset_id=dataset_id,
            dataset_name=dataset_name,
            test_split=test_split,
            repo_id=self.args.hub_model_id or name,
            processor_class=saved_processor_class(output_dir),
            plots=plots,
            perturbation=perturbation,
            **kwargs,
        )
        card.save(os.path.join(output_dir, "README.md"))
