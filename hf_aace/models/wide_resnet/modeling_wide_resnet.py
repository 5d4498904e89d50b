"""PyTorch WideResNet, as the AACE paper's code builds it (pre-activation units, bias-free convolutions)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

from .configuration_wide_resnet import WideResNetConfig


class WideResNetLayer(nn.Module):
    """One residual unit: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3.

    The first unit of a stage changes width and stride, so its shortcut is a 1x1 convolution applied to the
    pre-activated input (the BN-ReLU is shared by both branches); the other units add their input unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout_rate: float, projection: bool):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout_rate)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if projection else None

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.norm1(hidden_state))
        residual = self.shortcut(activated) if self.shortcut is not None else hidden_state
        hidden = self.conv1(activated)
        hidden = self.conv2(self.dropout(F.relu(self.norm2(hidden))))
        return hidden + residual


class WideResNetStage(nn.Module):
    """A projection unit followed by `num_layers - 1` identity units at one width."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, num_layers: int, dropout_rate: float):
        super().__init__()
        self.layers = nn.ModuleList(
            WideResNetLayer(
                in_channels if i == 0 else out_channels,
                out_channels,
                stride if i == 0 else 1,
                dropout_rate,
                projection=i == 0,
            )
            for i in range(num_layers)
        )

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_state = layer(hidden_state)
        return hidden_state


class WideResNetEncoder(nn.Module):
    def __init__(self, config: WideResNetConfig):
        super().__init__()
        widths = config.hidden_sizes
        num_layers = (config.depth - 4) // 6 + 1
        self.stages = nn.ModuleList(
            WideResNetStage(widths[i], widths[i + 1], 1 if i == 0 else 2, num_layers, config.dropout_rate)
            for i in range(3)
        )

    def forward(self, hidden_state: torch.Tensor, output_hidden_states: bool = False):
        hidden_states = (hidden_state,) if output_hidden_states else None
        for stage in self.stages:
            hidden_state = stage(hidden_state)
            if output_hidden_states:
                hidden_states += (hidden_state,)
        return hidden_state, hidden_states


def init_batch_norm(module: nn.BatchNorm2d) -> None:
    """Resets a BatchNorm layer to the identity: unit scale, zero shift and fresh running statistics."""
    init.ones_(module.weight)
    init.zeros_(module.bias)
    init.zeros_(module.running_mean)
    init.ones_(module.running_var)
    init.zeros_(module.num_batches_tracked)


class WideResNetPreTrainedModel(PreTrainedModel):
    config_class = WideResNetConfig
    config: WideResNetConfig
    base_model_prefix = "wide_resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The loss is a batch mean that ignores num_items_in_batch, so the Trainer must scale it for accumulation.
    accepts_loss_kwargs = False
    # One residual unit is the smallest piece to place or shard whole (FSDP wraps each in its own unit).
    _no_split_modules = ["WideResNetLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        # The paper's scheme: He-normal (fan-in) convolutions, unit BatchNorm, an all-zero classifier.
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init_batch_norm(module)
        elif isinstance(module, nn.Linear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)


class WideResNetModel(WideResNetPreTrainedModel):
    # The stem is what `get_input_embeddings()` returns (accelerate's FSDP2 wrapping asks every model for it).
    _input_embed_layer = "embedder"

    def __init__(self, config: WideResNetConfig):
        super().__init__(config)
        self.embedder = nn.Conv2d(config.num_channels, 16, 3, padding=1, bias=False)
        self.encoder = WideResNetEncoder(config)
        self.norm = nn.BatchNorm2d(config.hidden_sizes[-1])
        self.pooler = nn.AvgPool2d(config.pooling_size) if config.pooling_size else nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_state, hidden_states = self.encoder(self.embedder(pixel_values), output_hidden_states)
        hidden_state = F.relu(self.norm(hidden_state))
        size = self.config.pooling_size
        if size and not all(size <= side < 2 * size for side in hidden_state.shape[-2:]):
            # A fixed window pools the map to 1x1 only for sides from size to 2 * size - 1.
            raise ValueError(
                f"pooling_size={size} does not pool the {tuple(hidden_state.shape[-2:])} feature map of "
                f"{tuple(pixel_values.shape[-2:])} inputs to 1x1; use pooling_size=None (global pooling) for this "
                "input size."
            )
        pooled = self.pooler(hidden_state).flatten(1)
        if not return_dict:
            return (hidden_state, pooled) + ((hidden_states,) if output_hidden_states else ())
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden_state, pooler_output=pooled, hidden_states=hidden_states
        )


class WideResNetForImageClassification(WideResNetPreTrainedModel):
    def __init__(self, config: WideResNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.wide_resnet = WideResNetModel(config)
        self.classifier = nn.Linear(config.hidden_sizes[-1], config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, config.num_labels - 1]`; when given, the output carries the cross-entropy loss
            (with `config.label_smoothing`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.base_model(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device), label_smoothing=self.config.label_smoothing)
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = ["WideResNetForImageClassification", "WideResNetModel", "WideResNetPreTrainedModel"]
