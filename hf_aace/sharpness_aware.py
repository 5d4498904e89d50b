"""`sharpness_aware(trainer_class)`: any Trainer class with the two-pass sharpness-aware step of AACE, SAM or ASAM.

The subclass's `training_step` builds the two closures of `hf_aace.step.two_pass_step` from the Trainer:

1. first pass at w, prepared exactly as `Trainer.training_step` prepares its own (train modes of model and optimizer,
   prepared inputs, context managers and autocast, `num_items_in_batch`), through the trainer's own `compute_loss`;
   its objective is AACE on the pairs the model's loss uses (`hf_aace.tasks`) for "aace", the training loss itself
   for "sam"/"asam"; taken without gradient all-reduce, with BatchNorm statistics updating;
2. second pass at w + e: the parent class's own `training_step` (loss scaling, accumulation, all-reduce, its metrics)
   with BatchNorm statistics frozen.

Everything else (evaluation, generation, checkpoints, callbacks, `push_to_hub`) is the parent's. With
`step_capture="cuda_graph"` each kind of step runs as a CUDA graph, captured once and replayed (`hf_aace.capture`).
"""

import math
import os
from contextlib import nullcontext
from typing import Any

import torch
from accelerate.utils import AutocastKwargs
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils import logging

from .capture import CUDAGraphs, StepCapture, check_step_capture
from .divergence import DivergenceCallback
from .perturbation import WeightPerturbation, frozen_batchnorm_statistics, local_shards
from .sharding import (
    check_sharding,
    is_fsdp2,
    own_class,
    perturbation_scope,
    reduce_gradients_in_step,
    whole_model_saved,
)
from .step import StepStatistics, autograd_gradients, backward_gradients, two_pass_step
from .tasks import (
    AACETaskError,
    ModelFacts,
    TaskRule,
    aace_on_pairs,
    check_multi_hot,
    check_pairs,
    output_logits,
    select_rule,
    single_label_accuracy,
)
from .trainer_internals import (
    activation_checkpointing_kwargs,
    compute_loss_pops_labels,
    loss_is_scaled_for_ga,
    loss_scale_across_processes,
    mean_over_data_parallel,
    metrics_not_recorded,
    model_loss_kwargs,
    trainer_support,
    training_step_preparation,
)
from .training_args import SHARPNESS_AWARE_FIELDS, SharpnessAwareArguments

logger = logging.get_logger(__name__)

# The perturbation kept for reuse, per process, in each checkpoint (`perturbation_reuse`).
KEPT_PERTURBATION_NAME = "kept_perturbation_{}.pt"
# A two-pass step's metrics: their names, and their values stacked in one tensor on the device.
StepMetrics = tuple[tuple[str, ...], torch.Tensor]
METRIC_NAMES = ("perturbation_loss", "perturbation_grad_norm", "perturbation_norm", "clean_loss", "clean_accuracy")


