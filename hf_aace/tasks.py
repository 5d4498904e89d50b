"""Which (logits, label) pairs AACE is taken on: the pairs the model's own loss uses, one table of rules.

AACE needs class labels. Every task below reduces to pairs of class scores (N, C) and class labels (N,), -100 ignored,
so that the cross-entropy mean over the pairs is the model's own loss; AACE is then the mean over the same pairs:

    single_label   logits (B, C), labels (B,)              sequence and image classification
    multi_label    logits (B, C), multi-hot labels (B, C)  each label a two-class problem: pairs (0, z_k), so the
                                                           cross-entropy of a pair is the BCE-with-logits of z_k
    causal         logits (B, T, V), labels (B, T)         the model's loss shifts: position t predicts label t + 1
                                                           (or the collator's `shift_labels`, used as they are)
    token          logits (..., C), labels (...)           token classification, masked LM, seq2seq, and the
                                                           causal-LM heads whose loss does not shift

The rule is chosen from what the model declares (its class, `loss_type`, `config.problem_type`), never from tensor
shapes alone, and checked once: on the first batch where the model returns a loss, the cross-entropy of the chosen
pairs must equal it, or training stops with an error that names the model and the ways out. Models whose loss is not
a cross-entropy over class labels (CTC, regression) are refused. A new rule is one entry in `RULES`.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_CTC_MAPPING_NAMES

from .losses import aace_loss_unchecked
from .sharding import unsharded_class

IGNORE_INDEX = -100

# Causal-LM heads of transformers whose forward computes CrossEntropyLoss(logits, labels) without the next-token shift
# (their docstrings: "The labels are **not shifted** inside the model"), although their class name gives them the
# causal-LM `loss_type`.
UNSHIFTED_CAUSAL_LMS = frozenset(
    {
        "BartForCausalLM",
        "BigBirdPegasusForCausalLM",
        "BlenderbotForCausalLM",
        "BlenderbotSmallForCausalLM",
        "CpmAntForCausalLM",
        "MBartForCausalLM",
        "MarianForCausalLM",
        "MvpForCausalLM",
        "PLBartForCausalLM",
        "PegasusForCausalLM",
        "TrOCRForCausalLM",
        "WhisperForCausalLM",
        "XLNetLMHeadModel",
    }
)

WAYS_OUT = (
    "Use --sam_method sam or asam, which perturb with the model's own loss whatever it is, or give the trainer "
    "aace_pairs_func=f, where f(outputs, labels, inputs) returns the class scores (..., C) and the integer labels "
    "(...) AACE should be taken on (-100 ignored)."
)


class AACETaskError(ValueError):
    """AACE cannot be taken on this model or batch; the message names the model and the ways out."""


@dataclass(frozen=True)
class ModelFacts:
    """What a model declares about its loss, read once from the model.

    Attributes:
        class_name: the model's class name (PEFT and DDP wrappers removed).
        problem_type: `config.problem_type`, when the config has one.
        shifts: its loss shifts the labels by one position (transformers' causal language models).
        ctc: its loss is a CTC loss (no per-position class labels).
    """

    class_name: str
    problem_type: str | None = None
    shifts: bool = False
    ctc: bool = False

    @classmethod
    def of(cls, model: nn.Module, label_smoothing: bool = False) -> "ModelFacts":
        """The facts of `model`; with `label_smoothing` the training loss is the Trainer's label smoother's, which
        shifts the labels of every model in transformers' causal-LM mapping."""
        name = unsharded_class(model).__name__
        config = getattr(model, "config", None)
        causal_name = name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        if getattr(config, "is_encoder_decoder", False):
            shifts = False
        elif label_smoothing:
            shifts = causal_name
        else:
            # GPT-2's loss_type is None, yet its loss shifts: the class name is in the causal-LM mapping.
            declared = causal_name or LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
            shifts = declared and name not in UNSHIFTED_CAUSAL_LMS
        ctc = name in MODEL_FOR_CTC_MAPPING_NAMES.values() or getattr(model, "loss_type", None) == "ForCTC"
        return cls(name, getattr(config, "problem_type", None), shifts, ctc)


Pairs = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TaskRule:
    """One way of lining up a model's logits with its labels.

    Attributes:
        name: the task's name, as logged and shown in errors.
        applies: whether the rule is the model's, from its facts and the first batch's logits and labels.
        pairs: the class scores (N, C) and labels (N,) (-100 ignored) of a batch: `pairs(logits, labels, inputs)`.
        refusal: a reason AACE cannot serve the task (the rule then raises instead of giving pairs).
    """

    name: str
    applies: Callable[[ModelFacts, torch.Tensor, torch.Tensor], bool]
    pairs: Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any]], Pairs] | None = None
    refusal: str | None = None


