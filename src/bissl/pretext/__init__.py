"""Pretext (self-supervised) methods: the interface, the registry, shared heads and the methods."""

from bissl.pretext.barlow_twins import BarlowTwins, BarlowTwinsConfig, barlow_twins_loss, batch_standardize
from bissl.pretext.base import PRETEXT_METHODS, PretextConfig, PretextMethod, build_pretext
from bissl.pretext.byol import BYOL, BYOLConfig, byol_loss
from bissl.pretext.heads import MLPHead, ProjectorConfig, prediction_head, projection_head
from bissl.pretext.mae import MAE, MAEConfig, mae_loss, patchify
from bissl.pretext.mocov3 import MoCoV3, MoCoV3Config, moco_contrastive_loss
from bissl.pretext.momentum import MomentumPair, MomentumPairConfig, cosine_momentum
from bissl.pretext.simclr import SimCLR, SimCLRConfig, nt_xent_loss
from bissl.pretext.simsiam import SimSiam, SimSiamConfig, simsiam_loss
from bissl.pretext.vicreg import VICReg, VICRegConfig, off_diagonal, vicreg_loss

__all__ = [
    "BYOL",
    "MAE",
    "PRETEXT_METHODS",
    "BYOLConfig",
    "BarlowTwins",
    "BarlowTwinsConfig",
    "MAEConfig",
    "MLPHead",
    "MoCoV3",
    "MoCoV3Config",
    "MomentumPair",
    "MomentumPairConfig",
    "PretextConfig",
    "PretextMethod",
    "ProjectorConfig",
    "SimCLR",
    "SimCLRConfig",
    "SimSiam",
    "SimSiamConfig",
    "VICReg",
    "VICRegConfig",
    "barlow_twins_loss",
    "batch_standardize",
    "build_pretext",
    "byol_loss",
    "cosine_momentum",
    "mae_loss",
    "moco_contrastive_loss",
    "nt_xent_loss",
    "off_diagonal",
    "patchify",
    "prediction_head",
    "projection_head",
    "simsiam_loss",
    "vicreg_loss",
]
