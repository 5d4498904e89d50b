"""Conversion of the AACE paper's PyramidNet checkpoints: key map, layout recognition and config inference.

The paper's reproduction code (T-Ratchatorn/AACE) names its PyramidNet's modules `conv1`, `bn1`, `layer1.0.bn1`, ...,
`bn_final` and `fc`. `hf_aace.convert.convert_reference_checkpoint` finds this module through the architecture table
and loads the renamed tensors strictly.
"""

import re
from collections.abc import Mapping

import torch

from ...data.presets import DatasetPreset
from ..conversion_utils import BN_TENSORS, dataset_config_kwargs, reference_tensor, units_per_stage
from .configuration_pyramidnet import PyramidNetConfig

# How the error for an unknown layout describes this one.
LAYOUT = "PyramidNet ('conv1.weight', 'layer1.0.bn1.weight', ...)"

# The paper's fixed AvgPool2d window per dataset preset (None: global pooling).
POOLING_SIZES: dict[str, int | None] = {"cifar10": 8, "cifar100": 8, "fashion_mnist": None, "food101": None}

_UNIT = re.compile(rf"layer([123])\.(\d+)\.(bn[1-4]|conv[1-3])\.({BN_TENSORS})")
_TOP = {
    "conv1": "pyramidnet.embedder.conv",
    "bn1": "pyramidnet.embedder.norm",
    "bn_final": "pyramidnet.norm",
    "fc": "classifier",
}


def is_reference_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether `state_dict` has the keys of the paper's PyramidNet."""
    return "conv1.weight" in state_dict and "layer1.0.bn1.weight" in state_dict


def rename_key(reference_key: str) -> str | None:
    """Maps a key of the paper's PyramidNet state dict to hf_aace's, or returns None for a key it does not know."""
    unit = _UNIT.fullmatch(reference_key)
    if unit:
        stage, index, module, tensor = unit.groups()
        # bn1..bn4 -> norm1..norm4; conv1..conv3 keep their names.
        module = module.replace("bn", "norm")
        return f"pyramidnet.encoder.stages.{int(stage) - 1}.layers.{index}.{module}.{tensor}"
    module, _, tensor = reference_key.rpartition(".")
    return f"{_TOP[module]}.{tensor}" if module in _TOP else None


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], preset: DatasetPreset) -> PyramidNetConfig:
    """Builds the [`PyramidNetConfig`] of a reference PyramidNet state dict trained on the dataset `preset`.

    Raises:
        ValueError: if the tensors do not describe a PyramidNet, or do not fit the dataset.
    """
    dataset_kwargs = dataset_config_kwargs(
        state_dict,
        preset,
        architecture="pyramidnet",
        stem_key="conv1.weight",
        classifier_key="fc.weight",
        pooling_sizes=POOLING_SIZES,
    )
    units = units_per_stage(state_dict, "layer1.")
    bottleneck = "layer1.0.conv3.weight" in state_dict
    # Widths ramp from 16 by alpha / (3n) per unit, so the last unit's 3x3 convolution is 16 + alpha wide.
    last_width = reference_tensor(state_dict, f"layer3.{units - 1}.conv2.weight", "pyramidnet", 4).shape[0]
    return PyramidNetConfig(
        depth=(9 if bottleneck else 6) * units + 2, alpha=last_width - 16, bottleneck=bottleneck, **dataset_kwargs
    )


__all__ = ["LAYOUT", "POOLING_SIZES", "config_from_state_dict", "is_reference_layout", "rename_key"]