def _flat(logits: torch.Tensor, labels: torch.Tensor) -> Pairs:
    if labels.shape != logits.shape[:-1]:
        raise AACETaskError(
            f"AACE: the labels {tuple(labels.shape)} do not match the logits {tuple(logits.shape)} of this batch."
        )
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def _multi_label_pairs(logits: torch.Tensor, labels: torch.Tensor, inputs: Mapping[str, Any]) -> Pairs:
    # Label k as a two-class problem: softmax over (0, z_k) gives sigmoid(z_k) to "on".
    if labels.shape != logits.shape:
        raise AACETaskError(f"AACE: multi-hot labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}.")
    return torch.stack([torch.zeros_like(logits), logits], dim=-1).reshape(-1, 2), labels.reshape(-1).long()


def _causal_pairs(logits: torch.Tensor, labels: torch.Tensor, inputs: Mapping[str, Any]) -> Pairs:
    shift_labels = inputs.get("shift_labels")
    if isinstance(shift_labels, torch.Tensor):  # padding-free collators shift the targets themselves
        return _flat(logits, shift_labels)
    return _flat(logits[..., :-1, :], labels[..., 1:])


def _is_multi_label(facts: ModelFacts, logits: torch.Tensor, labels: torch.Tensor) -> bool:
    return facts.problem_type == "multi_label_classification" or (
        labels.is_floating_point() and labels.shape == logits.shape and logits.dim() == 2
    )


RULES: tuple[TaskRule, ...] = (
    TaskRule(
        "ctc",
        lambda facts, logits, labels: facts.ctc,
        refusal="its loss is CTC over frame sequences, which has no per-frame class labels",
    ),
    TaskRule(
        "regression",
        lambda facts, logits, labels: (
            facts.problem_type == "regression" or (labels.is_floating_point() and logits.shape[-1] == 1)
        ),
        refusal="it is a regression model (no class labels)",
    ),
    TaskRule("multi_label", _is_multi_label, _multi_label_pairs),
    TaskRule(
        "soft_labels",
        lambda facts, logits, labels: labels.is_floating_point(),
        refusal="its labels are floats that are neither class indices nor multi-hot rows",
    ),
    TaskRule("causal", lambda facts, logits, labels: facts.shifts and logits.dim() == 3, _causal_pairs),
    TaskRule(
        "single_label",
        lambda facts, logits, labels: logits.dim() == 2 and labels.dim() == 1,
        lambda logits, labels, inputs: _flat(logits, labels),
    ),
    TaskRule(
        "token",
        lambda facts, logits, labels: logits.dim() >= 3 and labels.shape == logits.shape[:-1],
        lambda logits, labels, inputs: _flat(logits, labels),
    ),
)


def select_rule(facts: ModelFacts, logits: torch.Tensor, labels: Any) -> TaskRule:
    """The first rule of `RULES` that applies; AACETaskError, naming the model and the ways out, when none does."""

    def refuse(reason: str) -> AACETaskError:
        return AACETaskError(f"AACE (--sam_method aace) cannot train {facts.class_name}: {reason}. {WAYS_OUT}")

    if not isinstance(labels, torch.Tensor):
        raise refuse(f"the labels are a {type(labels).__name__}, not a tensor")
    if logits.dim() < 2 or logits.shape[-1] < 2:
        raise refuse(f"the model gives fewer than two class scores (logits {tuple(logits.shape)})")
    for rule in RULES:
        if rule.applies(facts, logits, labels):
            if rule.refusal is not None:
                raise refuse(rule.refusal)
            return rule
    raise refuse(
        f"no rule lines up its logits {tuple(logits.shape)} with its labels {tuple(labels.shape)} ({labels.dtype})"
    )


