"""Classification's fine-tuning augmentation follows what the dataset declares (DatasetInfo)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from bissl.config import DataConfig, DownstreamConfig
from bissl.data import build_dataset
from bissl.data.augment import finetune_crop_scale, finetune_view_settings
from bissl.data.base import DatasetInfo, TensorImageDataset
from bissl.downstream.classification import ClassificationTask

SIZE = 16


def _left_bright(n: int) -> torch.Tensor:
    """``n`` images whose left half is white, right half black: a crop of area >= 0.8 keeps more mass on the left
    (the crop centre moves at most ~12 % of the side), a mirror puts it on the right."""
    images = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8)
    images[..., : SIZE // 2] = 255
    return images


def _flipped_fraction(task: ClassificationTask, n: int = 400) -> float:
    images = _left_bright(n).float() / 255
    assert task.train_augment is not None
    out = task.train_augment(images, torch.Generator().manual_seed(0))
    left, right = out[..., : SIZE // 2].mean(dim=(1, 2, 3)), out[..., SIZE // 2 :].mean(dim=(1, 2, 3))
    return float((right > left).float().mean())


def _task(info: DatasetInfo, name: str = "digits", **params: Any) -> ClassificationTask:
    train = TensorImageDataset(_left_bright(4), [0, 1, 0, 1], info)
    cfg = DownstreamConfig(data=DataConfig(name=name, image_size=SIZE), params=params)
    return ClassificationTask.from_config(cfg, {"train": train, "val": train, "test": train})


def test_digits_fine_tuning_never_flips() -> None:
    digits = build_dataset("digits", "train", image_size=SIZE)
    assert not digits.info.mirror_invariant
    assert finetune_view_settings(digits.info, SIZE) == {"flip_p": 0.0, "crop_scale": (0.8, 1.0)}
    assert _flipped_fraction(_task(digits.info)) == 0.0


def test_users_declaration_is_honoured() -> None:
    mirrored = DatasetInfo("user_set", num_classes=2, channels=1, finetune_crop_scale=(0.9, 1.0))
    assert finetune_view_settings(mirrored, SIZE) == {"flip_p": 0.5, "crop_scale": (0.9, 1.0)}
    assert 0.4 < _flipped_fraction(_task(mirrored, "user_set")) < 0.6  # flips at p = 0.5
    glyphs = DatasetInfo("user_set", num_classes=2, channels=1, mirror_invariant=False)
    assert _flipped_fraction(_task(glyphs, "user_set")) == 0.0


def test_crop_scale_sized_to_the_image() -> None:
    assert finetune_crop_scale(8) == finetune_crop_scale(16) == (0.8, 1.0)
    assert finetune_crop_scale(96) == (0.5, 1.0)


def test_label_smoothing_and_augment_are_classifications_own_params() -> None:
    """#19 item 4: they moved from the generic downstream config into ``downstream.params`` (ClassificationConfig)."""
    info = DatasetInfo("user_set", num_classes=2, channels=1)
    default = _task(info, "user_set")
    assert default.label_smoothing == 0.0 and default.train_augment is not None
    task = _task(info, "user_set", label_smoothing=0.1, augment=False)
    assert task.label_smoothing == 0.1 and task.train_augment is None
    with pytest.raises(ValueError, match="label_smoothing"):
        _task(info, "user_set", label_smoothing=1.0)


def test_old_place_of_classification_options_moves_to_params_with_a_warning() -> None:
    """A config written before 0.2.0 (``downstream.label_smoothing`` / ``.augment``) still loads: a value other than
    the old default moves to ``params`` with a FutureWarning; the default, in every earlier run's config.yaml, is
    dropped silently; a clash with ``params`` is one error naming the new key (CHANGELOG, Migration)."""
    with pytest.warns(FutureWarning, match=r"downstream.label_smoothing is deprecated; set downstream.params"):
        cfg = DownstreamConfig.model_validate({"label_smoothing": 0.1, "augment": True})
    assert cfg.params == {"label_smoothing": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DownstreamConfig.model_validate({"label_smoothing": 0.0, "augment": True}) == DownstreamConfig()
    with pytest.raises(ValueError, match=r"augment and params.augment disagree; set params.augment only"):
        DownstreamConfig.model_validate({"augment": False, "params": {"augment": True}})


def test_few_shot_draw_follows_its_own_seed() -> None:
    """A study's replicate draws its own k images per class (``few_shot_seed``); unset, the draw is ``data.seed``'s."""
    data = DataConfig(name="digits", image_size=8)
    draw = lambda **kw: ClassificationTask.splits(DownstreamConfig(data=data, few_shot=5, **kw))  # noqa: E731
    default, own, again = draw(), draw(few_shot_seed=1), draw(few_shot_seed=1)
    assert default["train"].indices == draw(few_shot_seed=data.seed)["train"].indices
    assert own["train"].indices == again["train"].indices != default["train"].indices
    assert len(own["train"]) == 50 and len(own["val"]) == len(default["val"])