class SharpnessAwareMixin:
    """The two-pass step for a `transformers.Trainer` subclass; build classes with [`sharpness_aware`].

    Args:
        sharpness_aware_args: the step's settings. Without it they are read from `args` when `args` has them (an
            [`AACETrainingArguments`], or any arguments class with the [`SharpnessAwareArguments`] fields), else the
            defaults of [`SharpnessAwareArguments`].
        aace_pairs_func: for "aace" on a model none of `hf_aace.tasks.RULES` serves: `f(outputs, labels, inputs)`
            returns the class scores (..., C) and integer labels (...) to take AACE on (-100 ignored).
        *args, **kwargs: those of the parent Trainer class.
    """

    def __init__(
        self,
        *args,
        sharpness_aware_args: SharpnessAwareArguments | None = None,
        aace_pairs_func: Any | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if sharpness_aware_args is not None and all(hasattr(self.args, f) for f in SHARPNESS_AWARE_FIELDS):
            raise ValueError(
                f"{type(self).__name__} got sharpness_aware_args and arguments ({type(self.args).__name__}) that "
                "carry the same settings; give them once: drop sharpness_aware_args, or use the Trainer's own "
                "arguments class."
            )
        self._sharpness_aware_args = sharpness_aware_args
        self.aace_pairs_func = aace_pairs_func
        enabled, checkpointing = activation_checkpointing_kwargs(self.args)
        if getattr(self.args, "ddp_static_graph", False) and enabled and checkpointing.get("use_reentrant"):
            raise ValueError(
                f"{type(self).__name__} cannot combine ddp_static_graph with reentrant gradient checkpointing: "
                "static-graph DDP needs the first pass's gradient taken with torch.autograd.grad, which reentrant "
                "checkpointing refuses. Drop --ddp_static_graph or set "
                "activation_checkpointing_kwargs={'use_reentrant': False}."
            )
        check_sharding(self)
        if self.sharpness_aware_args.stop_on_divergence and not any(
            isinstance(callback, DivergenceCallback) for callback in self.callback_handler.callbacks
        ):
            # Non-finite weights stop training before they reach a log, an evaluation or a checkpoint.
            self.add_callback(DivergenceCallback(radius=lambda: self.perturbation_settings()[0]))
        self._perturbation = WeightPerturbation()
        self._metric_names: tuple[str, ...] = ()
        self._metric_total: torch.Tensor | None = None  # the step metrics' running sums, stacked in that order
        self._support = trainer_support(type(self))
        self._task_rule: TaskRule | None = None
        self._model_facts: ModelFacts | None = None
        self._pairs_checked = False
        self._step_capture: StepCapture | None = None
        if self.sharpness_aware_args.step_capture == "cuda_graph":
            check_step_capture(self)
            self._step_capture = StepCapture(CUDAGraphs())
            # Autocast's cache of cast weights would be freed between replays that still read it.
            handler = self.accelerator.autocast_handler or AutocastKwargs()
            handler.cache_enabled = False
            self.accelerator.autocast_handler = handler

    @property
    def sharpness_aware_args(self) -> SharpnessAwareArguments:
        """The step's settings, read at every use (a hyperparameter search sets them on `args`)."""
        if self._sharpness_aware_args is not None:
            return self._sharpness_aware_args
        if all(hasattr(self.args, name) for name in SHARPNESS_AWARE_FIELDS):
            return self.args
        self._sharpness_aware_args = SharpnessAwareArguments()
        return self._sharpness_aware_args

    def perturbation_settings(self) -> tuple[float | None, bool | None]:
        """`(rho, normalize)` as the step uses them for this trainer's model (the method's defaults resolved)."""
        return self.sharpness_aware_args.perturbation_for(self.accelerator.unwrap_model(self.model))

    def resolved_sharpness_aware(self) -> dict:
        """The step's settings as used, for run records and model cards, with the batch the perturbation came from
        (`hf_aace.sharding`: each process's own under DDP, the global batch under FSDP2 or on one process)."""
        resolved = self.sharpness_aware_args.resolved_sharpness_aware(self.accelerator.unwrap_model(self.model))
        return {**resolved, "perturbation_scope": perturbation_scope(self)}

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        kind = self._step_kind()
        kept = self._perturbation.kept[1] if kind == "reused" else None
        capture = self._step_capture
        if capture is None:
            loss, metrics = self._step(kind, model, inputs, num_items_in_batch, kept)
        else:
            # The modes are host-side flags, set here for every step: a replay runs no Python.
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            capture.bind(model)
            key = (kind, self.current_gradient_accumulation_steps, self.accelerator.sync_gradients)
            args = (self._prepare_inputs(inputs), num_items_in_batch, kept)
            # The parameters are listed only for warm-up and capture steps, not on a replay's path.
            loss, metrics = capture(
                key,
                lambda *a: self._step(kind, model, *a),
                args,
                lambda: [p for p in model.parameters() if p.requires_grad],
            )
            loss = loss.clone()  # the graph's output is overwritten by its next replay
        if metrics is not None:
            self._accumulate_metrics(metrics)
        return loss

    def _step_kind(self) -> str:
        """Which step this optimizer step takes: "two_pass", "plain" or "reused" (the plain step at w + e)."""
        settings = self.sharpness_aware_args
        if not settings.method.perturbs:
            return "plain"
        # The interval counts optimizer steps (every micro-batch of one step alike, and a resumed run continues the
        # same schedule: global_step is saved in checkpoints).
        if self.state.global_step % settings.perturbation_interval != 0:
            return "reused" if settings.perturbation_reuse and self._perturbation.kept is not None else "plain"
        return "two_pass"

    def _step(
        self,
        kind: str,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | None,
        kept: list[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, StepMetrics | None]:
        """One step of `kind` on one micro-batch: the loss and the step's metrics (None for one-pass steps)."""
        if kind == "plain":
            return super().training_step(model, inputs, num_items_in_batch), None
        if kind == "reused":
            return self._reused_perturbation_step(model, inputs, num_items_in_batch, kept), None
        return self._two_pass_step(model, inputs, num_items_in_batch)

    def _two_pass_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | None
    ) -> tuple[torch.Tensor, StepMetrics]:
        settings = self.sharpness_aware_args
        first_inputs = first_rows(inputs, settings.perturbation_batch_fraction)
        # Pass 1 at w on the module DDP wraps: DDP neither prepares nor runs a gradient all-reduce (each process
        # perturbs with its own micro-batch's gradient, SAM's m-sharpness), and static-graph DDP sees only pass 2.
        # FSDP2 reduce-scatters pass 1's gradient like any other: one perturbation from the global batch.
        first_pass_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        sharded = is_fsdp2(self)
        if sharded:
            reduce_gradients_in_step(self, model)
        reports: dict[str, torch.Tensor | None] = {}

        def first_pass() -> torch.Tensor:
            objective, reports["clean_loss"], reports["report_scale"], reports["clean_accuracy"] = self._first_pass(
                first_pass_model, first_inputs, num_items_in_batch
            )
            return objective

        def second_pass() -> torch.Tensor:
            with frozen_batchnorm_statistics(model):
                return super(SharpnessAwareMixin, self).training_step(model, inputs, num_items_in_batch)

        rho, normalize = self.perturbation_settings()
        loss, statistics = two_pass_step(
            [p for p in model.parameters() if p.requires_grad],
            first_pass,
            second_pass,
            method=settings.method,
            rho=rho,
            normalize=normalize,
            perturbation=self._perturbation,
            # Static-graph DDP counts the gradient hooks that fire in its first iterations, pass 1's too, and would
            # then wait for twice as many in pass 2: take that gradient without accumulating into `.grad`.
            gradient=autograd_gradients if getattr(self.args, "ddp_static_graph", False) else backward_gradients,
            scaler=self.accelerator.scaler,
            first_pass_context=nullcontext if sharded else lambda: self.accelerator.no_sync(model),
            keep_perturbation=settings.perturbation_reuse,
        )
        return loss, self._step_metrics(statistics, reports)

    def _reused_perturbation_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | None,
        perturbation: list[torch.Tensor],
    ) -> torch.Tensor:
        """The plain step at w + e, with e the last two-pass step's perturbation (`perturbation`); w restored after it.

        One forward and backward, as the plain step; BatchNorm statistics update in it, since no pass runs at w.
        """
        params = self._perturbation.kept[0]
        self._perturbation.apply_(params, perturbation)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._perturbation.restore_(params)

    def _save_rng_state(self, output_dir: str) -> None:
        # A kept perturbation is state of the run: a resumed run reuses the same one until its next two-pass step.
        super()._save_rng_state(output_dir)
        if self._perturbation.kept is not None:
            names = {id(p): name for name, p in self.model.named_parameters()}
            params, perturbation = self._perturbation.kept
            kept = {names[id(p)]: e for p, e in zip(params, local_shards(perturbation))}
            torch.save(kept, os.path.join(output_dir, KEPT_PERTURBATION_NAME.format(self.args.process_index)))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = os.path.join(checkpoint or "", KEPT_PERTURBATION_NAME.format(self.args.process_index))
        if checkpoint is None or not self.sharpness_aware_args.perturbation_reuse or not os.path.isfile(path):
            return
        kept = torch.load(path, map_location=self.args.device, weights_only=True)
        params = dict(self.model.named_parameters())
        self._perturbation.kept = ([params[name] for name in kept], list(kept.values()))

    def _first_pass(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """Forward at w: the perturbation objective, and the clean loss and accuracy for the logs.

        The trainer's own `compute_loss` runs on a shallow copy of the prepared inputs (it pops the labels when a loss
        function or label smoother is set), so the first pass computes exactly the loss the trainer trains with: the
        model's loss, `compute_loss_func`, label smoothing or a subclass's `compute_loss`, with `num_items_in_batch`.
        What the trainer's `compute_loss` records as its own metrics is taken back: the second pass records them.

        Returns:
            `(objective, clean_loss, report_scale, accuracy)`: the loss to differentiate; the training loss at w on
            the scale of the logged `loss` (detached); the factor that brings the objective to the logged scale; the
            accuracy at w for single-label classification (else None).
        """
        method = self.sharpness_aware_args.method
        with training_step_preparation(self, model, inputs) as prepared:
            labels = self._labels(prepared)
            if labels is None and method.needs_class_labels:
                raise AACETaskError(
                    f"AACE (--sam_method aace) needs class labels in every training batch, under {self.label_names} "
                    f"(got keys {sorted(prepared)}). Name the label column 'labels' or set --label_names; "
                    "--sam_method sam or asam train with any loss."
                )
            with metrics_not_recorded(self, self._support):
                loss, outputs = self._first_pass_loss(model, prepared, num_items_in_batch)
        loss = mean_over_data_parallel(self, loss)
        # Losses normalised over the whole accumulated batch are a fraction of a step's loss; the logs show them at
        # the scale of the logged `loss` (the Trainer's own rule).
        steps = self.current_gradient_accumulation_steps
        loss_scale = steps if loss_is_scaled_for_ga(self, num_items_in_batch) else 1
        clean_loss = loss.detach() * loss_scale

        pairs, rule = None, None
        if labels is not None and outputs is not None:
            try:
                pairs, rule = self._aace_pairs(model, outputs, labels, prepared, num_items_in_batch)
            except AACETaskError:
                if method.needs_class_labels:
                    raise
        accuracy = None
        if rule is not None and rule.name == "single_label":
            accuracy = single_label_accuracy(pairs[0].detach(), pairs[1])
        if method.perturbation_loss == "training":
            if not self.perturbation_settings()[1]:
                # An unnormalised perturbation follows the gradient's size: keep it that of one micro-batch's loss.
                return loss * loss_scale, clean_loss, 1, accuracy
            return loss, clean_loss, loss_scale, accuracy
        settings = self.sharpness_aware_args
        objective = aace_on_pairs(pairs, threshold=settings.aace_threshold, mode=settings.aace_mode)
        return objective, clean_loss, 1, accuracy

    def _first_pass_loss(self, model: nn.Module, inputs: dict, num_items_in_batch: Any) -> tuple[torch.Tensor, Any]:
        """The training loss at w and the model's outputs (None where getting them would cost another forward)."""
        support = self._support
        if support is None or not support.outputs_from_model:
            return self.compute_loss(model, {**inputs}, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if not self.sharpness_aware_args.method.needs_class_labels:
            return self.compute_loss(model, {**inputs}, num_items_in_batch=num_items_in_batch), None
        # The trainer's own outputs would be recomputed without gradients: AACE takes the model's own forward, whose
        # loss is the trainer's for its default loss.
        outputs = model(**inputs, **dict(support.model_inputs), **model_loss_kwargs(self, num_items_in_batch))
        return outputs["loss"], outputs

    def _aace_pairs(
        self, model: nn.Module, outputs: Any, labels: torch.Tensor, inputs: dict, num_items_in_batch: Any
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], TaskRule | None]:
        """The (logits, labels) pairs of this batch: the rule chosen on the first batch, checked once."""
        if self.aace_pairs_func is not None:
            logits, pair_labels = self.aace_pairs_func(outputs, labels, inputs)
            return (logits.reshape(-1, logits.shape[-1]), pair_labels.reshape(-1)), None
        popped = compute_loss_pops_labels(self) and "labels" in inputs
        if self._model_facts is None:  # read once: the model's class and config do not change between steps
            unwrapped = unwrap_peft_model(self.accelerator.unwrap_model(model))
            self._model_facts = ModelFacts.of(unwrapped, label_smoothing=self.label_smoother is not None)
        facts = self._model_facts
        logits = output_logits(outputs, has_loss=not popped, class_name=facts.class_name)
        if self._task_rule is None:
            self._task_rule = select_rule(facts, logits, labels)
            if self._task_rule.name == "multi_label":
                check_multi_hot(labels)
        pairs = self._task_rule.pairs(logits, labels, inputs)
        model_loss = outputs.get("loss") if hasattr(outputs, "get") else None
        # Only AACE trains on these pairs (sam/asam take them for the accuracy log alone): only AACE checks them.
        checks = self.sharpness_aware_args.method.needs_class_labels
        if checks and not self._pairs_checked and not popped and isinstance(model_loss, torch.Tensor):
            # The trainer's own compute_loss scales the model's loss in place; the model's own forward does not.
            own_forward = self._support is not None and self._support.outputs_from_model
            scale = 1 if own_forward else loss_scale_across_processes(self, num_items_in_batch)
            check_pairs(facts, self._task_rule.name, pairs, model_loss, num_items_in_batch, scale)
            self._pairs_checked = True
        return pairs, self._task_rule

    def _labels(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The batch's labels, under `label_names` (the Trainer's `label_names` or the model's)."""
        names = self.label_names or []
        if len(names) > 1 and self.sharpness_aware_args.method.needs_class_labels:
            raise AACETaskError(
                f"AACE (--sam_method aace) needs one label tensor per batch; this model takes {names}. Use "
                "--sam_method sam or asam, which train with the model's own loss."
            )
        return inputs.get(names[0]) if names else None

    def _step_metrics(self, statistics: StepStatistics, reports: dict[str, Any]) -> StepMetrics:
        """The two-pass step's metrics: their names, and their values stacked in one float tensor on the device (with
        a count of one last), so that summing them costs one kernel a step."""
        values = {
            "perturbation_loss": statistics.objective * reports["report_scale"],
            "perturbation_grad_norm": statistics.grad_norm,
            "perturbation_norm": statistics.perturbation_norm,
            "clean_loss": reports["clean_loss"],
            "clean_accuracy": reports["clean_accuracy"],
            "skipped_perturbations": statistics.skipped,
        }
        values = {name: value.detach().float().reshape(()) for name, value in values.items() if value is not None}
        values["count"] = torch.ones_like(values["perturbation_loss"])
        return tuple(values), torch.stack(list(values.values()))

    def _accumulate_metrics(self, metrics: StepMetrics) -> None:
        # On-device running sums: no host sync per step; `log` reduces them across processes. The sum is a new tensor,
        # never the step's own (a captured step overwrites that at its next replay).
        names, values = metrics
        if self._metric_total is None:
            self._metric_names, self._metric_total = names, values.clone()
        elif names == self._metric_names:
            self._metric_total = self._metric_total + values
        else:  # another set of metrics than the steps before (not seen in practice): sum over the union of names
            sums = {**dict.fromkeys(names, 0.0), **self._metric_sums}
            for name, value in zip(names, values.unbind()):
                sums[name] = sums[name] + value
            self._metric_names = tuple(sums)
            self._metric_total = torch.stack([torch.as_tensor(v, device=values.device) for v in sums.values()])

    @property
    def _metric_sums(self) -> dict[str, torch.Tensor]:
        """The running sums of the step metrics since the last log, by name."""
        if self._metric_total is None:
            return {}
        return dict(zip(self._metric_names, self._metric_total.unbind()))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Under FSDP with sharded checkpoints the final model is still saved whole (the Trainer would save no weights).
        with nullcontext() if _internal_call else whole_model_saved(self):
            super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # FSDP2 renames the model's class: save its own remote code and auto_map.
        with own_class(self.model):
            super()._save(output_dir, state_dict)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._metric_total is not None:
            totals = self.accelerator.reduce(self._metric_total, reduction="sum")
            totals = dict(zip(self._metric_names, totals.tolist()))
            count = totals.pop("count")
            for name in METRIC_NAMES:
                if name in totals:
                    logs[name] = round(totals[name] / count, 6)
            if totals.get("skipped_perturbations"):
                logs["skipped_perturbations"] = int(totals["skipped_perturbations"])
            self._metric_total = None
        super().log(logs, *args, **kwargs)


def first_rows(inputs: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The first ceil(fraction x rows) rows of a batch: every tensor whose first dimension is the batch's rows (the
    first dimension of its first tensor) is cut, everything else is kept."""
    if fraction >= 1.0:
        return inputs
    rows = next((v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if rows is None:
        return inputs
    keep = max(1, math.ceil(fraction * rows))
    return {
        key: value[:keep] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows else value
        for key, value in inputs.items()
    }


_CLASSES: dict[type, type] = {}


def sharpness_aware(trainer_class: type[Trainer]) -> type[Trainer]:
    """A subclass of `trainer_class` whose `training_step` is the two-pass sharpness-aware step.

    Works with `Trainer`, `Seq2SeqTrainer` (generation-based evaluation untouched), TRL's `SFTTrainer` and their
    subclasses; the trainers it cannot serve (`hf_aace.trainer_internals.TRAINERS`) are refused with the reason. The
    same class is returned for the same `trainer_class`.

    Example:
    ```python
    >>> from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
    >>> from hf_aace import SharpnessAwareArguments, sharpness_aware
    >>> SAMSeq2SeqTrainer = sharpness_aware(Seq2SeqTrainer)
    >>> trainer = SAMSeq2SeqTrainer(model=model, args=Seq2SeqTrainingArguments("out", predict_with_generate=True),
    ...     sharpness_aware_args=SharpnessAwareArguments(sam_method="sam"), train_dataset=train)  # doctest: +SKIP
    ```
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise ValueError(f"sharpness_aware() takes a transformers.Trainer subclass; got {trainer_class!r}.")
    if issubclass(trainer_class, SharpnessAwareMixin):
        return trainer_class
    support = trainer_support(trainer_class)
    if support is not None and support.refusal is not None:
        raise ValueError(
            f"sharpness_aware() cannot serve {trainer_class.__name__} ({support.name}): {support.refusal}. It serves "
            "Trainer, Seq2SeqTrainer, TRL's SFTTrainer and their subclasses."
        )
    if trainer_class not in _CLASSES:
        name = f"SharpnessAware{trainer_class.__name__}"
        _CLASSES[trainer_class] = type(
            name,
            (SharpnessAwareMixin, trainer_class),
            {"__module__": __name__, "__qualname__": name, "__doc__": SharpnessAwareMixin.__doc__},
        )
    return _CLASSES[trainer_class]