def output_logits(outputs: Any, has_loss: bool, class_name: str) -> torch.Tensor:
    """The class scores in a model's outputs: `logits` of a ModelOutput or dict, or a tuple's first tensor after the
    loss (where the Trainer's `prediction_step` finds them); AACETaskError otherwise.

    Args:
        outputs: a `ModelOutput`, a dict, a tuple or a tensor.
        has_loss: whether the model was given labels, so that a tuple output starts with the loss.
        class_name: the model's class, for the error.
    """
    if isinstance(outputs, Mapping):
        value = outputs.get("logits")
        found = f"a {type(outputs).__name__} with keys {sorted(outputs)} and no 'logits'"
    elif isinstance(outputs, (tuple, list)):
        rest = outputs[1:] if has_loss else outputs
        value = rest[0] if rest else None
        found = f"a tuple of {len(outputs)}"
    else:
        value, found = outputs, type(outputs).__name__
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value
    raise AACETaskError(
        f"AACE (--sam_method aace) found no class scores in the outputs of {class_name} ({found}): return them as "
        f"`logits`. {WAYS_OUT}"
    )


def check_pairs(
    facts: ModelFacts, rule: str, pairs: Pairs, model_loss: torch.Tensor, num_items: Any, items_scale: int = 1
) -> None:
    """AACETaskError unless the cross-entropy of `pairs` is the model's own loss (read back from the device once).

    The model's loss is the mean over the batch's items, or their sum divided by `num_items` when the Trainer gave the
    model `num_items_in_batch`, times `items_scale` where the Trainer scaled it in place (`num_items` then counts
    every process's items); any of these matches.
    """
    logits, labels = pairs
    per_item = F.cross_entropy(logits.detach().float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    total = per_item.sum()
    candidates = [total / labels.ne(IGNORE_INDEX).sum().clamp(min=1)]
    if isinstance(num_items, torch.Tensor | int | float):
        candidates.append(total / torch.as_tensor(num_items, device=total.device))
        if items_scale != 1:
            candidates.append(candidates[-1] * items_scale)
    loss = model_loss.detach().float().mean()
    matched = torch.stack([torch.isclose(c, loss, rtol=1e-3, atol=1e-5) for c in candidates]).any()
    if not bool(matched):
        raise AACETaskError(
            f"AACE (--sam_method aace): the {rule!r} pairs of {facts.class_name} give a cross-entropy of "
            f"{candidates[0].item():.6g}, but the model's own loss is {loss.item():.6g}, so the model's loss is not a "
            f"cross-entropy on these pairs (a custom loss, or labels the model shifts differently). {WAYS_OUT}"
        )


def check_multi_hot(labels: torch.Tensor) -> None:
    """AACETaskError unless every label is 0 or 1 (reads the labels back from the device: call it once)."""
    if not bool(((labels == 0) | (labels == 1) | (labels == IGNORE_INDEX)).all()):
        raise AACETaskError(
            "AACE on multi-label classification needs multi-hot labels of 0s and 1s (each label is a two-class "
            "problem); got other values. Use --sam_method sam or asam for soft targets."
        )


def aace_on_pairs(pairs: Pairs, *, threshold: float = 0.0, mode: str = "adaptive") -> torch.Tensor:
    """AACE over the pairs not labelled -100, as a mean over them (a micro-batch mean, whatever the accumulation)."""
    logits, labels = pairs
    valid = labels != IGNORE_INDEX
    # Masking instead of indexing keeps shapes static (no host sync, no recompiles under torch.compile).
    per_item = aace_loss_unchecked(
        logits, labels.masked_fill(~valid, 0), threshold=threshold, mode=mode, reduction="none"
    )
    total = torch.where(valid, per_item, torch.zeros_like(per_item)).sum()
    return total / valid.sum().clamp(min=1)


def single_label_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy over the samples not labelled -100, as a 0-dim tensor (no host sync)."""
    valid = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & valid
    return correct.sum() / valid.sum().clamp(min=1)
