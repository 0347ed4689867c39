"""Resizing of whole image tensors to uint8 at load time, and their per-channel statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_uint8(images: torch.Tensor, size: int, *, chunk: int = 4096) -> torch.Tensor:
    """Resize ``images[N, C, H, W]`` (uint8, or float in [0, 1]) to a new uint8 tensor ``[N, C, size, size]``.

    Antialiased bilinear interpolation (``align_corners=False``): downscaling averages instead of aliasing, and an
    unchanged size is the identity. uint8 input uses torch's integer kernel (within one level of the float result);
    float input is rounded to the nearest of the 256 levels. Works in chunks of ``chunk`` images to bound memory.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk]
        if block.shape[-2:] != (size, size):
            block = F.interpolate(block, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if block.dtype != torch.uint8:
            block = block.clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        out[start : start + chunk] = block
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) standard deviation of uint8 ``images[N, C, H, W]`` on the [0, 1] scale.

    Computed exactly from each channel's 256-bin histogram, so it needs no float copy of the images.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        total = counts.sum()
        mean = (counts * levels).sum() / total
        var = (counts * (levels - mean) ** 2).sum() / (total - 1)
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)
