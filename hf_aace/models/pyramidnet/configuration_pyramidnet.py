"""PyramidNet configuration."""

from transformers import PretrainedConfig


# Copied from hf_aace.models.wide_resnet.configuration_wide_resnet.check_input_and_head
def check_input_and_head(num_channels: int, pooling_size: int | None, label_smoothing: float) -> None:
    """Raises a ValueError for an input stem, pooling window or classification loss the network cannot have."""
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels!r}.")
    if pooling_size is not None and (not isinstance(pooling_size, int) or pooling_size < 1):
        raise ValueError(f"pooling_size must be None (global pooling) or a positive integer, got {pooling_size!r}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}.")


class PyramidNetConfig(PretrainedConfig):
    r"""Configuration of a [`PyramidNetForImageClassification`]: the CIFAR PyramidNet (Han et al. 2017) of the AACE
    paper's code, whose width grows by `alpha / (3n)` channels per residual unit.

    Args:
        depth (`int`, *optional*, defaults to 272):
            Number of layers: `6n + 2` with basic units, `9n + 2` with bottleneck units (`n` units per stage).
        alpha (`int`, *optional*, defaults to 200):
            Total width added over the network.
        bottleneck (`bool`, *optional*, defaults to `False`):
            Bottleneck units (1x1-3x3-1x1 convolutions, 4x expansion) instead of basic units (two 3x3 convolutions).
        num_channels (`int`, *optional*, defaults to 3):
            Input channels: 1 (grayscale) or 3 (RGB).
        pooling_size (`int`, *optional*):
            None (default) pools globally, for any input size; an integer uses a fixed `AvgPool2d(pooling_size)`
            window as the paper's code does on CIFAR (8).
        label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing of the cross-entropy computed when labels are passed, in [0, 1).

    Example:
    ```python
    >>> from hf_aace import PyramidNetConfig, PyramidNetForImageClassification
    >>> config = PyramidNetConfig(depth=110, alpha=48, num_labels=10)  # PyramidNet-110, alpha 48
    >>> model = PyramidNetForImageClassification(config)
    ```
    """

    model_type = "aace_pyramidnet"

    def __init__(
        self,
        depth: int = 272,
        alpha: int = 200,
        bottleneck: bool = False,
        num_channels: int = 3,
        pooling_size: int | None = None,
        label_smoothing: float = 0.0,
        **kwargs,
    ):
        if not isinstance(bottleneck, bool):
            raise ValueError(f"bottleneck must be True or False, got {bottleneck!r}.")
        per_unit = 9 if bottleneck else 6
        if not isinstance(depth, int) or depth < per_unit + 2 or (depth - 2) % per_unit != 0:
            kind = "bottleneck units: 11, 20, 29, ..., 272" if bottleneck else "basic units: 8, 14, 20, ..., 272"
            raise ValueError(f"depth must be {per_unit}n + 2 with n >= 1 for {kind}; got {depth!r}.")
        if not isinstance(alpha, int) or alpha < 1:
            raise ValueError(f"alpha must be a positive integer, got {alpha!r}.")
        check_input_and_head(num_channels, pooling_size, label_smoothing)
        self.depth = depth
        self.alpha = alpha
        self.bottleneck = bottleneck
        self.num_channels = num_channels
        self.pooling_size = pooling_size
        self.label_smoothing = label_smoothing
        super().__init__(**kwargs)

    @property
    def units_per_stage(self) -> int:
        return (self.depth - 2) // (9 if self.bottleneck else 6)

    @property
    def unit_widths(self) -> list[int]:
        """Width of every residual unit's 3x3 convolution, in order (the paper's rounding of a linear ramp)."""
        step = self.alpha / (3 * self.units_per_stage)
        width, widths = 16.0, []
        for _ in range(3 * self.units_per_stage):
            # Accumulated, not 16 + step * i: rounding must follow the same float sums as the paper's code.
            width += step
            widths.append(int(round(width)))
        return widths


__all__ = ["PyramidNetConfig"]
