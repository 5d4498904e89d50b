"""What the converters of the AACE paper's checkpoints share: the dataset's settings and sizes read off tensors.

Each architecture's `convert_*.py` beside its modeling file maps the reference key layout and infers the config; this
module holds the checks they have in common. It imports only the dataset presets, not the data pipeline.
"""

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..data.presets import PRESETS, DatasetPreset, get_preset, preset_names

# The tensors of a BatchNorm layer, which the paper's code and hf_aace name alike.
BN_TENSORS = "weight|bias|running_mean|running_var|num_batches_tracked"


def reference_preset(dataset: str) -> DatasetPreset:
    """The preset of a dataset the paper's code trains on, by name or alias (`fashionmnist` for `fashion_mnist`).

    Raises:
        ValueError: for a name that is no preset, or a preset the paper's code does not train on.
    """
    preset = get_preset(dataset)
    if preset is None or not preset.convertible:
        names = preset_names(convertible=True)
        aliases = [alias for name in names for alias in PRESETS[name].aliases]
        raise ValueError(
            f"Unknown dataset {dataset!r}; pass one of {names} (or an alias: {aliases}), the dataset the checkpoint "
            "was trained on."
        )
    return preset


def reference_tensor(state_dict: Mapping[str, torch.Tensor], key: str, architecture: str, ndim: int) -> torch.Tensor:
    """The tensor `state_dict[key]`, checked to have `ndim` dimensions before a size is read off it.

    Raises:
        ValueError: if the key is missing or the tensor has another number of dimensions.
    """
    if key not in state_dict or state_dict[key].ndim != ndim:
        found = tuple(state_dict[key].shape) if key in state_dict else "missing"
        raise ValueError(
            f"Cannot infer the {architecture} size: {key!r} should be a {ndim}-d tensor, found {found}. Is this a "
            "checkpoint of the paper's reproduction code?"
        )
    return state_dict[key]


def units_per_stage(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """The number of residual units whose keys start with `prefix` followed by the unit's index."""
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(rf"{re.escape(prefix)}(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def dataset_config_kwargs(
    state_dict: Mapping[str, torch.Tensor],
    preset: DatasetPreset,
    *,
    architecture: str,
    stem_key: str,
    classifier_key: str,
    pooling_sizes: Mapping[str, int | None],
) -> dict[str, Any]:
    """The config arguments that the dataset fixes: input channels, the paper's pooling window and the labels.

    Args:
        state_dict: the reference state dict.
        preset: the dataset the checkpoint was trained on.
        architecture: the architecture's name, for messages.
        stem_key: the key of the stem convolution's weight.
        classifier_key: the key of the classifier's weight.
        pooling_sizes: the architecture's `AvgPool2d` window per preset name (None: global pooling).

    Raises:
        ValueError: if the checkpoint's input channels or number of outputs do not fit the dataset, or the
            architecture has no pooling entry for it.
    """
    if preset.name not in pooling_sizes:
        raise ValueError(
            f"The paper's code builds no {architecture} for {preset.name}; pass one of {list(pooling_sizes)}."
        )
    channels = reference_tensor(state_dict, stem_key, architecture, 4).shape[1]
    if channels != preset.num_channels:
        raise ValueError(
            f"The checkpoint's stem convolution takes {channels} input channels but {preset.name} images have "
            f"{preset.num_channels}; pass the dataset the checkpoint was trained on."
        )
    labels = preset.label_names
    num_labels = reference_tensor(state_dict, classifier_key, architecture, 2).shape[0]
    if num_labels != len(labels):
        raise ValueError(
            f"The checkpoint's classifier ({classifier_key!r}) has {num_labels} outputs but {preset.name} has "
            f"{len(labels)} classes; pass the dataset the checkpoint was trained on."
        )
    return {
        "num_channels": preset.num_channels,
        "pooling_size": pooling_sizes[preset.name],
        "id2label": dict(enumerate(labels)),
        "label2id": {label: index for index, label in enumerate(labels)},
    }


__all__ = ["BN_TENSORS", "dataset_config_kwargs", "reference_preset", "reference_tensor", "units_per_stage"]
