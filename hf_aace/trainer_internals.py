"""Every private or copied behaviour of `transformers.Trainer` (and of trainers built on it) that hf_aace relies on.

A transformers or TRL release can change any of these without notice; they live here, each with a line saying what it
depends on, and `tests/test_trainer_internals.py` checks that every private name still exists on the installed
Trainer. Checked against transformers 5.10.1 and 5.25.0, the ends of the range setup.cfg declares (`make test-oldest`).

Private names used (the test reads `PRIVATE_TRAINER_ATTRIBUTES`):
- `Trainer._prepare_inputs(inputs)`: moves a batch to the device (both passes, and uint8 image batches);
- `Trainer._prepare_context_parallel_inputs(model, inputs)` (where it exists): the context-parallel wrapper of a step;
- `Trainer._save_rng_state(dir)` / `_load_rng_state(dir)`: overridden to save the augmentation's random stream and the
  perturbation kept for reuse;
- `Trainer._created_lr_scheduler`: set when hf_aace builds the scheduler, as `create_scheduler` does.
"""

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

PRIVATE_TRAINER_ATTRIBUTES = ("_prepare_inputs", "_save_rng_state", "_load_rng_state")


def activation_checkpointing_kwargs(args: TrainingArguments) -> tuple[bool, dict]:
    """Whether activation checkpointing is on, and its keyword arguments.

    transformers after 5.17 renamed `gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)`; either
    works.
    """
    enabled = getattr(args, "activation_checkpointing", None)
    if enabled is None:
        enabled = getattr(args, "gradient_checkpointing", False)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None)
    if kwargs is None:
        kwargs = getattr(args, "gradient_checkpointing_kwargs", None)
    return bool(enabled), dict(kwargs or {})


