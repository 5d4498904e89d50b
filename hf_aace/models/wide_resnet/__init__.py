from .configuration_wide_resnet import WideResNetConfig
from .modeling_wide_resnet import WideResNetForImageClassification, WideResNetModel, WideResNetPreTrainedModel

__all__ = ["WideResNetConfig", "WideResNetForImageClassification", "WideResNetModel", "WideResNetPreTrainedModel"]
