"""Where the class logits and labels are, and how AACE lines them up the way the model's own loss does.

AACE needs class labels. The shapes and dtypes of the first pass's logits and labels tell the task apart, with the same
rules transformers' models use to choose their loss:

    single_label   logits (B, C), integer labels (B,)                 sequence or image classification
    token          logits (..., C), integer labels (...) with -100    token classification, masked LM, seq2seq
    causal         logits (B, T, V), integer labels (B, T)            causal LM: position t predicts label t + 1
    multi_label    logits (B, C), multi-hot labels (B, C)             each label a two-class problem

Float labels against one logit (regression), or anything else without class labels, has no AACE.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .losses import aace_loss_unchecked

IGNORE_INDEX = -100
TASKS = ("single_label", "token", "causal", "multi_label")


def output_logits(outputs: Any, has_loss: bool) -> torch.Tensor:
    """The logits in a model's outputs, found where the Trainer's `prediction_step` finds them.

    Args:
        outputs: a `ModelOutput`, a dict, a tuple or a tensor.
        has_loss: whether the model was given labels, so that a tuple output starts with the loss.
    """
    if isinstance(outputs, Mapping):
        values = [outputs["logits"]] if "logits" in outputs else [v for k, v in outputs.items() if k != "loss"]
    elif isinstance(outputs, (tuple, list)):
        values = list(outputs[1:] if has_loss else outputs)
    else:
        values = [outputs]
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    raise ValueError(
        f"Found no logits in the model's outputs ({type(outputs).__name__}): AACE needs the class scores. Return them "
        "as `logits` in a ModelOutput or dict, or as the first element of a tuple after the loss, or use "
        "--sam_method sam/asam, which work with any loss."
    )


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model's loss shifts its labels by one position, as transformers' causal language models do.

    Not only the Trainer's `loss_type` test: GPT-2's `loss_type` is None, yet its loss shifts.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    if type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return True
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss


def detect_task(
    logits: torch.Tensor, labels: torch.Tensor | None, *, causal: bool, problem_type: str | None = None
) -> str:
    """The task of a batch, one of `TASKS`; ValueError when it has no class labels.

    Args:
        logits: the first pass's logits.
        labels: the batch's labels.
        causal: the model is a causal language model (its loss shifts the labels by one position).
        problem_type: the model config's `problem_type`, when it has one.
    """
    refusal = (
        "AACE (--sam_method aace) needs class labels; {reason}. --sam_method sam or asam work with any loss the "
        "Trainer trains (regression included)."
    )
    if labels is None:
        raise ValueError(refusal.format(reason="the training batch has no labels (see TrainingArguments.label_names)"))
    if not isinstance(labels, torch.Tensor):
        raise ValueError(refusal.format(reason=f"the labels are a {type(labels).__name__}, not a tensor"))
    shapes = f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} ({labels.dtype})"
    if logits.dim() < 2 or logits.shape[-1] < 2:
        raise ValueError(refusal.format(reason=f"the model gives fewer than two class scores ({shapes})"))
    if problem_type == "regression":
        raise ValueError(refusal.format(reason="the model's problem_type is regression"))
    if labels.is_floating_point() or problem_type == "multi_label_classification":
        if labels.shape == logits.shape and logits.dim() == 2:
            return "multi_label"
        raise ValueError(
            refusal.format(reason=f"these float labels are not class indices or multi-hot rows ({shapes})")
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(refusal.format(reason=f"the labels do not match the logits' class dimension ({shapes})"))
    if causal and logits.dim() == 3:
        return "causal"
    return "single_label" if logits.dim() == 2 else "token"


def check_multi_hot(labels: torch.Tensor) -> None:
    """ValueError unless every label is 0 or 1 (reads the labels back from the device: call it once)."""
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(
            "AACE on multi-label classification needs multi-hot labels of 0s and 1s (each label is a two-class "
            "problem); got other values. Use --sam_method sam or asam for soft targets."
        )


def aligned_aace_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    task: str,
    *,
    threshold: float = 0.0,
    mode: str = "adaptive",
    shift_labels: torch.Tensor | None = None,
    num_items: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """AACE over the items of `task`, aligned and normalised as the model's own cross-entropy.

    Args:
        logits: the model's logits.
        labels: the batch's labels.
        task: one of `TASKS` (see `detect_task`).
        threshold: AACE threshold.
        mode: AACE mode.
        shift_labels: causal LMs: labels already shifted by the collator, used as they are.
        num_items: the number of label items the loss is normalised by (transformers' causal-LM losses divide by
            the items of the whole accumulated batch); None for the mean over this batch's items.

    Returns:
        A scalar: the sum of AACE over the items not labelled -100, divided by `num_items` or by their count. For
        multi-label tasks, the mean over labels and samples.
    """
    if task == "multi_label":
        # Label k as a two-class problem: softmax over (0, z_k) gives sigmoid(z_k) to "on".
        pairs = torch.stack([torch.zeros_like(logits), logits], dim=-1).reshape(-1, 2)
        return aace_loss_unchecked(pairs, labels.reshape(-1).long(), threshold=threshold, mode=mode)
    if task == "causal":
        if shift_labels is not None:
            labels = shift_labels
        else:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    # Masking instead of indexing keeps shapes static (no host sync, no recompiles under torch.compile).
    per_item = aace_loss_unchecked(
        logits, labels.masked_fill(~valid, 0), threshold=threshold, mode=mode, reduction="none"
    )
    total = torch.where(valid, per_item, torch.zeros_like(per_item)).sum()
    if num_items is None:
        num_items = valid.sum().clamp(min=1)
    return total / num_items


def single_label_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy over the samples not labelled -100, as a 0-dim tensor (no host sync)."""
    valid = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & valid
    return correct.sum() / valid.sum().clamp(min=1)


def count_targets(batches: list[Mapping[str, Any]], label_name: str, causal: bool) -> torch.Tensor | None:
    """Items not labelled -100 in the batches, after the causal shift when `causal`; None without tensor labels."""
    counts = []
    for batch in batches:
        if "shift_labels" in batch:
            labels = batch["shift_labels"]
        else:
            labels = batch.get(label_name)
            if isinstance(labels, torch.Tensor) and causal:
                labels = labels[..., 1:]
        if not isinstance(labels, torch.Tensor):
            return None
        counts.append(labels.ne(IGNORE_INDEX).sum())
    return torch.stack(counts).sum() if counts else None
