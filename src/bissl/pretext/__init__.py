"""Pretext (self-supervised) methods: the interface, the registry, shared heads, SimCLR and BYOL."""

from bissl.pretext.base import PRETEXT_METHODS, PretextConfig, PretextMethod, build_pretext
from bissl.pretext.byol import BYOL, BYOLConfig, byol_loss, cosine_momentum
from bissl.pretext.heads import MLPHead, ProjectorConfig, prediction_head, projection_head
from bissl.pretext.simclr import SimCLR, SimCLRConfig, nt_xent_loss

__all__ = [
    "BYOL",
    "PRETEXT_METHODS",
    "BYOLConfig",
    "MLPHead",
    "PretextConfig",
    "PretextMethod",
    "ProjectorConfig",
    "SimCLR",
    "SimCLRConfig",
    "build_pretext",
    "byol_loss",
    "cosine_momentum",
    "nt_xent_loss",
    "prediction_head",
    "projection_head",
]
