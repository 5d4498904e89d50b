import pytest
import torch

from hf_aace import PyramidNetConfig, WideResNetConfig


@pytest.fixture
def tiny_wide_resnet_config() -> WideResNetConfig:
    return WideResNetConfig(depth=10, widen_factor=1, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"})


@pytest.fixture
def tiny_pyramidnet_config() -> PyramidNetConfig:
    return PyramidNetConfig(depth=8, alpha=12, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
