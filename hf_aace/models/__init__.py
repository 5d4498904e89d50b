"""The paper's two architectures as transformers models, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

# From its module: transformers 5.4 to 5.17 export a placeholder under `transformers` that asks for torchvision.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from ..image_processing_aace import AACEImageProcessor
from .architectures import ARCHITECTURES, OWN_MODEL_TYPES, Architecture, architecture_for, resolve_model
from .pyramidnet import PyramidNetConfig, PyramidNetForImageClassification, PyramidNetModel
from .wide_resnet import WideResNetConfig, WideResNetForImageClassification, WideResNetModel


def _register() -> None:
    for architecture in ARCHITECTURES.values():
        config_class, base_class, head_class = (
            architecture.config_class,
            architecture.base_model_class,
            architecture.model_class,
        )
        AutoConfig.register(architecture.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base_class, exist_ok=True)
        AutoModelForImageClassification.register(config_class, head_class, exist_ok=True)
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": AACEImageProcessor}, exist_ok=True)
        # Saved and pushed models carry their code and an auto_map, so they load with trust_remote_code=True
        # where hf_aace is not installed.
        config_class.register_for_auto_class()
        base_class.register_for_auto_class("AutoModel")
        head_class.register_for_auto_class("AutoModelForImageClassification")
    AACEImageProcessor.register_for_auto_class("AutoImageProcessor")


_register()

__all__ = [
    "ARCHITECTURES",
    "OWN_MODEL_TYPES",
    "Architecture",
    "PyramidNetConfig",
    "PyramidNetForImageClassification",
    "PyramidNetModel",
    "WideResNetConfig",
    "WideResNetForImageClassification",
    "WideResNetModel",
    "architecture_for",
    "resolve_model",
]
