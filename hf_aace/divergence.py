"""Stops a diverged run: non-finite weights end training with an error that says where and what to change.

Weights are the signal, not the logged loss: the Trainer replaces a non-finite loss by the running average in its
logs (`logging_nan_inf_filter`), and fp16 loss scaling skips the steps whose gradients overflow without harming the
weights. Once a NaN or an infinity reaches the weights, every later step, checkpoint and evaluation carries it.
"""

import itertools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .perturbation import local_shards


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite weights.

    Attributes:
        step: the optimizer step after which the weights were found non-finite.
        tensor_name: the first parameter or buffer holding a NaN or an infinity.
    """

    def __init__(self, message: str, step: int, tensor_name: str):
        super().__init__(message)
        self.step = step
        self.tensor_name = tensor_name


def first_non_finite_tensor(model: nn.Module) -> str | None:
    """Names the first floating-point parameter or buffer of `model` holding a NaN or an infinity, or returns None.

    One fused max-abs over all tensors and one value read back from the device; tensors are searched one by one only
    when something is non-finite. In a distributed run the verdict is shared by all processes (BatchNorm statistics
    can differ between them, and sharded weights are checked shard by shard), so that all stop together; a process
    whose own tensors are finite then names none.
    """
    # Sharded tensors (FSDP2) are checked by the process holding each shard; a shard can be empty.
    named = [
        (name, shard)
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
        for shard in local_shards([tensor.detach()])
        if shard.is_floating_point() and shard.numel()
    ]
    if not named:
        return None
    # The infinity norm is exact (no sum that could overflow) and propagates NaN.
    norms = torch._foreach_norm([tensor for _, tensor in named], ord=float("inf"))
    non_finite = (~torch.stack(norms).isfinite()).any().to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(non_finite, op=dist.ReduceOp.MAX)
    if not non_finite.item():
        return None
    return next((name for name, tensor in named if not tensor.isfinite().all()), "a tensor of another process")


class DivergenceCallback(TrainerCallback):
    """Raises [`TrainingDivergedError`] when the weights are non-finite before a log, evaluation, checkpoint or stop.

    `on_step_end` and `on_epoch_end` run after the optimizer step and before the Trainer logs, evaluates or saves, so
    no non-finite weights reach the logs, a checkpoint or the final model: the last checkpoint stays one to resume
    from. The check costs one value read back from the device, and only on those steps.

    Example:
    ```python
    >>> from transformers import Trainer
    >>> from hf_aace.divergence import DivergenceCallback
    >>> callbacks = [DivergenceCallback()]
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=callbacks)  # doctest: +SKIP
    ```
    """

    def __init__(self, radius: Callable[[], float | None] | None = None):
        """Args:
        radius: gives the perturbation radius the step uses, for the error message (None: no radius to name).
        """
        self._checked_step = -1
        self._radius = radius

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs,
    ):
        acting = control.should_log or control.should_evaluate or control.should_save or control.should_training_stop
        if model is not None and acting and state.global_step != self._checked_step:
            self._checked_step = state.global_step
            name = first_non_finite_tensor(model)
            if name is not None:
                rho = self._radius() if self._radius is not None else None
                raise TrainingDivergedError(_message(args, state.global_step, name, rho), state.global_step, name)
        return control

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs,
    ):
        return self.on_step_end(args, state, control, model=model, **kwargs)


def _message(args: TrainingArguments, step: int, name: str, rho: float | None) -> str:
    radius = f" or the perturbation radius (--rho, now {rho})" if rho is not None else ""
    return (
        f"Training diverged: after step {step} the weights are no longer finite (first: {name!r}); nothing of that "
        f"step was logged or saved. Lower the learning rate (--learning_rate, now {args.learning_rate}){radius}, or "
        "check the data for broken images or labels, then train again in a new --output_dir (resuming a checkpoint "
        "keeps the learning rate saved in it)."
    )
