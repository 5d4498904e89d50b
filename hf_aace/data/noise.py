"""Symmetric label noise for the training split, as in the label-noise experiments of the SAM literature."""

from __future__ import annotations

import math
from numbers import Real

import torch


def symmetric_label_noise(
    labels: torch.Tensor, num_classes: int, p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces a fraction `p` of the labels with a different class drawn uniformly.

    Exactly `round(p * len(labels))` labels are corrupted, so the noise rate is `p` up to rounding rather than a
    random number around it. A seeded permutation picks which ones; each picked label becomes one of the other
    `num_classes - 1` classes with equal probability, so a corrupted label never equals its original. The same
    labels, `p` and `seed` give the same result on any machine (the draws use a CPU generator) for a given torch
    version.

    Args:
        labels: `(N,)` integer tensor of class indices in `[0, num_classes)`. It is not modified.
        num_classes: number of classes.
        p: fraction of labels to corrupt, in [0, 1).
        seed: seed of the draws (which labels, and their new classes).

    Returns:
        `(noisy_labels, corrupted)`: a new tensor of the labels' dtype with the corrupted labels, and the sorted int64
        indices of the corrupted labels (`len(corrupted) / N` is the actual noise rate).

    Example:
    ```python
    >>> import torch
    >>> from hf_aace.data import symmetric_label_noise
    >>> noisy, corrupted = symmetric_label_noise(torch.zeros(10, dtype=torch.int64), num_classes=3, p=0.2, seed=0)
    >>> len(corrupted), bool((noisy[corrupted] != 0).all()), int((noisy != 0).sum())
    (2, True, 2)
    ```
    """
    if not isinstance(p, Real) or not math.isfinite(p) or not 0 <= p < 1:
        raise ValueError(f"The label noise rate must be a finite number in [0, 1) (e.g. 0.2 for 20%), got {p!r}.")
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D integer tensor of class indices, got {labels.dtype} of shape {tuple(labels.shape)}."
        )
    if num_classes < 2:
        raise ValueError(f"Label noise needs at least 2 classes to swap between, got num_classes={num_classes}.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, got values from "
            f"{int(labels.min())} to {int(labels.max())}."
        )
    generator = torch.Generator().manual_seed(seed)
    count = round(p * labels.numel())
    corrupted = torch.randperm(labels.numel(), generator=generator)[:count].sort().values
    # Adding 1..num_classes-1 modulo num_classes reaches every other class once: uniform over the wrong classes.
    shift = torch.randint(1, num_classes, (count,), generator=generator)
    noisy = labels.clone()
    noisy[corrupted] = (labels[corrupted] + shift.to(labels.device, labels.dtype)) % num_classes
    return noisy, corrupted
