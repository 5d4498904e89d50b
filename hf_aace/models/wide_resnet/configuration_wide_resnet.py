"""WideResNet configuration."""

from transformers import PretrainedConfig


def check_input_and_head(num_channels: int, pooling_size: int | None, label_smoothing: float) -> None:
    """Raises a ValueError for an input stem, pooling window or classification loss the network cannot have."""
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels!r}.")
    if pooling_size is not None and (not isinstance(pooling_size, int) or pooling_size < 1):
        raise ValueError(f"pooling_size must be None (global pooling) or a positive integer, got {pooling_size!r}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}.")


class WideResNetConfig(PretrainedConfig):
    r"""Configuration of a [`WideResNetForImageClassification`]: the pre-activation WideResNet of the AACE paper's
    code (Zagoruyko & Komodakis 2016, as in the widely used SAM example), 3 stages of widths 16k, 32k and 64k.

    Args:
        depth (`int`, *optional*, defaults to 28):
            Number of layers, `6n + 4` for `n` residual units per stage after each stage's first unit.
        widen_factor (`int`, *optional*, defaults to 10):
            Width multiplier `k`.
        dropout_rate (`float`, *optional*, defaults to 0.0):
            Dropout between the two convolutions of each unit, in [0, 1).
        num_channels (`int`, *optional*, defaults to 3):
            Input channels: 1 (grayscale) or 3 (RGB).
        pooling_size (`int`, *optional*):
            None (default) pools globally, for any input size. An integer uses a fixed `AvgPool2d(pooling_size)`
            window as the paper's code does (8 on CIFAR; 4 on the 7x7 maps of Fashion-MNIST, which pools only the
            top-left 4x4 window); converted reference checkpoints need it to give the same logits.
        label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing of the cross-entropy computed when labels are passed, in [0, 1).

    Example:
    ```python
    >>> from hf_aace import WideResNetConfig, WideResNetForImageClassification
    >>> config = WideResNetConfig(depth=16, widen_factor=4, num_labels=10)  # WRN-16-4
    >>> model = WideResNetForImageClassification(config)
    ```
    """

    model_type = "aace_wide_resnet"

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        dropout_rate: float = 0.0,
        num_channels: int = 3,
        pooling_size: int | None = None,
        label_smoothing: float = 0.0,
        **kwargs,
    ):
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth!r}.")
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor!r}.")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must lie in [0, 1), got {dropout_rate!r}.")
        check_input_and_head(num_channels, pooling_size, label_smoothing)
        self.depth = depth
        self.widen_factor = widen_factor
        self.dropout_rate = dropout_rate
        self.num_channels = num_channels
        self.pooling_size = pooling_size
        self.label_smoothing = label_smoothing
        super().__init__(**kwargs)

    @property
    def hidden_sizes(self) -> list[int]:
        """Output channels of the stem and the three stages."""
        return [16, 16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]


__all__ = ["WideResNetConfig"]
