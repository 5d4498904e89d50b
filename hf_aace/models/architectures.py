"""The architecture table: each of hf_aace's models with its classes, named sizes, paper settings and converter.

Auto-class registration, the training script's `--model` flag, the benchmarks, model cards and checkpoint conversion
all read `ARCHITECTURES`; adding an architecture is one entry here.

Example:
```python
>>> from hf_aace.models.architectures import resolve_model
>>> architecture, size = resolve_model("wrn-16-8")
>>> model = architecture.model_class(architecture.config_class(**size, num_labels=10))
>>> architecture.short_name(model.config), architecture.display_name(model.config)
('wrn-16-8', 'WRN-16-8')
```
"""

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

from .pyramidnet import PyramidNetConfig, PyramidNetForImageClassification, PyramidNetModel, convert_pyramidnet
from .wide_resnet import WideResNetConfig, WideResNetForImageClassification, WideResNetModel, convert_wide_resnet

# The paper's optimizer and schedule for training from scratch, the same for both architectures: SGD with momentum,
# weight decay on every parameter, the learning rate multiplied by 0.2 at 30%, 60% and 80% of training, no warmup and
# no gradient clipping. Keys are AACETrainingArguments fields.
PAPER_TRAINING: Mapping[str, Any] = MappingProxyType(
    {
        "learning_rate": 0.1,
        "optim": "sgd",
        "optim_args": "momentum=0.9",
        "weight_decay": 5e-4,
        "weight_decay_all_parameters": True,
        "lr_milestones": [0.3, 0.6, 0.8],
        "lr_gamma": 0.2,
        "warmup_steps": 0,
        "max_grad_norm": 0.0,
    }
)


@dataclass(frozen=True)
class Architecture:
    """One architecture of hf_aace: its classes, how it is named and sized, and how the paper trains it.

    Attributes:
        name: the `--model` long form and the conversion key (`wide_resnet`, `pyramidnet`).
        config_class: the configuration class.
        base_model_class: the model without the classification head.
        model_class: the image classifier (`...ForImageClassification`).
        cli_fields: the config keywords the training script exposes as flags (typed as the config's signature types
            them), each with its help text.
        variants: named sizes (`"wrn-28-10"` -> `{"depth": 28, "widen_factor": 10}`).
        paper_variant: the variant the paper trains.
        paper_batch_size: the paper's global batch size for this architecture.
        paper_options: config keywords the paper fixes beyond the named size (WideResNet: no dropout), so that the
            paper's settings do not depend on the config's defaults.
        training_defaults: the paper's optimizer and schedule for training from scratch (AACETrainingArguments fields).
        converter: the module converting the paper's checkpoints of this architecture (`LAYOUT`, `POOLING_SIZES`,
            `is_reference_layout`, `rename_key`, `config_from_state_dict`).
        short_name_form: the form of short names, for messages (`wrn-DEPTH-WIDEN`); its first word starts them all.
        short_name_pattern: a regular expression matching short names, whose named groups are config keywords: a
            group of digits is an integer, an optional group of letters a flag that is True when present.
        format_short_name: writes a config's short name, which `short_name_pattern` parses back.
        format_display_name: writes a config's name for model cards.
    """

    name: str
    config_class: type[PretrainedConfig]
    base_model_class: type[PreTrainedModel]
    model_class: type[PreTrainedModel]
    cli_fields: Mapping[str, str]
    variants: Mapping[str, Mapping[str, Any]]
    paper_variant: str
    paper_batch_size: int
    paper_options: Mapping[str, Any]
    training_defaults: Mapping[str, Any]
    converter: ModuleType
    short_name_form: str
    short_name_pattern: str
    format_short_name: Callable[[PretrainedConfig], str]
    format_display_name: Callable[[PretrainedConfig], str]

    @property
    def model_type(self) -> str:
        """The `model_type` of the architecture's configs."""
        return self.config_class.model_type

    @property
    def short_name_prefix(self) -> str:
        """What every short name of the architecture starts with, e.g. `wrn-`."""
        return self.short_name_form.split("-", 1)[0] + "-"

    @property
    def paper_config(self) -> dict[str, Any]:
        """The config keywords of the network the paper trains."""
        return {**self.variants[self.paper_variant], **self.paper_options}

    def display_name(self, config: PretrainedConfig) -> str:
        """A readable name of the config's size, e.g. "WRN-28-10" or "PyramidNet-272 (alpha 200, basic)"."""
        return self.format_display_name(config)

    def short_name(self, config: PretrainedConfig) -> str:
        """The config's size as a short name, e.g. "wrn-28-10" or "pyramidnet-272-200", that `resolve_model` reads."""
        return self.format_short_name(config)

    def parse_short_name(self, name: str) -> dict[str, Any] | None:
        """The config keywords a short name of this architecture stands for, or None if it is not one."""
        match = re.fullmatch(self.short_name_pattern, name)
        if match is None:
            return None
        return {
            key: int(value) if value is not None and value.isdigit() else value is not None
            for key, value in match.groupdict().items()
        }


