"""The Adaptive Adversarial Cross-Entropy (AACE) loss: pure functions of logits and labels.

AACE (Ratchatorn & Tanaka, ICIP 2024) is the loss of SAM's perturbation pass. Its target q puts at most `threshold`
on the true class y and spreads the rest over the wrong classes, and the loss is KL(q || p) with q held constant:

    q_y = min(p_y, threshold),   q_k = a_k / sum_{j != y} a_j  (k != y),   loss = sum_k q_k (log q_k - log p_k)

with a_k = p_k ("adaptive", the paper's default), a_k = 1 ("uniform") or a_k ~ U(0, 1] ("random"). In adaptive mode
with threshold 0 the loss is -log(1 - p_y): its gradient grows as the model becomes confident, where cross-entropy's
vanishes.

Everything is computed from log-probabilities, so the loss is exact and finite wherever its value fits in the float
type, also for masked classes (logit -inf) and logits near the float32 limit; it is +inf, never NaN, where the value
is infinite or overflows (in "uniform" and "random" modes: target mass on a class whose log-probability is -inf). The
direct formula (softmax, then divide by the wrong-class mass) returns NaN once the wrong-class probabilities underflow:
true-class margins beyond about 100 in float32 and about 20 in float16.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AACE_MODES = ("adaptive", "uniform", "random")
REDUCTIONS = ("none", "mean", "sum")

Mode = Literal["adaptive", "uniform", "random"]
Reduction = Literal["none", "mean", "sum"]


def _check_arguments(logits: torch.Tensor, labels: torch.Tensor, threshold: float, mode: str, reduction: str) -> None:
    if logits.dim() != 2:
        raise ValueError(
            f"logits must have shape (batch_size, num_classes), got shape {tuple(logits.shape)}; "
            "flatten extra dimensions first."
        )
    if logits.shape[1] < 2:
        raise ValueError(
            f"AACE needs at least 2 classes (it spreads probability over the wrong ones), got {logits.shape[1]}."
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}.")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
            f"got shape {tuple(labels.shape)}."
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor of class indices, got {labels.dtype}.")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1] - 1}] for {logits.shape[1]} classes, "
            f"got values from {int(labels.min())} to {int(labels.max())}."
        )
    check_options(threshold, mode, reduction)


def check_options(threshold: float, mode: str, reduction: str = "mean") -> None:
    """Raises ValueError for a threshold outside [0, 1], an unknown mode or an unknown reduction."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}.")
    if mode not in AACE_MODES:
        raise ValueError(f"mode must be one of {AACE_MODES}, got {mode!r}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def aace_loss_unchecked(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    threshold: float = 0.0,
    mode: Mode = "adaptive",
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[`aace_loss`] without input validation, for training loops that must not synchronise with the device.

    Validating label ranges reads values back from the device; the training step calls this variant because the
    second pass's cross-entropy rejects bad labels anyway.
    """
    # Half-precision logits are computed in float32; float64 stays float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_p = F.log_softmax(logits, dim=-1)
    # A comparison, not F.one_hot, which reads the labels' range back to the host.
    is_true = labels.long().unsqueeze(-1) == torch.arange(logits.shape[-1], device=logits.device)
    with torch.no_grad():
        if mode == "adaptive":
            # Raw logits rather than log p: log q is shift-invariant, and subtracting two large log-probabilities
            # would lose float32 precision at large margins. A masked wrong class (logit -inf) gets zero target mass;
            # the clamp keeps the normaliser finite when every wrong class is masked: the target is then uniform and
            # the loss +inf, as -log(1 - p_y) is at p_y = 1.
            log_a = logits.clamp(min=torch.finfo(logits.dtype).min)
        elif mode == "uniform":
            log_a = torch.zeros_like(log_p)
        else:
            # 1 - U[0, 1) is U(0, 1], as in the paper's "rand" target.
            uniform = torch.rand(log_p.shape, generator=generator, device=log_p.device, dtype=log_p.dtype)
            log_a = torch.log1p(-uniform)
        log_a = log_a.masked_fill(is_true, float("-inf"))
        # log q_k = log a_k - log sum_{j != y} a_j: no division by an underflowed wrong-class mass.
        log_q = log_a - torch.logsumexp(log_a, dim=-1, keepdim=True)
        if threshold > 0.0:
            log_q_true = log_p.clamp(max=math.log(threshold))
            log_q = torch.where(is_true, log_q_true, log_q)
        q = log_q.exp()
        # 0 * log 0 = 0: a class with zero target mass contributes nothing.
        has_mass = q > 0
        q_log_q = torch.where(has_mass, q * log_q, torch.zeros_like(q))
    # Likewise q log p = 0 where q = 0, also where log p is -inf (a masked class, or x - max overflowing near the
    # float32 limit): 0 * -inf would be NaN.
    loss = (q_log_q - torch.where(has_mass, q * log_p, torch.zeros_like(log_p))).sum(dim=-1)
    return _reduce(loss, reduction)


def aace_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    threshold: float = 0.0,
    mode: Mode = "adaptive",
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adaptive Adversarial Cross-Entropy of logits against integer labels.

    The options after `labels` are keyword-only, in the same order as in [`aace_loss_unchecked`].

    Args:
        logits: unnormalised scores of shape `(batch_size, num_classes)`; float16/bfloat16 are computed in float32.
        labels: true class indices of shape `(batch_size,)`.
        threshold: the most target probability the true class keeps, in [0, 1]. 0 (the paper's setting) moves all
            probability to the wrong classes. Above 0 the target sums to 1 + min(p_y, threshold), as in the paper's
            code: it is not renormalised.
        mode: how the target spreads over the wrong classes: "adaptive" (in proportion to the model's
            probabilities), "uniform" or "random" (weights drawn from U(0, 1] on every call).
        reduction: "mean" over the batch, "sum", or "none" for one value per sample.
        generator: random generator for mode "random".

    Returns:
        The loss (float32, or float64 for float64 logits): a scalar, or a `(batch_size,)` tensor for reduction "none".

    Example:
    ```python
    >>> import torch
    >>> from hf_aace import aace_loss
    >>> logits = torch.tensor([[2.0, 0.0, 0.0]])
    >>> round(aace_loss(logits, torch.tensor([0])).item(), 4)  # -log(1 - p_y)
    1.5464
    ```
    """
    _check_arguments(logits, labels, threshold, mode, reduction)
    return aace_loss_unchecked(
        logits, labels, threshold=threshold, mode=mode, reduction=reduction, generator=generator
    )


class AACELoss(nn.Module):
    """Module form of [`aace_loss`]; see there for the arguments."""

    def __init__(self, *, threshold: float = 0.0, mode: Mode = "adaptive", reduction: Reduction = "mean"):
        super().__init__()
        check_options(threshold, mode, reduction)
        self.threshold = threshold
        self.mode = mode
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return aace_loss(logits, labels, threshold=self.threshold, mode=self.mode, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, mode={self.mode!r}, reduction={self.reduction!r}"