def prepare_inputs(trainer: Trainer, inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch on the device, as `Trainer.training_step` prepares it (private `_prepare_inputs`)."""
    return trainer._prepare_inputs(inputs)


@contextmanager
def training_step_preparation(trainer: Trainer, model: torch.nn.Module, inputs: dict[str, Any]) -> Iterator[dict]:
    """What `Trainer.training_step` does before its `compute_loss`, for a pass that runs outside it.

    Copied from transformers 5.25's `training_step`: the context-parallel context and inputs (private
    `_prepare_context_parallel_inputs`, where it exists), train mode of the model and of an optimizer that has one
    (schedule-free optimizers), `_prepare_inputs`, and `compute_loss_context_manager` (autocast where the Trainer
    opens one, and its other context managers). Yields the prepared inputs.
    """
    prepare_parallel = getattr(trainer, "_prepare_context_parallel_inputs", None)
    context = nullcontext
    if prepare_parallel is not None:
        context, inputs = prepare_parallel(model, inputs)
    with context():
        model.train()
        if hasattr(trainer.optimizer, "train") and callable(trainer.optimizer.train):
            trainer.optimizer.train()
        inputs = prepare_inputs(trainer, inputs)
        with trainer.compute_loss_context_manager():
            yield inputs


def loss_is_scaled_for_ga(trainer: Trainer, num_items_in_batch: Any) -> bool:
    """Whether `compute_loss` already divided by the accumulated batch, so that `training_step` does not divide by
    the accumulation steps (copied rule of transformers 5.x `training_step`; the `loss_is_scaled_for_ga` override
    exists after 5.17)."""
    if getattr(trainer, "loss_is_scaled_for_ga", None) is not None:
        return trainer.loss_is_scaled_for_ga
    return (
        trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
    ) or trainer.compute_loss_func is not None


def loss_scale_across_processes(trainer: Trainer, num_items_in_batch: Any) -> int:
    """The factor `Trainer.compute_loss` multiplies a loss normalised by `num_items_in_batch` with, in place (the
    model's own output too), when that count is summed over the processes (copied rule of transformers 5.x
    `compute_loss`; tensor-parallel ranks share a batch after 5.17, `get_tp_size`)."""
    if not (
        getattr(trainer.args, "average_tokens_across_devices", False)
        and (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None)
        and num_items_in_batch is not None
    ):
        return 1
    if trainer.args.n_gpu > 1:
        return trainer.args.n_gpu
    tp_size = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return trainer.accelerator.num_processes // tp_size


def mean_over_data_parallel(trainer: Trainer, loss: torch.Tensor) -> torch.Tensor:
    """DataParallel (one process, several GPUs) returns one loss per GPU; `training_step` takes their mean."""
    return loss.mean() if trainer.args.n_gpu > 1 else loss


def compute_loss_pops_labels(trainer: Trainer) -> bool:
    """Whether `Trainer.compute_loss` takes the labels out of the inputs (a label smoother or `compute_loss_func`), so
    that the model returns no loss of its own."""
    return trainer.label_smoother is not None or trainer.compute_loss_func is not None


def mark_scheduler_created(trainer: Trainer) -> None:
    """`create_scheduler` sets the private `_created_lr_scheduler` so that the Trainer rebuilds it on a new train()."""
    trainer._created_lr_scheduler = True


def model_loss_kwargs(trainer: Trainer, num_items_in_batch: Any) -> dict:
    """What `Trainer.compute_loss` adds to the model's inputs: `num_items_in_batch` where the model takes loss
    keyword arguments (copied rule of transformers 5.x `compute_loss`)."""
    if trainer.model_accepts_loss_kwargs and num_items_in_batch is not None:
        return {"num_items_in_batch": num_items_in_batch}
    return {}


@dataclass(frozen=True)
class TrainerSupport:
    """How the two-pass step serves one trainer class (matched by name along the class's bases).

    Attributes:
        name: the trainer's class name.
        metric_store: the attribute (a dict of modes, each a dict of lists) in which the trainer's `compute_loss`
            records its own training metrics. The first pass's records are taken back, so the metrics are logged once
            per step, from the second pass (the trainer's own `training_step`), as the plain trainer logs them.
        counters: running totals the trainer's `compute_loss` advances (restored after the first pass).
        outputs_from_model: the trainer's `compute_loss(..., return_outputs=True)` recomputes the outputs in an extra
            forward without gradients: the first pass then takes AACE's logits from the model's own forward, and
            sam/asam call `compute_loss` without outputs.
        model_inputs: extra inputs of that forward, as the trainer's `compute_loss` gives them.
        refusal: why the two-pass step cannot serve the trainer.
    """

    name: str
    metric_store: str | None = None
    counters: tuple[str, ...] = ()
    outputs_from_model: bool = False
    model_inputs: tuple[tuple[str, Any], ...] = ()
    refusal: str | None = None


_REFERENCE = (
    "each of its losses runs extra forwards (a reference model, or chosen and rejected completions compared), so the "
    "step would not be two forwards of one loss"
)
_ONLINE = "it generates completions inside its training step, which a second pass would repeat"

TRAINERS: dict[str, TrainerSupport] = {
    support.name: support
    for support in (
        # TRL 1.16 (trl/trainer/sft_trainer.py): compute_loss records entropy, mean_token_accuracy and num_tokens in
        # self._metrics[mode] and advances self._total_train_tokens; with return_outputs=True it recomputes the logits
        # under torch.no_grad; it sets use_cache=False.
        TrainerSupport(
            "SFTTrainer",
            metric_store="_metrics",
            counters=("_total_train_tokens",),
            outputs_from_model=True,
            model_inputs=(("use_cache", False),),
        ),
        TrainerSupport("DPOTrainer", refusal=_REFERENCE),
        TrainerSupport("KTOTrainer", refusal=_REFERENCE),
        TrainerSupport("ORPOTrainer", refusal=_REFERENCE),
        TrainerSupport("CPOTrainer", refusal=_REFERENCE),
        TrainerSupport("BCOTrainer", refusal=_REFERENCE),
        TrainerSupport(
            "RewardTrainer",
            refusal="its loss compares the rewards of chosen and rejected completions (no class labels)",
        ),
        TrainerSupport("GRPOTrainer", refusal=_ONLINE),
        TrainerSupport("RLOOTrainer", refusal=_ONLINE),
        TrainerSupport("PPOTrainer", refusal=_ONLINE),
        TrainerSupport("OnlineDPOTrainer", refusal=_ONLINE),
        TrainerSupport("GKDTrainer", refusal=_ONLINE),
        TrainerSupport("GOLDTrainer", refusal=_ONLINE),
        TrainerSupport("DistillationTrainer", refusal=_ONLINE),
    )
}


def trainer_support(trainer_class: type) -> TrainerSupport | None:
    """The entry of the nearest base of `trainer_class` listed in `TRAINERS`; None for a plain Trainer subclass.

    A TRL trainer the table does not know is refused: its step may run extra forwards or generate.
    """
    for cls in trainer_class.__mro__:
        if cls.__name__ in TRAINERS:
            return TRAINERS[cls.__name__]
        if cls.__module__.split(".")[0] == "trl":
            return TrainerSupport(cls.__name__, refusal="hf_aace does not know how its training step works yet")
    return None


@contextmanager
def metrics_not_recorded(trainer: Trainer, support: TrainerSupport | None) -> Iterator[None]:
    """What the trainer's `compute_loss` records in its metric store and counters inside the block is taken back."""
    store = getattr(trainer, support.metric_store, None) if support and support.metric_store else None
    saved = {mode: {key: list(values) for key, values in metrics.items()} for mode, metrics in (store or {}).items()}
    counters = {
        name: getattr(trainer, name) for name in (support.counters if support else ()) if hasattr(trainer, name)
    }
    try:
        yield
    finally:
        for mode, metrics in (store or {}).items():  # in place: the trainer keeps the same objects
            metrics.clear()
            metrics.update(saved.get(mode, {}))
        for name, value in counters.items():
            setattr(trainer, name, value)
