"""Test-only re-implementations of the AACE reproduction code's networks, with its exact state-dict keys.

The paper's code (T-Ratchatorn/AACE) is not a dependency; these modules are written from the description in
`shared/reference/PAPER.md` and the key listing in `shared/reference/checkpoint_layouts.txt`, so that tests can make
checkpoints with the reference layout and compare logits against the converted hf_aace models. Module names, their
order and the forward passes follow the reference; nothing else is meant to match it.
"""

from collections import OrderedDict

import torch
from torch import nn

# The paper's pooling before the classifier, per dataset and architecture (None: global pooling).
REFERENCE_POOLING = {
    "wide_resnet": {"cifar10": 8, "cifar100": 8, "fashionmnist": 4, "food101": None},
    "pyramidnet": {"cifar10": 8, "cifar100": 8, "fashionmnist": None, "food101": None},
}


def _pooling(size: int | None) -> nn.Module:
    return nn.AvgPool2d(size) if size else nn.AdaptiveAvgPool2d((1, 1))


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class WideResNetDownsampleUnit(nn.Module):
    """A stage's first unit: BN-ReLU shared by the 3x3 branch and the 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.norm_act = nn.Sequential(
            OrderedDict(
                [
                    ("0_normalization", nn.BatchNorm2d(in_channels)),
                    ("1_activation", nn.ReLU(inplace=True)),
                ]
            )
        )
        self.block = nn.Sequential(
            OrderedDict(
                [
                    ("0_convolution", _conv3x3(in_channels, out_channels, stride)),
                    ("1_normalization", nn.BatchNorm2d(out_channels)),
                    ("2_activation", nn.ReLU(inplace=True)),
                    ("3_dropout", nn.Dropout(dropout)),
                    ("4_convolution", _conv3x3(out_channels, out_channels)),
                ]
            )
        )
        self.downsample = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_act(x)
        return self.block(x) + self.downsample(x)


class WideResNetBasicUnit(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus identity."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block = nn.Sequential(
            OrderedDict(
                [
                    ("0_normalization", nn.BatchNorm2d(channels)),
                    ("1_activation", nn.ReLU(inplace=True)),
                    ("2_convolution", _conv3x3(channels, channels)),
                    ("3_normalization", nn.BatchNorm2d(channels)),
                    ("4_activation", nn.ReLU(inplace=True)),
                    ("5_dropout", nn.Dropout(dropout)),
                    ("6_convolution", _conv3x3(channels, channels)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class WideResNetStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, basic_units: int, dropout: float):
        super().__init__()
        units = [WideResNetDownsampleUnit(in_channels, out_channels, stride, dropout)]
        units += [WideResNetBasicUnit(out_channels, dropout) for _ in range(basic_units)]
        self.block = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ReferenceWideResNet(nn.Module):
    """The reference WideResNet: everything lives in one `nn.Sequential` named `f`."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        in_channels: int,
        num_labels: int,
        pooling_size: int | None,
        dropout: float = 0.0,
    ):
        super().__init__()
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        basic_units = (depth - 4) // 6
        self.f = nn.Sequential(
            OrderedDict(
                [
                    ("0_convolution", _conv3x3(in_channels, widths[0])),
                    ("1_block", WideResNetStage(widths[0], widths[1], 1, basic_units, dropout)),
                    ("2_block", WideResNetStage(widths[1], widths[2], 2, basic_units, dropout)),
                    ("3_block", WideResNetStage(widths[2], widths[3], 2, basic_units, dropout)),
                    ("4_normalization", nn.BatchNorm2d(widths[3])),
                    ("5_activation", nn.ReLU(inplace=True)),
                    ("6_pooling", _pooling(pooling_size)),
                    ("7_flattening", nn.Flatten()),
                    ("8_classification", nn.Linear(widths[3], num_labels)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def _zero_padded_sum(out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    missing = out.shape[1] - shortcut.shape[1]
    if missing:
        zeros = shortcut.new_zeros(shortcut.shape[0], missing, *shortcut.shape[2:])
        shortcut = torch.cat([shortcut, zeros], dim=1)
    return out + shortcut


class PyramidBasicBlock(nn.Module):
    """BN-conv3x3(stride)-BN-ReLU-conv3x3-BN plus the (pooled, zero-padded) input."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.relu(self.bn2(self.conv1(self.bn1(x))))))
        return _zero_padded_sum(out, self.downsample(x) if self.downsample is not None else x)


class PyramidBottleneck(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN plus the (pooled, zero-padded) input."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn2(self.conv1(self.bn1(x))))
        out = self.bn4(self.conv3(self.relu(self.bn3(self.conv2(out)))))
        return _zero_padded_sum(out, self.downsample(x) if self.downsample is not None else x)


class ReferencePyramidNet(nn.Module):
    """The reference CIFAR-style PyramidNet (also its Fashion-MNIST and Food101 variants)."""

    def __init__(
        self,
        depth: int,
        alpha: int,
        in_channels: int,
        num_labels: int,
        pooling_size: int | None,
        bottleneck: bool = False,
    ):
        super().__init__()
        block = PyramidBottleneck if bottleneck else PyramidBasicBlock
        units = (depth - 2) // (9 if bottleneck else 6)
        step = alpha / (3 * units)
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        # Widths follow a running float sum rounded per unit, as the reference accumulates them.
        channels, ramp = 16, 16.0
        for stage in range(1, 4):
            blocks = []
            for index in range(units):
                ramp += step
                stride = 2 if stage > 1 and index == 0 else 1
                pool = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride == 2 else None
                blocks.append(block(channels, int(round(ramp)), stride, pool))
                channels = int(round(ramp)) * block.expansion
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.bn_final = nn.BatchNorm2d(channels)
        self.relu_final = nn.ReLU(inplace=True)
        self.avgpool = _pooling(pooling_size)
        self.fc = nn.Linear(channels, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)))))
        x = self.avgpool(self.relu_final(self.bn_final(x)))
        return self.fc(x.flatten(1))


def build_reference_network(architecture: str, dataset: str, num_labels: int, **kwargs) -> nn.Module:
    """A reference network as the paper's code builds it for `dataset` (1 input channel for Fashion-MNIST).

    Args:
        architecture: `wide_resnet` (kwargs: depth, widen_factor) or `pyramidnet` (depth, alpha, bottleneck).
        dataset: `cifar10`, `cifar100`, `fashionmnist` or `food101`.
        num_labels: classifier outputs.
    """
    in_channels = 1 if dataset == "fashionmnist" else 3
    pooling_size = REFERENCE_POOLING[architecture][dataset]
    network_class = {"wide_resnet": ReferenceWideResNet, "pyramidnet": ReferencePyramidNet}[architecture]
    return network_class(in_channels=in_channels, num_labels=num_labels, pooling_size=pooling_size, **kwargs)


@torch.no_grad()
def randomize_(network: nn.Module, seed: int = 0) -> nn.Module:
    """Fills every parameter and BatchNorm statistic with random values, so that eval-mode BN is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(size, generator=generator) * 0.2)
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return network


__all__ = ["REFERENCE_POOLING", "ReferencePyramidNet", "ReferenceWideResNet", "build_reference_network", "randomize_"]