ARCHITECTURES: dict[str, Architecture] = {
    architecture.name: architecture
    for architecture in (
        Architecture(
            name="wide_resnet",
            config_class=WideResNetConfig,
            base_model_class=WideResNetModel,
            model_class=WideResNetForImageClassification,
            cli_fields=MappingProxyType(
                {
                    "depth": "WideResNet: 6n + 4 (n units per stage)",
                    "widen_factor": "WideResNet: width multiplier k",
                    "dropout_rate": "WideResNet: dropout between the two convolutions of a unit",
                }
            ),
            variants=MappingProxyType(
                {
                    "wrn-28-10": {"depth": 28, "widen_factor": 10},  # the paper's
                    "wrn-16-8": {"depth": 16, "widen_factor": 8},
                    "wrn-16-4": {"depth": 16, "widen_factor": 4},
                    "wrn-28-2": {"depth": 28, "widen_factor": 2},
                    "wrn-40-2": {"depth": 40, "widen_factor": 2},
                    "wrn-10-1": {"depth": 10, "widen_factor": 1},  # the smallest: demos and smoke tests
                }
            ),
            paper_variant="wrn-28-10",
            paper_batch_size=256,
            paper_options=MappingProxyType({"dropout_rate": 0.0}),
            training_defaults=PAPER_TRAINING,
            converter=convert_wide_resnet,
            short_name_form="wrn-DEPTH-WIDEN",
            short_name_pattern=r"wrn-(?P<depth>\d+)-(?P<widen_factor>\d+)",
            format_short_name=lambda config: f"wrn-{config.depth}-{config.widen_factor}",
            format_display_name=lambda config: f"WRN-{config.depth}-{config.widen_factor}",
        ),
        Architecture(
            name="pyramidnet",
            config_class=PyramidNetConfig,
            base_model_class=PyramidNetModel,
            model_class=PyramidNetForImageClassification,
            cli_fields=MappingProxyType(
                {
                    "depth": "PyramidNet: 6n + 2 (basic units) or 9n + 2 (bottleneck units)",
                    "alpha": "PyramidNet: total widening over the network",
                    "bottleneck": "PyramidNet: bottleneck units instead of basic ones",
                }
            ),
            variants=MappingProxyType(
                {
                    "pyramidnet-272": {"depth": 272, "alpha": 200, "bottleneck": False},  # the paper's
                    "pyramidnet-110": {"depth": 110, "alpha": 48, "bottleneck": False},  # Han et al.'s basic network
                    # Han et al.'s largest CIFAR network (26.0M parameters with 10 classes).
                    "pyramidnet-272-bottleneck": {"depth": 272, "alpha": 200, "bottleneck": True},
                }
            ),
            paper_variant="pyramidnet-272",
            paper_batch_size=64,
            paper_options=MappingProxyType({}),
            training_defaults=PAPER_TRAINING,
            converter=convert_pyramidnet,
            short_name_form="pyramidnet-DEPTH-ALPHA[-bottleneck]",
            short_name_pattern=r"pyramidnet-(?P<depth>\d+)-(?P<alpha>\d+)(?P<bottleneck>-bottleneck)?",
            format_short_name=lambda config: (
                f"pyramidnet-{config.depth}-{config.alpha}" + ("-bottleneck" if config.bottleneck else "")
            ),
            format_display_name=lambda config: (
                f"PyramidNet-{config.depth} (alpha {config.alpha}, {'bottleneck' if config.bottleneck else 'basic'})"
            ),
        ),
    )
}

OWN_MODEL_TYPES: tuple[str, ...] = tuple(architecture.model_type for architecture in ARCHITECTURES.values())


def _valid_forms() -> str:
    forms = [*ARCHITECTURES, *(architecture.short_name_form for architecture in ARCHITECTURES.values())]
    variants = [variant for architecture in ARCHITECTURES.values() for variant in architecture.variants]
    return f"one of {forms}, a named size {variants}, or the path or Hub id (owner/name) of a saved model"


def resolve_model(name: str) -> tuple[Architecture, dict[str, Any]] | None:
    """Reads a model name: an architecture, optionally with a size.

    Args:
        name: an architecture's name (`wide_resnet`: its default size), a named variant (`wrn-28-10`,
            `pyramidnet-272`), or a short name of any valid size (`wrn-DEPTH-WIDEN`,
            `pyramidnet-DEPTH-ALPHA[-bottleneck]`), in any case.

    Returns:
        The architecture and the config keywords of the size (empty for a bare architecture name), or None when
        `name` is none of these: a path or a Hub id.

    Raises:
        ValueError: if `name` starts like a short name (`wrn-`, `pyramidnet-`) but is no valid size and no existing
            path, e.g. `wrn-27-10` (a WideResNet's depth is 6n + 4).
    """
    key = name.strip().lower()
    if key in ARCHITECTURES:
        return ARCHITECTURES[key], {}
    for architecture in ARCHITECTURES.values():
        if key in architecture.variants:
            return architecture, dict(architecture.variants[key])
        size = architecture.parse_short_name(key)
        if size is not None:
            try:
                architecture.config_class(**size)
            except ValueError as error:
                raise ValueError(
                    f"{name!r} is not a valid {architecture.name} size: {error} Pass {_valid_forms()}."
                ) from error
            return architecture, size
    looks_like_a_short_name = any(key.startswith(a.short_name_prefix) for a in ARCHITECTURES.values())
    if looks_like_a_short_name and not os.path.exists(name):
        raise ValueError(f"Unknown model {name!r}: not a known size nor an existing path. Pass {_valid_forms()}.")
    return None


def architecture_for(config_or_model_type: PretrainedConfig | str) -> Architecture | None:
    """The architecture of a config or `model_type` string, or None for a model that is not hf_aace's own."""
    model_type = (
        config_or_model_type
        if isinstance(config_or_model_type, str)
        else getattr(config_or_model_type, "model_type", None)
    )
    return next((a for a in ARCHITECTURES.values() if a.model_type == model_type), None)


__all__ = ["ARCHITECTURES", "OWN_MODEL_TYPES", "PAPER_TRAINING", "Architecture", "architecture_for", "resolve_model"]
