"""Batched per-sample view augmentations."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from bissl.data.augment import (
    AUGMENTATIONS,
    N_UNIFORMS,
    ViewConfig,
    ViewPipeline,
    build_view_augmentation,
    color_jitter,
    gaussian_blur,
    make_pipeline,
    normalize,
    shift_hue,
    size_defaults,
)
from bissl.utils.errors import ConfigError

PLAIN = {"flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}  # crop only


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=gen(seed))


def pipeline(name: str, channels: int, size: int, **overrides) -> ViewPipeline:
    stats = [0.4] * channels, [0.2] * channels
    return build_view_augmentation(name, image_size=size, channels=channels, mean=stats[0], std=stats[1], **overrides)


@pytest.mark.parametrize(("name", "n_views"), [("simclr", 2), ("byol", 2), ("supervised", 1)])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_ranges_and_normalisation(name: str, n_views: int, channels: int) -> None:
    augment = pipeline(name, channels, 16)
    batch = images(8, channels, 20)  # any input size: views come out at image_size
    raw = augment(batch, gen(1), raw=True)
    assert len(raw) == n_views
    for view in raw:
        assert view.shape == (8, channels, 16, 16) and view.dtype == torch.float32
        assert view.min() >= 0.0 and view.max() <= 1.0
    normalised = augment(batch, gen(1))
    for view, plain in zip(normalised, raw, strict=True):
        torch.testing.assert_close(view, (plain - 0.4) / 0.2)


def test_every_sample_gets_its_own_parameters() -> None:
    augment = pipeline("simclr", 3, 16)
    batch = images(1, 3, 16).expand(6, -1, -1, -1)  # six identical images
    first, second = augment(batch, gen(0))
    for view in (first, second):
        distinct = {view[i].numpy().tobytes() for i in range(6)}
        assert len(distinct) == 6
    assert not torch.equal(first, second)


def test_same_seed_same_views_and_generator_advances() -> None:
    augment = pipeline("byol", 1, 16)
    batch = images(5, 1, 16)
    a, b = augment(batch, gen(7)), augment(batch, gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    generator = gen(7)
    once, twice = augment(batch, generator), augment(batch, generator)
    assert not torch.equal(once[0], twice[0])
    assert not torch.equal(augment(batch, gen(8))[0], a[0])


@pytest.mark.parametrize("channels", [1, 3])
def test_full_crop_without_other_stages_is_the_identity(channels: int) -> None:
    batch = images(4, channels, 12)
    (view,) = pipeline("supervised", channels, 12, crop_scale=(1.0, 1.0), flip_p=0.0)(batch, gen(), raw=True)
    torch.testing.assert_close(view, batch, atol=1e-6, rtol=0)
    (flipped,) = pipeline("supervised", channels, 12, crop_scale=(1.0, 1.0), flip_p=1.0)(batch, gen(), raw=True)
    torch.testing.assert_close(flipped, batch.flip(-1), atol=1e-6, rtol=0)


def test_rot90_turns_each_view_by_a_uniform_multiple_of_90_degrees() -> None:
    batch = images(600, 1, 8)
    full = {"crop_scale": (1.0, 1.0), "flip_p": 0.0}
    (view,) = pipeline("supervised", 1, 8, rot90_p=0.75, **full)(batch, gen(), raw=True)
    turns = []
    for image, turned in zip(batch, view, strict=True):  # each view is its image turned exactly by k * 90 degrees
        matches = [k for k in range(4) if torch.allclose(torch.rot90(image, k, dims=(1, 2)), turned, atol=1e-6)]
        assert len(matches) == 1
        turns += matches
    counts = torch.bincount(torch.tensor(turns), minlength=4) / len(turns)
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.05)  # rot90_p = 0.75: uniform over 0..270
    (plain,) = pipeline("supervised", 1, 8, rot90_p=0.0, **full)(batch, gen(), raw=True)
    (default,) = pipeline("supervised", 1, 8, **full)(batch, gen(), raw=True)
    assert torch.equal(plain, default)  # off: the random stream and the views are those of before
    with pytest.raises(ConfigError, match="rot90_p must lie in"):
        ViewConfig(rot90_p=1.5)


@pytest.mark.parametrize(("scale", "ratio"), [((0.5, 1.0), (3 / 4, 4 / 3)), ((0.1, 0.3), (0.5, 2.0))])
def test_crops_respect_area_and_ratio_and_stay_inside(scale, ratio) -> None:
    size, batch = 16, 512
    view = make_pipeline(
        [PLAIN], image_size=size, channels=1, mean=[0], std=[1], overrides={"crop_scale": scale, "crop_ratio": ratio}
    ).views[0]
    grid = view.crop_grid(torch.rand(batch, N_UNIFORMS, generator=gen(3)), size, size)
    span = 2 * (1 - 1 / size)  # distance between the first and last output pixel centres at scale 1
    width = (grid[:, 0, -1, 0] - grid[:, 0, 0, 0]) / span
    height = (grid[:, -1, 0, 1] - grid[:, 0, 0, 1]) / span
    area, aspect = width * height, width / height
    assert area.min() >= scale[0] - 1e-5 and area.max() <= scale[1] + 1e-5
    assert aspect.min() >= ratio[0] - 1e-5 and aspect.max() <= ratio[1] + 1e-5
    assert area.max() - area.min() > 0.5 * (scale[1] - scale[0])  # the whole range is used
    left = grid[:, 0, 0, 0] - width / size  # pixel-centre grid -> crop edges
    right = grid[:, 0, -1, 0] + width / size
    assert left.min() >= -1 - 1e-5 and right.max() <= 1 + 1e-5


def test_grayscale_solarize_and_blur_stages() -> None:
    batch = images(6, 3, 16)
    full_crop = {**PLAIN, "crop_scale": (1.0, 1.0)}
    (gray,) = make_pipeline(
        [full_crop], image_size=16, channels=3, mean=[0] * 3, std=[1] * 3, overrides={"grayscale_p": 1.0}
    )(batch, gen(), raw=True)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    (solarized,) = make_pipeline(
        [full_crop], image_size=16, channels=3, mean=[0] * 3, std=[1] * 3, overrides={"solarize_p": 1.0}
    )(batch, gen(), raw=True)
    torch.testing.assert_close(solarized, torch.where(batch >= 0.5, 1 - batch, batch), atol=1e-6, rtol=0)
    (blurred,) = make_pipeline(
        [full_crop],
        image_size=16,
        channels=3,
        mean=[0] * 3,
        std=[1] * 3,
        overrides={"blur_p": 1.0, "blur_sigma": (1.0, 1.0)},
    )(batch, gen(), raw=True)
    torch.testing.assert_close(blurred, gaussian_blur(batch, 3, torch.ones(6)))
    assert blurred.var(dim=(2, 3)).mean() < 0.5 * batch.var(dim=(2, 3)).mean()


def test_one_channel_jitter_is_brightness_and_contrast_only() -> None:
    batch = images(4, 1, 16)
    settings = {**PLAIN, "crop_scale": (1.0, 1.0), "jitter_p": 1.0, "grayscale_p": 1.0}
    (view,) = make_pipeline([settings], image_size=16, channels=1, mean=[0], std=[1], overrides={})(batch, gen())
    assert view.shape == batch.shape and not torch.allclose(view, batch)
    settings.update(brightness=0.0, contrast=0.0)  # saturation and hue do not apply to grey images
    (view,) = make_pipeline([settings], image_size=16, channels=1, mean=[0], std=[1], overrides={})(batch, gen())
    torch.testing.assert_close(view, batch, atol=1e-6, rtol=0)


def test_functional_stages_match_torchvision() -> None:
    batch = images(6, 3, 16)
    brightness, contrast = torch.tensor([0.7, 1.3, 1.0, 0.9, 1.1, 0.6]), torch.tensor([0.6, 1.4, 1.0, 1.2, 0.8, 1])
    saturation, hue = torch.tensor([0.6, 1.4, 1.0, 0.0, 1.2, 0.9]), torch.tensor([0.1, -0.1, 0.0, 0.05, -0.5, 0.5])
    expected = []
    for i in range(6):
        x = TF.adjust_brightness(batch[i], float(brightness[i]))
        x = TF.adjust_contrast(x, float(contrast[i]))
        x = TF.adjust_saturation(x, float(saturation[i]))
        expected.append(TF.adjust_hue(x, float(hue[i])))
    jittered = color_jitter(batch.clone(), brightness, contrast, saturation, hue)
    torch.testing.assert_close(jittered, torch.stack(expected), atol=1e-3, rtol=0)  # luma 0.299 vs tv's 0.2989
    hue_only = torch.stack([TF.adjust_hue(batch[i], float(hue[i])) for i in range(6)])
    torch.testing.assert_close(shift_hue(batch, hue), hue_only, atol=1e-5, rtol=0)
    sigma = torch.tensor([0.3, 0.8, 1.5, 2.0, 0.0, 1.0])
    blurred = torch.stack(
        [TF.gaussian_blur(batch[i], [5, 5], [float(sigma[i])] * 2) if sigma[i] > 0 else batch[i] for i in range(6)]
    )
    torch.testing.assert_close(gaussian_blur(batch, 5, sigma), blurred, atol=1e-5, rtol=0)


def test_uint8_batches_and_normalize() -> None:
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen())
    augment = pipeline("simclr", 3, 8)
    for a, b in zip(augment(batch, gen(2)), augment(batch.float() / 255, gen(2)), strict=True):
        torch.testing.assert_close(a, b)
    normalised = normalize(batch, [0.5, 0.4, 0.3], [0.1, 0.2, 0.3])
    torch.testing.assert_close(normalised[:, 2], (batch[:, 2].float() / 255 - 0.3) / 0.3)


def test_size_defaults() -> None:
    assert size_defaults(224) == {"crop_scale": (0.08, 1.0), "blur_kernel": 23, "blur_sigma": (0.1, 2.0)}
    assert size_defaults(32)["crop_scale"] == (0.2, 1.0) and size_defaults(32)["blur_kernel"] == 3
    assert size_defaults(16)["crop_scale"] == (0.3, 1.0)
    assert size_defaults(96)["blur_kernel"] % 2 == 1
    assert size_defaults(32)["blur_sigma"] == pytest.approx((0.05, 1.0))


def test_configuration_errors_and_user_pipelines() -> None:
    with pytest.raises(ConfigError, match="unknown augmentation 'simclrr'"):
        pipeline("simclrr", 1, 16)
    with pytest.raises(ConfigError, match=r"unknown augmentation settings \['blur'\]"):
        pipeline("simclr", 1, 16, blur=0.5)
    with pytest.raises(ConfigError, match="crop_scale is an area fraction"):
        pipeline("simclr", 1, 16, crop_scale=(0.5, 2.0))
    with pytest.raises(ConfigError, match="1- or 3-channel"):
        pipeline("simclr", 2, 16)
    with pytest.raises(ConfigError, match="'views' needs 2 entries"):
        pipeline("byol", 1, 16, views=[{}])
    assert ViewConfig(crop_scale=[0.2, 1]).crop_scale == (0.2, 1.0)  # YAML lists become tuples

    per_view = pipeline("byol", 1, 16, views=[{"blur_p": 0.0}, {"solarize_p": 1.0}])
    assert per_view.views[0].config.blur_p == 0.0 and per_view.views[1].config.solarize_p == 1.0
    assert pipeline("simclr", 1, 16, n_views=4)(images(2, 1, 16), gen()).__len__() == 4

    @AUGMENTATIONS.register("test_three_crops", overwrite=True)
    def three_crops(*, image_size, channels, mean, std, **overrides) -> ViewPipeline:
        return make_pipeline(
            [PLAIN] * 3, image_size=image_size, channels=channels, mean=mean, std=std, overrides=overrides
        )

    assert len(pipeline("test_three_crops", 3, 8)(images(2, 3, 8), gen())) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu_with_cpu_or_cuda_generators() -> None:
    augment = pipeline("byol", 3, 16)
    batch = images(8, 3, 16)
    on_cpu = augment(batch, gen(4))
    on_gpu = augment(batch.cuda(), gen(4))
    for a, b in zip(on_cpu, on_gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
    cuda_generator = torch.Generator(device="cuda").manual_seed(4)
    views = augment(batch.cuda(), cuda_generator)
    assert all(v.is_cuda and v.shape == (8, 3, 16, 16) for v in views)
