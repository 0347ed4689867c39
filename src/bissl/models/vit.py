"""Vision Transformers (timm) as backbones: ``vit_tiny``, ``vit_small``, ``vit_base`` (needs ``bissl[vit]``).

Widths and depths are timm's (ViT-Ti 192 x 12, 3 heads; ViT-S 384 x 12, 6 heads; ViT-B 768 x 12, 12 heads), each
overridable (``embed_dim``, ``depth``, ``num_heads``: the tests build a 2-block, 32-wide ViT). ``patch_size``
defaults to 4 for ``small_images`` (16-64 px inputs) and 16 otherwise; ``image_size`` is the run's
``data.image_size`` (224 when not given). ``global_pool``: ``avg`` (default, mean of the patch tokens after the final
norm, as in MAE's linear probe) or ``token`` (the class token). Random initialisation only (``pretrained=False``):
load local weights with ``backbone.weights`` (timm state dicts, MAE's ``{"model": ...}`` checkpoints).
The module is :class:`bissl.models.timm_vit.ViT`; see there for the patch-level API and fused attention.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bissl.models.backbones import BACKBONES
from bissl.utils.errors import ConfigError

SIZES: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}


def require_timm() -> None:
    """Raise a one-line ConfigError unless timm is installed."""
    try:
        import timm  # noqa: F401
    except ImportError:
        raise ConfigError("ViT backbones need timm: pip install 'bissl[vit]'") from None


def build_vit(
    size: str,
    *,
    in_channels: int,
    small_images: bool = True,
    image_size: int | None = None,
    patch_size: int | None = None,
    global_pool: str = "avg",
    fused_attn: bool = True,
    **overrides: Any,
) -> nn.Module:
    """A randomly initialised ViT of the given ``size`` (``SIZES``), ``overrides`` passed to timm."""
    require_timm()
    from bissl.models.timm_vit import ViT

    image_size = 224 if image_size is None else image_size
    patch_size = patch_size or (4 if small_images else 16)
    if image_size % patch_size:
        raise ConfigError(f"{size}: image_size {image_size} is not a multiple of patch_size {patch_size}")
    if global_pool not in ("avg", "token"):
        raise ConfigError(f"{size}: global_pool must be 'avg' or 'token', got {global_pool!r}")
    kwargs = {**SIZES[size], "mlp_ratio": 4.0, "qkv_bias": True, **overrides}
    try:
        return ViT(
            img_size=image_size, patch_size=patch_size, in_chans=in_channels, num_classes=0,
            global_pool=global_pool, fc_norm=False, fused_attn=fused_attn, **kwargs,
        )  # fmt: skip
    except TypeError as exc:
        raise ConfigError(f"{size}: {exc}; check backbone.kwargs") from None


def _register(size: str) -> None:
    def builder(*, in_channels: int, small_images: bool = True, image_size: int | None = None, **kw: Any) -> nn.Module:
        return build_vit(size, in_channels=in_channels, small_images=small_images, image_size=image_size, **kw)

    builder.__name__ = builder.__qualname__ = size
    builder.__doc__ = f"timm ViT ({size}: {SIZES[size]}), ``feature_dim = embed_dim``; see bissl.models.vit."
    BACKBONES.register(size)(builder)


for _size in SIZES:
    _register(_size)
