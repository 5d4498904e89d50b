"""Arguments of the two-pass step: `SharpnessAwareArguments` for any Trainer, `AACETrainingArguments` for hf_aace's.

`SharpnessAwareArguments` holds the settings of the sharpness-aware step alone, so that `HfArgumentParser` can parse
it beside any arguments class (`Seq2SeqTrainingArguments`, TRL's `SFTConfig`, ...) and `sharpness_aware(trainer)`
subclasses can take it as `sharpness_aware_args=`. `AACETrainingArguments` is `TrainingArguments` plus these fields
plus the paper's recipe settings, for `scripts/train.py` and hyperparameter searches, which set fields on `args`.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import TrainingArguments
from transformers.trainer_utils import unwrap_peft_model

from .capture import CAPTURE_CHOICES
from .losses import AACE_MODES
from .methods import METHODS, SharpnessAwareMethod, get_method
from .models.architectures import OWN_MODEL_TYPES


@dataclass
class SharpnessAwareArguments:
    """The settings of the two-pass sharpness-aware step, for any Trainer.

    Left unset, `rho` and `normalize_perturbation` take the method's default (`hf_aace.methods.METHODS`): sam 0.05
    and asam 0.5, both normalised; aace 0.05 normalised, and on hf_aace's own architectures the paper's 0.2 without
    normalisation. The defaults are resolved when the step reads them (`perturbation_for(model)`), so arguments copied
    with another `sam_method`, or a hyperparameter search over it, take the new method's defaults; explicit values
    always win.

    Example:
    ```python
    >>> from transformers import HfArgumentParser, Seq2SeqTrainingArguments
    >>> from hf_aace import SharpnessAwareArguments
    >>> parser = HfArgumentParser((Seq2SeqTrainingArguments, SharpnessAwareArguments))
    >>> args, sharpness = parser.parse_args_into_dataclasses(["--output_dir", "out", "--sam_method", "sam"])
    >>> sharpness.perturbation_for(model=None)
    (0.05, True)
    ```
    """

    sam_method: str = field(
        default="aace",
        metadata={
            "help": "Perturbation of the first pass: 'aace' (the paper), 'sam', 'asam', or 'sgd' (no perturbation).",
            "choices": list(METHODS),
        },
    )
    rho: float | None = field(
        default=None,
        metadata={
            "help": "Perturbation radius. Default per method: sam 0.05, asam 0.5, aace 0.05 (0.2 on hf_aace's "
            "WideResNet and PyramidNet, the paper's setting)."
        },
    )
    normalize_perturbation: bool | None = field(
        default=None,
        metadata={
            "help": "Divide the perturbation by the gradient norm. Default: True, except for aace on hf_aace's "
            "WideResNet and PyramidNet (the paper's unnormalised setting)."
        },
    )
    aace_threshold: float = field(
        default=0.0, metadata={"help": "Most target probability the true class keeps in the AACE loss, in [0, 1]."}
    )
    aace_mode: str = field(
        default="adaptive",
        metadata={"help": "How the AACE target spreads over the wrong classes.", "choices": list(AACE_MODES)},
    )
    perturbation_interval: int = field(
        default=1,
        metadata={
            "help": "Take the two-pass step on every k-th optimizer step (global steps 0, k, 2k, ...) and the plain "
            "one-pass step between them; 1 perturbs every step."
        },
    )
    perturbation_batch_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Run the first pass on the first ceil(f x rows) rows of each micro-batch (the second pass takes "
            "them all); 1 uses the whole micro-batch."
        },
    )
    perturbation_reuse: bool = field(
        default=False,
        metadata={
            "help": "Between two-pass steps (--perturbation_interval k > 1), take each one-pass step at w + e with "
            "the perturbation e of the last two-pass step instead of at w: sharpness-aware gradients at the cost of "
            "a plain step and one extra copy of the weights."
        },
    )
    step_capture: str = field(
        default="none",
        metadata={
            "help": "'cuda_graph': capture each kind of training step (both passes, the perturbation, every "
            "backward) as a CUDA graph after 2 eager steps and replay it: one launch per step instead of hundreds. "
            "One CUDA process, batches of fixed shapes; read when the trainer is built. 'none' runs every step "
            "eagerly.",
            "choices": list(CAPTURE_CHOICES),
        },
    )
    stop_on_divergence: bool = field(
        default=True,
        metadata={
            "help": "End training with an error when the weights stop being finite, before anything non-finite is "
            "logged or saved. False gives plain Trainer behaviour."
        },
    )

    def __post_init__(self):
        self.validate_sharpness_aware()

    def validate_sharpness_aware(self) -> None:
        """ValueError, naming the fix, for a setting out of range."""
        get_method(self.sam_method)
        if self.rho is not None and not (math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"--rho must be a finite number > 0 (or unset for the method's default); got {self.rho}.")
        if not 0.0 <= self.aace_threshold <= 1.0:
            raise ValueError(f"--aace_threshold must lie in [0, 1]; got {self.aace_threshold}.")
        if self.aace_mode not in AACE_MODES:
            raise ValueError(f"--aace_mode must be one of {', '.join(AACE_MODES)}; got {self.aace_mode!r}.")
        if isinstance(self.perturbation_interval, bool) or not (
            isinstance(self.perturbation_interval, int) and self.perturbation_interval >= 1
        ):
            raise ValueError(
                "--perturbation_interval must be a whole number of optimizer steps >= 1; got "
                f"{self.perturbation_interval!r}."
            )
        if not 0.0 < self.perturbation_batch_fraction <= 1.0:
            raise ValueError(
                f"--perturbation_batch_fraction must lie in (0, 1]; got {self.perturbation_batch_fraction}."
            )

        if self.step_capture not in CAPTURE_CHOICES:
            raise ValueError(f"--step_capture must be one of {', '.join(CAPTURE_CHOICES)}; got {self.step_capture!r}.")
        if self.perturbation_reuse and self.perturbation_interval == 1:
            raise ValueError(
                "--perturbation_reuse reuses a perturbation between two-pass steps, and --perturbation_interval 1 "
                "leaves none between them: set --perturbation_interval to 2 or more, or drop --perturbation_reuse."
            )

    @property
    def method(self) -> SharpnessAwareMethod:
        """The table entry of `sam_method`, read at every use."""
        return get_method(self.sam_method)

    def perturbation_for(self, model: nn.Module | None = None) -> tuple[float | None, bool | None]:
        """`(rho, normalize)` as the step uses them for `model`: the given values, else the method's defaults, which
        for some methods (aace) differ on hf_aace's own architectures; `(None, None)` for "sgd"."""
        method = self.method
        rho, normalize = method.default_rho, method.default_normalize
        config = getattr(unwrap_peft_model(model), "config", None) if model is not None else None
        if method.own_architecture_defaults is not None and getattr(config, "model_type", None) in OWN_MODEL_TYPES:
            rho, normalize = method.own_architecture_defaults
        return (
            self.rho if self.rho is not None else rho,
            self.normalize_perturbation if self.normalize_perturbation is not None else normalize,
        )

    def resolved_sharpness_aware(self, model: nn.Module | None = None) -> dict:
        """The step's settings as used for `model`: `rho` and `normalize_perturbation` with the defaults resolved."""
        values = {name: getattr(self, name) for name in SHARPNESS_AWARE_FIELDS}
        values["rho"], values["normalize_perturbation"] = self.perturbation_for(model)
        return values


