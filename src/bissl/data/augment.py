"""Batched view augmentations with PER-SAMPLE random parameters, on whatever device the batch lives on.

torchvision's transforms draw one set of random parameters for a whole batch tensor; self-supervised views need
independent parameters for every image. Here every random number of a view is drawn at once as a
``[B, N_UNIFORMS]`` uniform tensor from an explicit ``torch.Generator`` (on the generator's device, then moved
to the batch's), so a step's views depend only on the batch and the generator's seed: runs are reproducible
and resumable (seed the generator with e.g. ``make_generator(seed, "views", step)``). No Python loop runs over
samples.

One view applies, in this order (each with its own probability, per sample):

* random resized crop: crop area fraction ``s ~ U(crop_scale)``, aspect ratio ``r`` log-uniform in
  ``crop_ratio`` (10 tries, then the largest central crop of a valid ratio, as torchvision does), a uniform
  position, bilinear resampling to ``image_size`` with ``grid_sample`` (the crop is an axis-aligned affine map,
  so its sampling grid is built by broadcasting, cheaper than ``affine_grid``'s batched matmul; no antialiasing,
  so views much smaller than the stored images alias: store images at the view size);
* horizontal flip (folded into the crop's affine map);
* rotation by a multiple of 90 degrees (folded into the crop's sampling grid, an exact pixel permutation of the
  square view): with probability ``rot90_p`` by 90, 180 or 270 degrees, uniformly; ``rot90_p = 0.75`` makes the
  view's rotation uniform over all four, so a pretext trained on such views learns to ignore it. Its uniforms are
  drawn after the others, and only when ``rot90_p > 0``, so views without it are the same as before it existed;
* colour jitter, in the fixed order brightness, contrast, saturation, hue (torchvision shuffles the order per
  call): ``x*b``; ``c*x + (1-c)*mean(gray(x))``; ``s*x + (1-s)*gray(x)``; hue rotated by ``h`` in HSV space;
  factors ``b, c, s ~ U(max(0, 1-k), 1+k)`` and ``h ~ U(-k, k)``, results clamped to [0, 1];
* random grayscale (ITU-R 601 luma);
* Gaussian blur, separable, reflect padding, ``sigma ~ U(blur_sigma)``;
* solarize: ``x -> 1 - x`` where ``x >= solarize_threshold``.

For 1-channel images colour jitter is brightness and contrast only, and grayscale is a no-op.

Defaults scaled to the image side (:func:`size_defaults`), since the published values are for 96-224 px:
crop area ``(0.08, 1)`` from 64 px up, ``(0.2, 1)`` from 32 px, ``(0.3, 1)`` below (a 0.08 crop of a 16 px image
is 4.5 px wide); blur kernel ~10% of the side, odd, at least 3 (23 at 224 px, 3 at 32 px); blur sigma
``(0.1, 2.0) * min(1, side / 64)``: the published range from 64 px up, and below it the same blur relative to the
image side as at 64 px (sigma up to 1 px at 32 px, 0.5 px at 16 px; unscaled, a 2 px blur would erase a 16 px
digit, and the ImageNet ratio, 2 px per 224, would do nothing).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bissl.data.base import DatasetInfo
from bissl.utils.errors import ConfigError
from bissl.utils.registry import Registry

CROP_TRIES = 10
# Column layout of the per-view uniform draws u[B, N_UNIFORMS].
_AREA, _RATIO = slice(0, CROP_TRIES), slice(CROP_TRIES, 2 * CROP_TRIES)
_POS_X, _POS_Y, _FLIP, _JITTER, _BRIGHT, _CONTRAST, _SAT, _HUE, _GRAY, _BLUR, _SIGMA, _SOLARIZE = range(
    2 * CROP_TRIES, 2 * CROP_TRIES + 12
)
N_UNIFORMS = 2 * CROP_TRIES + 12
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ViewConfig:
    """The distribution of one view. Probabilities are per sample; a stage with probability 0 is skipped."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # crop AREA as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_kernel: int = 23
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    rot90_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ConfigError(f"augmentation {name} must be a range (low, high) with 0 < low <= high, got {value}")
            object.__setattr__(self, name, value)
        if self.crop_scale[1] > 1:
            raise ConfigError(f"augmentation crop_scale is an area fraction in (0, 1], got {self.crop_scale}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "solarize_threshold", "rot90_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augmentation {name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augmentation {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"augmentation hue must lie in [0, 0.5], got {self.hue}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ConfigError(f"augmentation blur_kernel must be an odd positive size, got {self.blur_kernel}")


VIEW_FIELDS = frozenset(f.name for f in dataclasses.fields(ViewConfig))


def size_defaults(image_size: int) -> dict[str, Any]:
    """Crop area range and blur kernel / sigma range for square images of side ``image_size`` (module docstring)."""
    crop_low = 0.08 if image_size >= 64 else 0.2 if image_size >= 32 else 0.3
    kernel = max(3, round(0.1 * image_size) // 2 * 2 + 1)
    sigma_scale = min(1.0, image_size / 64)
    return {"crop_scale": (crop_low, 1.0), "blur_kernel": kernel, "blur_sigma": (0.1 * sigma_scale, 2.0 * sigma_scale)}


def _uniform(u: Tensor, low: float, high: float) -> Tensor:
    return low + (high - low) * u


def grayscale(images: Tensor) -> Tensor:
    """ITU-R 601 luma ``[B, 1, H, W]`` of RGB ``images[B, 3, H, W]`` (1-channel images are returned as they are)."""
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def shift_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB ``images[B, 3, H, W]`` by ``shift[B]`` turns, keeping HSV saturation and value.

    With ``V = max``, ``delta = max - min`` over channels and ``H6 = 6 * hue`` (from the channel holding the max),
    HSV -> RGB is ``channel_n = V - delta * clamp(2 - |k - 2|, 0, 1)``, ``k = (n + H6) mod 6``, ``n = 5, 3, 1``.
    """
    red, green, blue = images.unbind(1)
    value = images.amax(1)
    delta = value - images.amin(1)
    is_red = red == value
    is_green = (green == value) & ~is_red
    hue6 = torch.where(is_red, green - blue, torch.where(is_green, blue - red, red - green))
    hue6.div_(delta.clamp_min(1e-12))  # grey pixels (delta = 0): any hue gives the same colour
    hue6 += 2.0 * is_green + 4.0 * ~(is_red | is_green) + 6.0 * shift.view(-1, 1, 1)
    offsets = images.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = torch.remainder(hue6, 6.0).unsqueeze(1) + offsets  # in [1, 11): wrap into [0, 6)
    k = torch.where(k >= 6.0, k - 6.0, k)
    return value.unsqueeze(1) - delta.unsqueeze(1) * k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)


def color_jitter(
    images: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor | None = None, hue: Tensor | None = None
) -> Tensor:
    """Per-sample colour jitter with factors ``[B]`` in the order brightness, contrast, saturation, hue.

    A factor of 1 (hue: 0) leaves an image unchanged; ``None`` skips that adjustment (as for 1-channel images).
    """
    view = (-1, 1, 1, 1)
    images = (images * brightness.view(view)).clamp_(0.0, 1.0)
    mean = grayscale(images).mean(dim=(1, 2, 3)).view(view)
    images = (contrast.view(view) * images + (1 - contrast.view(view)) * mean).clamp_(0.0, 1.0)
    if saturation is not None:
        gray = grayscale(images)
        images = (saturation.view(view) * images + (1 - saturation.view(view)) * gray).clamp_(0.0, 1.0)
    if hue is not None:
        images = shift_hue(images, hue)
    return images


def gaussian_blur(images: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with per-sample ``sigma[B]`` (0 means no blur), reflect padding, odd ``kernel_size``.

    One depthwise convolution per direction with a kernel per (sample, channel); the result is clamped to [0, 1].
    """
    radius = kernel_size // 2
    if radius == 0:
        return images
    batch, channels, height, width = images.shape
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    weights = torch.exp(-0.5 * (taps / sigma.clamp_min(1e-6).view(-1, 1)) ** 2)
    weights = torch.where(sigma.view(-1, 1) > 0, weights, (taps == 0).to(images.dtype))
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(channels, 0)
    padded = F.pad(images.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
    rows = F.conv2d(padded, weights.view(-1, 1, 1, kernel_size), groups=batch * channels)
    blurred = F.conv2d(rows, weights.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return blurred.view(batch, channels, height, width).clamp_(0.0, 1.0)


class ViewAugmentation:
    """One random view: ``view(batch [B, C, H, W] in [0, 1], generator) -> [B, C, S, S]`` in [0, 1], un-normalised."""

    def __init__(self, config: ViewConfig, *, image_size: int, channels: int) -> None:
        if channels not in (1, 3):
            raise ConfigError(f"view augmentations support 1- or 3-channel images, got {channels} channels")
        if config.blur_kernel // 2 >= image_size:
            raise ConfigError(f"augmentation blur_kernel {config.blur_kernel} is too large for {image_size} px images")
        self.config = config
        self.image_size = image_size
        self.channels = channels

    def crop_grid(self, u: Tensor, height: int, width: int) -> Tensor:
        """The ``grid_sample`` grid ``[B, S, S, 2]`` of a random resized crop (mirrored for flipped samples).

        Output pixel centres ``t = (2i + 1) / S - 1`` map to input coordinates ``scale * t + shift`` per axis
        (``align_corners=False`` convention), with ``scale = crop side / image side`` (negated to flip).
        """
        cfg = self.config
        area = height * width * _uniform(u[:, _AREA], *cfg.crop_scale)
        ratio = torch.exp(_uniform(u[:, _RATIO], math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
        crop_w, crop_h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (crop_w <= width) & (crop_h <= height)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # first try that fits (0 if none does)
        crop_w, crop_h = crop_w.gather(1, first).squeeze(1), crop_h.gather(1, first).squeeze(1)
        # Fallback when no try fits: the largest centred crop whose ratio lies in crop_ratio.
        fallback_ratio = min(max(width / height, cfg.crop_ratio[0]), cfg.crop_ratio[1])
        fallback_w = min(width, height * fallback_ratio)
        any_fits = fits.any(1)
        crop_w = torch.where(any_fits, crop_w, torch.full_like(crop_w, fallback_w))
        crop_h = torch.where(any_fits, crop_h, torch.full_like(crop_h, fallback_w / fallback_ratio))
        position_x = torch.where(any_fits, u[:, _POS_X], 0.5)
        position_y = torch.where(any_fits, u[:, _POS_Y], 0.5)
        centre_x = crop_w / 2 + (width - crop_w) * position_x
        centre_y = crop_h / 2 + (height - crop_h) * position_y
        mirror = torch.where(u[:, _FLIP] < cfg.flip_p, -1.0, 1.0).to(u.dtype)
        scale_x, shift_x = mirror * crop_w / width, 2 * centre_x / width - 1
        scale_y, shift_y = crop_h / height, 2 * centre_y / height - 1
        size = self.image_size
        centres = (2 * torch.arange(size, device=u.device, dtype=u.dtype) + 1) / size - 1
        grid_x = (scale_x.view(-1, 1, 1) * centres.view(1, 1, size) + shift_x.view(-1, 1, 1)).expand(-1, size, size)
        grid_y = (scale_y.view(-1, 1, 1) * centres.view(1, size, 1) + shift_y.view(-1, 1, 1)).expand(-1, size, size)
        return torch.stack((grid_x, grid_y), dim=-1)

    def rotate_grid(self, grid: Tensor, u: Tensor) -> Tensor:
        """``grid[B, S, S, 2]`` turned by ``k * 90`` degrees per sample: ``k = 0`` where ``u >= rot90_p``, else
        ``1 + floor(3 u / rot90_p)`` (``u / rot90_p`` is uniform on [0, 1) there, so k is uniform on 1, 2, 3)."""
        p = self.config.rot90_p
        turns = torch.where(u < p, 1 + torch.floor(3 * u / p).clamp_(max=2), 0).to(device=grid.device)
        rotated = grid
        for k in (1, 2, 3):
            rotated = torch.where((turns == k).view(-1, 1, 1, 1), torch.rot90(grid, k, dims=(1, 2)), rotated)
        return rotated

    def __call__(self, batch: Tensor, generator: torch.Generator) -> Tensor:
        cfg, batch_size = self.config, batch.shape[0]
        u = torch.rand(batch_size, N_UNIFORMS, generator=generator, device=generator.device)
        u = u.to(device=batch.device, dtype=batch.dtype)
        grid = self.crop_grid(u, *batch.shape[-2:])
        if cfg.rot90_p > 0:
            grid = self.rotate_grid(grid, torch.rand(batch_size, generator=generator, device=generator.device))
        x = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if cfg.jitter_p > 0:
            x = self._jitter(x, u)
        if self.channels == 3 and cfg.grayscale_p > 0:
            x = torch.where((u[:, _GRAY] < cfg.grayscale_p).view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        if cfg.blur_p > 0:
            sigma = torch.where(u[:, _BLUR] < cfg.blur_p, _uniform(u[:, _SIGMA], *cfg.blur_sigma), 0.0)
            x = gaussian_blur(x, cfg.blur_kernel, sigma)
        if cfg.solarize_p > 0:
            flip_values = (u[:, _SOLARIZE] < cfg.solarize_p).view(-1, 1, 1, 1) & (x >= cfg.solarize_threshold)
            x = torch.where(flip_values, 1 - x, x)
        return x

    def _jitter(self, x: Tensor, u: Tensor) -> Tensor:
        cfg = self.config
        apply = u[:, _JITTER] < cfg.jitter_p

        def factor(column: int, strength: float) -> Tensor:
            drawn = _uniform(u[:, column], max(0.0, 1 - strength), 1 + strength)
            return torch.where(apply, drawn, 1.0)

        colour = self.channels == 3
        saturation = factor(_SAT, cfg.saturation) if colour and cfg.saturation > 0 else None
        hue = torch.where(apply, _uniform(u[:, _HUE], -cfg.hue, cfg.hue), 0.0) if colour and cfg.hue > 0 else None
        return color_jitter(x, factor(_BRIGHT, cfg.brightness), factor(_CONTRAST, cfg.contrast), saturation, hue)


def normalize(batch: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(batch - mean) / std`` per channel, for ``batch[B, C, H, W]`` (float in [0, 1], or uint8 in 0..255)."""
    batch = _as_unit_float(batch)
    mean_t = torch.as_tensor(mean, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    return (batch - mean_t) / std_t


def _as_unit_float(batch: Tensor) -> Tensor:
    """uint8 -> float32 / 255; float16 / bfloat16 -> float32; float32 / float64 as they are."""
    if batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    if not batch.is_floating_point():
        raise TypeError(f"images must be float in [0, 1] or uint8, got {batch.dtype}")
    return batch if batch.dtype in (torch.float32, torch.float64) else batch.float()


class ViewPipeline:
    """A list of view augmentations and the normalisation after them.

    ``pipeline(batch, generator) -> [view_1, ..., view_n]``, each ``[B, C, image_size, image_size]`` and
    normalised with ``mean``/``std`` (``raw=True``: un-normalised, in [0, 1]). Views are drawn one after the other
    from ``generator``. ``batch`` may be uint8 (0..255) or float in [0, 1]; half precision is augmented in float32.
    """

    def __init__(self, views: Sequence[ViewAugmentation], mean: Sequence[float], std: Sequence[float]) -> None:
        if not views:
            raise ConfigError("a view pipeline needs at least one view")
        channels = views[0].channels
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"mean/std need {channels} values for {channels}-channel images, got {mean} / {std}")
        self.views = list(views)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, batch: Tensor, generator: torch.Generator, *, raw: bool = False) -> list[Tensor]:
        if batch.ndim != 4 or batch.shape[1] != self.views[0].channels:
            raise ValueError(f"expected a batch [B, {self.views[0].channels}, H, W], got {tuple(batch.shape)}")
        batch = _as_unit_float(batch)
        views = [view(batch, generator) for view in self.views]
        return views if raw else [normalize(v, self.mean, self.std) for v in views]


PipelineBuilder = Callable[..., ViewPipeline]
AUGMENTATIONS: Registry[PipelineBuilder] = Registry("augmentation")


def make_pipeline(
    views: Sequence[Mapping[str, Any]],
    *,
    image_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    overrides: Mapping[str, Any],
) -> ViewPipeline:
    """A pipeline whose view ``i`` uses ``size_defaults(image_size)``, then ``views[i]``, then ``overrides``.

    ``overrides`` holds :class:`ViewConfig` fields (applied to every view) and optionally ``views``: a list with
    one dict of per-view fields per view (applied last).
    """
    overrides = dict(overrides)
    per_view = overrides.pop("views", None) or [{} for _ in views]
    if len(per_view) != len(views):
        raise ConfigError(f"augmentation 'views' needs {len(views)} entries (one per view), got {len(per_view)}")
    for settings in (overrides, *per_view):
        unknown = sorted(set(settings) - VIEW_FIELDS)
        if unknown:
            raise ConfigError(f"unknown augmentation settings {unknown}; choose from: {', '.join(sorted(VIEW_FIELDS))}")
    augmentations = [
        ViewAugmentation(
            ViewConfig(**{**size_defaults(image_size), **base, **overrides, **extra}),
            image_size=image_size,
            channels=channels,
        )
        for base, extra in zip(views, per_view, strict=True)
    ]
    return ViewPipeline(augmentations, mean, std)


@AUGMENTATIONS.register("simclr")
def simclr_views(
    *, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float], n_views: int = 2, **overrides: Any
) -> ViewPipeline:
    """SimCLR: ``n_views`` views of one distribution: crop, flip .5, jitter .8 (.4, .4, .4, .1), gray .2, blur .5."""
    view = {"jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "blur_p": 0.5}
    return make_pipeline(
        [view] * n_views, image_size=image_size, channels=channels, mean=mean, std=std, overrides=overrides
    )


@AUGMENTATIONS.register("byol")
def byol_views(
    *, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float], **overrides: Any
) -> ViewPipeline:
    """BYOL: two asymmetric views, jitter .8 (.4, .4, .2, .1), gray .2; blur 1.0 / 0.1, solarize 0 / 0.2."""
    common = {"jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
    views = [{**common, "blur_p": 1.0, "solarize_p": 0.0}, {**common, "blur_p": 0.1, "solarize_p": 0.2}]
    return make_pipeline(views, image_size=image_size, channels=channels, mean=mean, std=std, overrides=overrides)


@AUGMENTATIONS.register("mae")
def mae_view(
    *, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float], **overrides: Any
) -> ViewPipeline:
    """MAE: one view, random resized crop with area in (0.2, 1) and flip .5; no colour, blur or solarize."""
    view = {"crop_scale": (0.2, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
    return make_pipeline([view], image_size=image_size, channels=channels, mean=mean, std=std, overrides=overrides)


@AUGMENTATIONS.register("supervised")
def supervised_view(
    *, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float], **overrides: Any
) -> ViewPipeline:
    """Fine-tuning: one view, random resized crop with area in (0.5, 1) and flip .5; no colour, blur or solarize.

    (0.5, 1) is the crop the paper's fine-tuning code meant (it passed the range as the aspect ratio). Classification
    overrides crop and flip with what its dataset declares (:func:`finetune_view_settings`).
    """
    view = {"crop_scale": (0.5, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
    return make_pipeline([view], image_size=image_size, channels=channels, mean=mean, std=std, overrides=overrides)


def finetune_crop_scale(image_size: int) -> tuple[float, float]:
    """Fine-tuning crop area range: (0.8, 1) up to 16 px, where a (0.5, 1) crop cuts whole strokes or parts out of
    the object; (0.5, 1) above, the crop the paper's fine-tuning code meant (it passed the range as aspect ratio)."""
    return (0.8, 1.0) if image_size <= 16 else (0.5, 1.0)


def finetune_view_settings(info: DatasetInfo, image_size: int) -> dict[str, Any]:
    """The ``supervised`` view's overrides a dataset declares (:class:`~bissl.data.base.DatasetInfo`): flip
    probability 0.5 if ``mirror_invariant`` else 0; ``finetune_crop_scale``, default :func:`finetune_crop_scale`."""
    return {
        "flip_p": 0.5 if info.mirror_invariant else 0.0,
        "crop_scale": info.finetune_crop_scale or finetune_crop_scale(image_size),
    }


def build_view_augmentation(
    name: str, *, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float], **overrides: Any
) -> ViewPipeline:
    """The pipeline registered as ``name`` in ``AUGMENTATIONS``, with :class:`ViewConfig` ``overrides``."""
    return AUGMENTATIONS.get(name)(image_size=image_size, channels=channels, mean=mean, std=std, **overrides)
