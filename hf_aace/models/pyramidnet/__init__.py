from .configuration_pyramidnet import PyramidNetConfig
from .modeling_pyramidnet import PyramidNetForImageClassification, PyramidNetModel, PyramidNetPreTrainedModel

__all__ = ["PyramidNetConfig", "PyramidNetForImageClassification", "PyramidNetModel", "PyramidNetPreTrainedModel"]