SHARPNESS_AWARE_FIELDS = tuple(SharpnessAwareArguments.__dataclass_fields__)


def _switch(value: str) -> bool:
    """A variant's on/off option: "1" or "0"."""
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


# The short options of a method variant (`aace:k=5:f=0.5`), in the order its name lists them: option -> (field, type).
# Scripts and benchmarks that set several steps side by side in one command (scripts/compare.py, bench/step_cost.py,
# bench/step_ops.py) read variants through `parse_method_variant` and name them with `method_variant_name`.
VARIANT_OPTIONS = {
    "k": ("perturbation_interval", int),
    "f": ("perturbation_batch_fraction", float),
    "r": ("perturbation_reuse", _switch),
}
VARIANT_FORM = "METHOD[:k=INTERVAL][:f=FRACTION][:r=1], e.g. aace:k=5, sam:f=0.5 or aace:k=5:r=1"
_VALUE_KINDS = {int: "a whole number", float: "a number", _switch: "0 or 1"}


def parse_method_variant(spec: str) -> tuple[str, dict[str, int | float]]:
    """Reads a method with cheaper-step settings: "aace:k=5:f=0.5" is ("aace", {"perturbation_interval": 5,
    "perturbation_batch_fraction": 0.5}), a plain "sam" is ("sam", {}).

    Args:
        spec: a `sam_method`, optionally followed by `:k=INTERVAL` (`perturbation_interval`), `:f=FRACTION`
            (`perturbation_batch_fraction`) and `:r=1` (`perturbation_reuse`).

    Returns:
        The method's name and the fields its options set.

    Raises:
        ValueError: naming the accepted form, for an unknown method or option, a repeated option, a value of the
            wrong type or out of range, or an option on a method without a first pass ("sgd").
    """
    name, *options = spec.split(":")
    settings: dict[str, int | float] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in VARIANT_OPTIONS or not value:
            raise ValueError(f"{spec!r} is not a method variant; write {VARIANT_FORM}.")
        field_name, cast = VARIANT_OPTIONS[key]
        if field_name in settings:
            raise ValueError(f"{spec!r} gives {key} twice; give each option once: {VARIANT_FORM}.")
        try:
            settings[field_name] = cast(value)
        except ValueError:
            raise ValueError(f"{spec!r}: {key} takes {_VALUE_KINDS[cast]}; write {VARIANT_FORM}.") from None
    if name not in METHODS:
        raise ValueError(f"{spec!r}: the method must be one of {', '.join(METHODS)}; write {VARIANT_FORM}.")
    if settings and not METHODS[name].perturbs:
        raise ValueError(f"{spec!r}: {name} takes no first pass, so k, f and r do not apply; write {name} alone.")
    try:
        SharpnessAwareArguments(sam_method=name, **settings)
    except ValueError as error:
        raise ValueError(
            f"{spec!r}: {error} (k is --perturbation_interval, f --perturbation_batch_fraction, r "
            "--perturbation_reuse)"
        ) from None
    return name, settings


