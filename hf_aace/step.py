"""The two-pass sharpness-aware step on its own: weights, one closure per pass, the method table. No Trainer.

    1. objective = first_pass()                 forward at w: the loss that sets the perturbation
    2. g = gradient(objective)                  without touching the accumulated `.grad` of earlier micro-batches
    3. w <- w + e(g)                            e from `hf_aace.perturbation.perturbation_from_gradients_`
    4. result = second_pass()                   forward and backward at w + e: the gradient the optimizer steps with
    5. w <- saved copy of w                     bit for bit, also when the second pass raises

`hf_aace.sharpness_aware` builds the closures from a Trainer; anything else that can run a forward and a backward can
call `two_pass_step` the same way.
"""

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import torch

from .methods import SharpnessAwareMethod
from .perturbation import WeightPerturbation, perturbation_from_gradients_, unscale_gradients_, zeroed_if

T = TypeVar("T")


def backward_gradients(objective: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """The gradient of `objective` by `backward()`, leaving the accumulated `.grad` of `params` as it was.

    `backward()` rather than `torch.autograd.grad`, which reentrant gradient checkpointing refuses: the accumulated
    gradients are set aside (references, no copies) and put back.
    """
    accumulated = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        objective.backward()
        return [p.grad for p in params]
    finally:
        for p, grad in zip(params, accumulated):
            p.grad = grad


def autograd_gradients(objective: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """The gradient of `objective` by `torch.autograd.grad`: no `.grad` is written and no gradient hook fires."""
    return list(torch.autograd.grad(objective, list(params), allow_unused=True))


@dataclass
class StepStatistics:
    """What the first pass and the perturbation were, as 0-dim tensors on the device (no host sync).

    Attributes:
        objective: the first pass's objective, detached.
        grad_norm: ||g|| (ASAM: ||w g||).
        perturbation_norm: ||e||; zero when the perturbation was skipped (so is grad_norm).
        skipped: fp16 only: non-zero when the first pass's gradient overflowed and no perturbation was applied.
    """

    objective: torch.Tensor
    grad_norm: torch.Tensor
    perturbation_norm: torch.Tensor
    skipped: torch.Tensor | None = None


def two_pass_step(
    params: Sequence[torch.Tensor],
    first_pass: Callable[[], torch.Tensor],
    second_pass: Callable[[], T],
    *,
    method: SharpnessAwareMethod,
    rho: float,
    normalize: bool,
    perturbation: WeightPerturbation,
    gradient: Callable[[torch.Tensor, Sequence[torch.Tensor]], list[torch.Tensor | None]] = backward_gradients,
    scaler: torch.amp.GradScaler | None = None,
    first_pass_context: Callable[[], AbstractContextManager] = nullcontext,
    keep_perturbation: bool = False,
) -> tuple[T, StepStatistics]:
    """One sharpness-aware step of `method` on `params`; returns what `second_pass` returned and the statistics.

    Args:
        params: the trainable parameters.
        first_pass: forward at w; returns the scalar objective whose gradient sets the perturbation.
        second_pass: forward and backward at w + e (accumulating into `.grad`); its result is returned.
        method: an entry of `hf_aace.methods.METHODS` with a first pass.
        rho: perturbation radius.
        normalize: divide the perturbation by the gradient norm.
        perturbation: holds the saved copy of the weights between steps.
        gradient: how the first pass's gradient is taken (`backward_gradients` or `autograd_gradients`).
        scaler: fp16 loss scaling: the objective is scaled, its gradient unscaled, and an overflow makes the
            perturbation zero (decided on the device, no host sync).
        first_pass_context: entered around the first pass and its gradient (e.g. DDP's `no_sync`).
        keep_perturbation: keep e (and the parameters it perturbs) in `perturbation.kept` for later steps.
    """
    with first_pass_context():
        objective = first_pass()
        grads = gradient(scaler.scale(objective) if scaler is not None else objective, params)
    used = [i for i, g in enumerate(grads) if g is not None]
    if not used:
        raise ValueError(
            "The first pass's objective does not depend on any trainable parameter, so there is no perturbation to "
            "take. Check that the model's outputs are computed with gradients (not under torch.no_grad or detached)."
        )
    params, grads = [params[i] for i in used], [grads[i] for i in used]
    skipped = None
    if scaler is not None:
        # fp16: an overflowed first pass gives a zero perturbation (the second pass then runs at w), decided on the
        # device: the step reads nothing back to the host.
        skipped = unscale_gradients_(grads, scaler)
        grads = zeroed_if(grads, skipped)
    grad_norm, perturbation_norm = perturbation_from_gradients_(grads, params, method, rho, normalize)
    # e is freed once applied (unless kept): the restore copies from the saved weights, so the second pass holds one
    # extra copy of the trainable weights.
    perturbation.apply_(params, grads, keep=keep_perturbation)
    del grads
    try:
        result = second_pass()
    finally:
        perturbation.restore_(params)
    statistics = StepStatistics(
        objective=objective.detach(), grad_norm=grad_norm, perturbation_norm=perturbation_norm, skipped=skipped
    )
    return result, statistics
