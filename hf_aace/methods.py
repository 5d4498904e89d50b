"""The table of sharpness-aware methods: one entry per `--sam_method`, read by everything else.

A method says which loss sets the perturbation, in which direction the weights move, whether the step is taken in
weight-scaled coordinates, and its default radius and normalisation. `hf_aace.perturbation` turns a gradient into the
perturbation from these fields; `AACETrainer` chooses the first pass's loss; `AACETrainingArguments` resolves the
defaults; model cards and benchmarks take the display name. Adding a method is one entry here plus, if it needs new
maths, a branch in `perturbation_from_gradients_`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class SharpnessAwareMethod:
    """One sharpness-aware method.

    Attributes:
        name: the `--sam_method` value.
        display_name: how cards and reports name it.
        perturbation_loss: the loss of the first pass: "training" (the Trainer's own loss: the model's loss,
            `compute_loss_func`, label smoothing or a `compute_loss` override) or "aace" (AACE on the class logits).
            None for a method without a first pass.
        sign: +1 climbs the perturbation loss (SAM), -1 descends it (AACE moves probability away from the labels).
        weight_scaled: take the step in coordinates scaled by |w| (ASAM): e = sign * rho * w^2 g / ||w g||.
        default_rho: perturbation radius when `--rho` is not given.
        default_normalize: whether e is divided by the gradient norm when `--normalize_perturbation` is not given.
        own_architecture_defaults: `(rho, normalize)` replacing the two defaults on hf_aace's own architectures (the
            paper's BatchNorm CNNs), where a method's published setting differs from the one that trains any model.
    """

    name: str
    display_name: str
    perturbation_loss: str | None
    sign: float = 1.0
    weight_scaled: bool = False
    default_rho: float | None = None
    default_normalize: bool | None = None
    own_architecture_defaults: tuple[float, bool] | None = None

    @property
    def perturbs(self) -> bool:
        """False for plain training: one pass, no perturbation."""
        return self.perturbation_loss is not None

    @property
    def needs_class_labels(self) -> bool:
        return self.perturbation_loss == "aace"


METHODS: dict[str, SharpnessAwareMethod] = {
    method.name: method
    for method in (
        SharpnessAwareMethod(
            "aace",
            "AACE-SAM",
            perturbation_loss="aace",
            sign=-1.0,
            # The paper's unnormalised e = -0.2 g moves a ViT or BERT far beyond SAM's radius (||e|| / ||w|| 1.5e-2
            # against 2.7e-3) and leaves it untrained; normalised at SAM's radius it trains them as well as SAM does,
            # and the paper's setting stays the default on its own CNNs (bench/RESULTS.md, default radius).
            default_rho=0.05,
            default_normalize=True,
            own_architecture_defaults=(0.2, False),
        ),
        SharpnessAwareMethod("sam", "SAM", perturbation_loss="training", default_rho=0.05, default_normalize=True),
        SharpnessAwareMethod(
            "asam", "ASAM", perturbation_loss="training", weight_scaled=True, default_rho=0.5, default_normalize=True
        ),
        SharpnessAwareMethod("sgd", "plain training (no perturbation)", perturbation_loss=None),
    )
}


def get_method(name: str) -> SharpnessAwareMethod:
    """The table entry of `name`; ValueError naming the choices for anything else."""
    if name not in METHODS:
        raise ValueError(f"--sam_method must be one of {', '.join(METHODS)}; got {name!r}.")
    return METHODS[name]
