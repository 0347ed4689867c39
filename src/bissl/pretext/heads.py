"""Heads shared by pretext methods: one generic MLP, with the projector / predictor presets as thin settings."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from pydantic import Field, PositiveInt
from torch import nn

from bissl.pretext.base import PretextConfig


class MLPHead(nn.Sequential):
    """``x -> [Linear -> BN -> ReLU] x (L - 1) -> Linear (-> BN if last_bn)`` for ``dims = (in, hidden..., out)``.

    With ``batch_norm=False`` the BatchNorm layers are left out. A Linear followed by BN has no bias (the
    BN shift replaces it).
    """

    def __init__(self, dims: Sequence[int], *, batch_norm: bool = True, last_bn: bool = False) -> None:
        if len(dims) < 2:
            raise ValueError(f"an MLP head needs input and output dims, got {list(dims)}")
        layers: list[nn.Module] = []
        n_layers = len(dims) - 1
        for i, (d_in, d_out) in enumerate(pairwise(dims)):
            last = i == n_layers - 1
            norm = batch_norm and (last_bn or not last)
            layers.append(nn.Linear(d_in, d_out, bias=not norm))
            if norm:
                layers.append(nn.BatchNorm1d(d_out))
            if not last:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.dims = tuple(dims)


def projection_head(in_dim: int, dims: Sequence[int], *, last_bn: bool = True) -> MLPHead:
    """Projector ``in_dim -> dims``: BN after every layer (SimCLR v2), or not after the last (BYOL, ``last_bn=False``).

    The BiSSL paper's ResNet-50 projector is ``2048 -> 256 -> 256 -> 256`` (``dims = [256, 256, 256]``).
    """
    return MLPHead([in_dim, *dims], last_bn=last_bn)


def prediction_head(in_dim: int, dims: Sequence[int]) -> MLPHead:
    """BYOL predictor ``in_dim -> dims``, no BN on the output; the paper's is ``256 -> 256 -> 256``."""
    return MLPHead([in_dim, *dims], last_bn=False)


class ProjectorConfig(PretextConfig):
    """Settings of methods with a projector: its layer widths after the backbone's ``feature_dim``.

    The default ``[512, 128]`` suits small CPU nets; the paper used ``[256, 256, 256]`` on ResNet-50.
    """

    projector_dims: list[PositiveInt] = Field(default_factory=lambda: [512, 128], min_length=1)
