"""AACETrainingArguments: the Trainer's arguments plus the sharpness-aware ones, all usable as CLI flags."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import AACE_MODES

SAM_METHODS = ("aace", "sam", "asam", "sgd")
DEFAULT_RHO = {"aace": 0.2, "sam": 0.05, "asam": 0.5}
DEFAULT_NORMALIZE = {"aace": False, "sam": True, "asam": True}


@dataclass
class AACETrainingArguments(TrainingArguments):
    """[`~transformers.TrainingArguments`] with the settings of the two-pass sharpness-aware step.

    Left unset, `rho` and `normalize_perturbation` take the method's default: aace 0.2 without normalisation (the
    paper's setting), sam 0.05 and asam 0.5, both normalised.

    Example:
    ```python
    >>> from hf_aace import AACETrainingArguments
    >>> args = AACETrainingArguments(output_dir="out", sam_method="sam")
    >>> args.rho, args.normalize_perturbation
    (0.05, True)
    ```
    """

    sam_method: str = field(
        default="aace",
        metadata={
            "help": "Perturbation of the first pass: 'aace' (the paper), 'sam', 'asam', or 'sgd' (no perturbation).",
            "choices": list(SAM_METHODS),
        },
    )
    rho: float | None = field(
        default=None,
        metadata={"help": "Perturbation radius. Default per method: aace 0.2, sam 0.05, asam 0.5."},
    )
    normalize_perturbation: bool | None = field(
        default=None,
        metadata={"help": "Divide the perturbation by the gradient norm. Default: False for aace, True for sam/asam."},
    )
    aace_threshold: float = field(
        default=0.0, metadata={"help": "Most target probability the true class keeps in the AACE loss, in [0, 1]."}
    )
    aace_mode: str = field(
        default="adaptive",
        metadata={"help": "How the AACE target spreads over the wrong classes.", "choices": list(AACE_MODES)},
    )
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
        if self.sam_method not in SAM_METHODS:
            raise ValueError(f"--sam_method must be one of {', '.join(SAM_METHODS)}; got {self.sam_method!r}.")
        if self.sam_method != "sgd":
            if self.rho is None:
                self.rho = DEFAULT_RHO[self.sam_method]
            if not self.rho > 0:
                raise ValueError(f"--rho must be > 0 for --sam_method {self.sam_method}; got {self.rho}.")
            if self.normalize_perturbation is None:
                self.normalize_perturbation = DEFAULT_NORMALIZE[self.sam_method]
        if not 0.0 <= self.aace_threshold <= 1.0:
            raise ValueError(f"--aace_threshold must lie in [0, 1]; got {self.aace_threshold}.")
        if self.aace_mode not in AACE_MODES:
            raise ValueError(f"--aace_mode must be one of {', '.join(AACE_MODES)}; got {self.aace_mode!r}.")
        if self.lr_milestones is not None:
            milestones = list(self.lr_milestones)
            if not milestones or any(not 0 < m < 1 for m in milestones) or milestones != sorted(milestones):
                raise ValueError(
                    f"--lr_milestones must be increasing fractions of training in (0, 1), e.g. 0.3 0.6 0.8; "
                    f"got {self.lr_milestones}."
                )
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"--lr_gamma must lie in (0, 1]; got {self.lr_gamma}.")
        super().__post_init__()