def method_variant_name(sam_method: str, settings: Mapping[str, object]) -> str:
    """The one name of a variant: `sam_method`, then each `VARIANT_OPTIONS` field that `settings` (a run's training
    arguments, or `parse_method_variant`'s result) sets away from its default, so "aace:f=0.5:k=5" and
    "aace:k=5:f=0.5" name the same variant and "aace:k=1" is "aace"."""
    name = sam_method
    for key, (field_name, _) in VARIANT_OPTIONS.items():
        value = settings.get(field_name)
        if value is not None and value != SharpnessAwareArguments.__dataclass_fields__[field_name].default:
            name += f":{key}={int(value) if isinstance(value, bool) else value}"
    return name


@dataclass
class AACETrainingArguments(SharpnessAwareArguments, TrainingArguments):
    """[`~transformers.TrainingArguments`] with the [`SharpnessAwareArguments`] fields and the paper's recipe settings.

    The recipe settings are ones the Trainer itself carries out (`weight_decay_all_parameters` for the optimizer's
    parameter groups, `lr_milestones`/`lr_gamma` for the scheduler, `channels_last` for the memory format): they
    change how the Trainer builds its optimizer, scheduler and batches, as the Trainer's own arguments do, so they sit
    beside them and work as CLI flags. `ImageBatchTrainer` reads `channels_last` where the arguments have it.

    Example:
    ```python
    >>> from hf_aace import AACETrainingArguments
    >>> args = AACETrainingArguments(output_dir="out", sam_method="sam")
    >>> args.perturbation_for(model=None)
    (0.05, True)
    ```
    """

    weight_decay_all_parameters: bool = field(
        default=False,
        metadata={"help": "Apply weight decay to every parameter (the paper), not only to non-bias, non-norm ones."},
    )
    lr_milestones: list[float] | None = field(
        default=None,
        metadata={
            "help": "Fractions of training (e.g. 0.3 0.6 0.8) at which the learning rate is multiplied by lr_gamma. "
            "Replaces lr_scheduler_type when set.",
            "nargs": "+",
        },
    )
    lr_gamma: float = field(default=0.2, metadata={"help": "Learning-rate factor applied at each of lr_milestones."})
    channels_last: bool = field(
        default=False,
        metadata={
            "help": "Keep the model's weights and the image batches in channels_last memory format (faster "
            "convolutions with oneDNN on CPUs and with tensor cores on GPUs; bench/ measures it)."
        },
    )

    def __post_init__(self):
        self.validate_sharpness_aware()
        if self.lr_milestones is not None:
            milestones = list(self.lr_milestones)
            if not milestones or any(not 0 < m < 1 for m in milestones) or milestones != sorted(milestones):
                raise ValueError(
                    f"--lr_milestones must be increasing fractions of training in (0, 1), e.g. 0.3 0.6 0.8; "
                    f"got {self.lr_milestones}."
                )
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"--lr_gamma must lie in (0, 1]; got {self.lr_gamma}.")
        TrainingArguments.__post_init__(self)
        if self.fp16 and (self.use_cpu or not torch.accelerator.is_available()):
            # accelerate would run plain fp32 without a word while the saved arguments say fp16.
            raise ValueError(
                "--fp16 needs a GPU (fp16 loss scaling is a CUDA feature); on a CPU drop --fp16 or use --bf16."
            )

    def __getstate__(self) -> dict:
        # Pickles (the Trainer saves one as training_args.bin in every checkpoint and pushes it) never carry a token:
        # it authenticates uploads from this process only.
        state = dict(self.__dict__)
        for key in state:
            if key.endswith("_token"):
                state[key] = None
        return state
