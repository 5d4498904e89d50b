"""Conversion of the AACE paper's WideResNet checkpoints: key map, layout recognition and config inference.

The paper's reproduction code (T-Ratchatorn/AACE) builds its WideResNet as an `nn.Sequential` named `f`, with keys
such as `f.1_block.block.0.norm_act.0_normalization.weight`. `hf_aace.convert.convert_reference_checkpoint` finds
this module through the architecture table and loads the renamed tensors strictly.
"""

import re
from collections.abc import Mapping

import torch

from ...data.presets import DatasetPreset
from ..conversion_utils import BN_TENSORS, dataset_config_kwargs, reference_tensor, units_per_stage
from .configuration_wide_resnet import WideResNetConfig

# How the error for an unknown layout describes this one.
LAYOUT = "WideResNet ('f.0_convolution.weight', ...)"

# The paper's fixed AvgPool2d window per dataset preset (None: global pooling). On Fashion-MNIST it pools a 4x4 window
# of the 7x7 map: its top-left corner.
POOLING_SIZES: dict[str, int | None] = {"cifar10": 8, "cifar100": 8, "fashion_mnist": 4, "food101": None}

# Within one unit: the reference's module path -> the WideResNetLayer attribute. The downsampling unit and the basic
# units use different Sequential indices, so one table serves both.
_UNIT_MODULES = {
    "norm_act.0_normalization": "norm1",  # downsampling unit: BN-ReLU shared by both branches
    "block.0_convolution": "conv1",
    "block.1_normalization": "norm2",
    "block.4_convolution": "conv2",
    "downsample": "shortcut",
    "block.0_normalization": "norm1",  # basic unit
    "block.2_convolution": "conv1",
    "block.3_normalization": "norm2",
    "block.6_convolution": "conv2",
}
_UNIT = re.compile(rf"f\.([123])_block\.block\.(\d+)\.(.+)\.({BN_TENSORS})")
_TOP = {
    "f.0_convolution": "wide_resnet.embedder",
    "f.4_normalization": "wide_resnet.norm",
    "f.8_classification": "classifier",
}


def is_reference_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether `state_dict` has the keys of the paper's WideResNet."""
    return "f.0_convolution.weight" in state_dict


def rename_key(reference_key: str) -> str | None:
    """Maps a key of the paper's WideResNet state dict to hf_aace's, or returns None for a key it does not know."""
    unit = _UNIT.fullmatch(reference_key)
    if unit:
        stage, index, module, tensor = unit.groups()
        target = _UNIT_MODULES.get(module)
        if target is None:
            return None
        return f"wide_resnet.encoder.stages.{int(stage) - 1}.layers.{index}.{target}.{tensor}"
    module, _, tensor = reference_key.rpartition(".")
    return f"{_TOP[module]}.{tensor}" if module in _TOP else None


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], preset: DatasetPreset) -> WideResNetConfig:
    """Builds the [`WideResNetConfig`] of a reference WideResNet state dict trained on the dataset `preset`.

    Raises:
        ValueError: if the tensors do not describe a WideResNet, or do not fit the dataset.
    """
    dataset_kwargs = dataset_config_kwargs(
        state_dict,
        preset,
        architecture="wide_resnet",
        stem_key="f.0_convolution.weight",
        classifier_key="f.8_classification.weight",
        pooling_sizes=POOLING_SIZES,
    )
    units = units_per_stage(state_dict, "f.1_block.block.")
    width = reference_tensor(state_dict, "f.1_block.block.0.block.0_convolution.weight", "wide_resnet", 4).shape[0]
    if width % 16:
        raise ValueError(f"The first stage is {width} channels wide, expected a multiple of 16 (16 x widen factor).")
    return WideResNetConfig(depth=6 * (units - 1) + 4, widen_factor=width // 16, **dataset_kwargs)


__all__ = ["LAYOUT", "POOLING_SIZES", "config_from_state_dict", "is_reference_layout", "rename_key"]
