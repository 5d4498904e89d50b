"""PyTorch PyramidNet, as the AACE paper's code builds it (additive width growth, zero-padded shortcuts)."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

from .configuration_pyramidnet import PyramidNetConfig


class PyramidNetShortCut(nn.Module):
    """Identity shortcut, average-pooled when the unit downsamples, zero-padded to the unit's output width."""

    def __init__(self, stride: int):
        super().__init__()
        self.pool = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else None

    def forward(self, hidden_state: torch.Tensor, out_channels: int) -> torch.Tensor:
        if self.pool is not None:
            hidden_state = self.pool(hidden_state)
        missing = out_channels - hidden_state.shape[1]
        return F.pad(hidden_state, (0, 0, 0, 0, 0, missing)) if missing else hidden_state


class PyramidNetBasicLayer(nn.Module):
    """BN-conv3x3(stride)-BN-ReLU-conv3x3-BN, added to the shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(width)
        self.shortcut = PyramidNetShortCut(stride)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(self.norm1(hidden_state))
        hidden = self.norm3(self.conv2(F.relu(self.norm2(hidden))))
        return hidden + self.shortcut(hidden_state, hidden.shape[1])


class PyramidNetBottleNeckLayer(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN, added to the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.norm4 = nn.BatchNorm2d(width * self.expansion)
        self.shortcut = PyramidNetShortCut(stride)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(self.norm1(hidden_state))
        hidden = self.conv2(F.relu(self.norm2(hidden)))
        hidden = self.norm4(self.conv3(F.relu(self.norm3(hidden))))
        return hidden + self.shortcut(hidden_state, hidden.shape[1])


class PyramidNetEmbeddings(nn.Module):
    """conv3x3 to 16 channels and BatchNorm, without activation."""

    def __init__(self, config: PyramidNetConfig):
        super().__init__()
        self.conv = nn.Conv2d(config.num_channels, 16, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(16)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pixel_values))


class PyramidNetStage(nn.Module):
    def __init__(self, in_channels: int, widths: list[int], stride: int, bottleneck: bool):
        super().__init__()
        layer_class = PyramidNetBottleNeckLayer if bottleneck else PyramidNetBasicLayer
        layers = []
        for i, width in enumerate(widths):
            layers.append(layer_class(in_channels, width, stride if i == 0 else 1))
            in_channels = width * layer_class.expansion
        self.layers = nn.ModuleList(layers)
        self.out_channels = in_channels

    # Copied from hf_aace.models.wide_resnet.modeling_wide_resnet.WideResNetStage.forward
    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_state = layer(hidden_state)
        return hidden_state


class PyramidNetEncoder(nn.Module):
    def __init__(self, config: PyramidNetConfig):
        super().__init__()
        widths, n = config.unit_widths, config.units_per_stage
        stages, in_channels = [], 16
        for i in range(3):
            stage = PyramidNetStage(in_channels, widths[i * n : (i + 1) * n], 1 if i == 0 else 2, config.bottleneck)
            stages.append(stage)
            in_channels = stage.out_channels
        self.stages = nn.ModuleList(stages)
        self.out_channels = in_channels

    # Copied from hf_aace.models.wide_resnet.modeling_wide_resnet.WideResNetEncoder.forward
    def forward(self, hidden_state: torch.Tensor, output_hidden_states: bool = False):
        hidden_states = (hidden_state,) if output_hidden_states else None
        for stage in self.stages:
            hidden_state = stage(hidden_state)
            if output_hidden_states:
                hidden_states += (hidden_state,)
        return hidden_state, hidden_states


# Copied from hf_aace.models.wide_resnet.modeling_wide_resnet.init_batch_norm
def init_batch_norm(module: nn.BatchNorm2d) -> None:
    """Resets a BatchNorm layer to the identity: unit scale, zero shift and fresh running statistics."""
    init.ones_(module.weight)
    init.zeros_(module.bias)
    init.zeros_(module.running_mean)
    init.ones_(module.running_var)
    init.zeros_(module.num_batches_tracked)


class PyramidNetPreTrainedModel(PreTrainedModel):
    config_class = PyramidNetConfig
    config: PyramidNetConfig
    base_model_prefix = "pyramidnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The loss is a batch mean that ignores num_items_in_batch, so the Trainer must scale it for accumulation.
    accepts_loss_kwargs = False
    # One residual unit is the smallest piece to place or shard whole (FSDP wraps each in its own unit).
    _no_split_modules = ["PyramidNetBasicLayer", "PyramidNetBottleNeckLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        # The paper's scheme: convolutions N(0, 2 / (k * k * out_channels)), unit BatchNorm, PyTorch's default
        # initialisation for the classifier.
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
        elif isinstance(module, nn.BatchNorm2d):
            init_batch_norm(module)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)


class PyramidNetModel(PyramidNetPreTrainedModel):
    # The stem is what `get_input_embeddings()` returns (accelerate's FSDP2 wrapping asks every model for it).
    _input_embed_layer = "embedder"

    def __init__(self, config: PyramidNetConfig):
        super().__init__(config)
        self.embedder = PyramidNetEmbeddings(config)
        self.encoder = PyramidNetEncoder(config)
        self.norm = nn.BatchNorm2d(self.encoder.out_channels)
        self.pooler = nn.AvgPool2d(config.pooling_size) if config.pooling_size else nn.AdaptiveAvgPool2d(1)
        self.post_init()

    # Copied from hf_aace.models.wide_resnet.modeling_wide_resnet.WideResNetModel.forward
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


class PyramidNetForImageClassification(PyramidNetPreTrainedModel):
    def __init__(self, config: PyramidNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.pyramidnet = PyramidNetModel(config)
        self.classifier = nn.Linear(self.pyramidnet.encoder.out_channels, config.num_labels)
        self.post_init()

    # Copied from hf_aace.models.wide_resnet.modeling_wide_resnet.WideResNetForImageClassification.forward
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


__all__ = ["PyramidNetForImageClassification", "PyramidNetModel", "PyramidNetPreTrainedModel"]
