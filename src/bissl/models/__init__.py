"""Backbones: the registry, the built-ins (ResNet-18/50, a small CNN, timm ViTs), LoRA adapters and loading of
foreign weights."""

from bissl.models import resnet, small_cnn, vit  # noqa: F401  (register the built-ins; vit needs timm when built)
from bissl.models.backbones import BACKBONES, as_backbone, build_backbone, feature_dim_of
from bissl.models.small_cnn import SmallCNN
from bissl.models.weights import BACKBONE_FORMAT, LoadReport, extract_state_dict, load_backbone_weights

__all__ = [
    "BACKBONES",
    "BACKBONE_FORMAT",
    "LoadReport",
    "SmallCNN",
    "as_backbone",
    "build_backbone",
    "extract_state_dict",
    "feature_dim_of",
    "load_backbone_weights",
]
