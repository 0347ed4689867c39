"""``synthetic_detection``: a detection dataset drawn on the fly, offline and deterministic, for tests and CPU runs.

Each image is a textured background (a grey level with a tint, stripes at a random angle and frequency, pixel
noise) with 1..``max_objects`` objects of ``K`` classes pasted at random positions and sizes (a side of 20-45 %
of the image, aspect ratio 3:4..4:3), never overlapping, each in a colour that contrasts with the background.
The classes are taken in order from :data:`SHAPES`: ``"digit"`` (any of scikit-learn's handwritten digit glyphs,
which are embedded in scikit-learn, scaled up), ``"disc"``, ``"square"``, ``"triangle"``, ``"ring"``, ``"plus"``;
every class keeps its name when mirrored (``mirror_invariant=True``). A box is exact: the tight bounding box of
the object's painted pixels (continuous coordinates, :mod:`bissl.data.detection`).

Determinism: the layout of image ``i`` depends only on ``(seed, split, i)`` and its pixels on the same, so an
image never changes with the split's size; the test split ignores ``seed`` (every run is tested on the same
images, as carved test splits are, :mod:`bissl.data.locate`). Layouts (boxes, labels) are drawn when the dataset
is built, pixels when an item is read (1,000 images of 64 px: about 1 s on one busy CPU core). ``mean``/``std``
are measured on the first 128 train images at the requested size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np
import torch

from bissl.data.base import DATASETS, DatasetInfo, ImageDataset
from bissl.data.detection import DETECTION_KIND, Target, collate_detection, first_labels, make_target
from bissl.data.locate import check_split
from bissl.utils.errors import ConfigError
from bissl.utils.seed import derive_seed

SHAPES: tuple[str, ...] = ("digit", "disc", "square", "triangle", "ring", "plus")
DEFAULT_SIZES: dict[str, int] = {"train": 512, "val": 128, "test": 256}  # minutes per run on 2 CPU cores
DEFAULT_NUM_CLASSES = 4
SIDE_RANGE = (0.2, 0.45)  # object side as a fraction of the image side
MIN_SIDE = 4  # pixels
_PLACEMENT_TRIES = 20
_STATS_IMAGES = 128


@cache
def _glyphs() -> np.ndarray:
    """scikit-learn's 1,797 digit glyphs in [0, 1] (``[1797, 8, 8]``); faint pixels (< 0.25) set to 0."""
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import and needed only here

    glyphs = load_digits().images.astype(np.float32) / 16.0
    return np.where(glyphs >= 0.25, glyphs, 0.0).astype(np.float32)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(u, v)`` in [-1, 1] of an ``height x width`` patch (``u`` across, ``v`` down)."""
    u = (np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1
    v = (np.arange(height, dtype=np.float32) + 0.5) / height * 2 - 1
    return u[None, :], v[:, None]


def object_alpha(shape: str, height: int, width: int, glyph: int = 0) -> np.ndarray:
    """The opacity ``[height, width]`` in [0, 1] of one object; its non-zero pixels are the object."""
    if shape == "digit":
        image = _glyphs()[glyph]
        rows, cols = np.nonzero(image)
        if len(rows) == 0:  # no glyph is blank, but never paint an empty object
            return np.ones((height, width), dtype=np.float32)
        image = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        r = (np.arange(height) + 0.5) * image.shape[0] / height
        c = (np.arange(width) + 0.5) * image.shape[1] / width
        return image[r.astype(np.int64)[:, None], c.astype(np.int64)[None, :]]
    u, v = _grid(height, width)
    radius = u**2 + v**2
    if shape == "disc":
        mask = radius <= 1.0
    elif shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "triangle":  # apex at the top centre, base along the bottom
        mask = np.abs(u) <= (v + 1) / 2
    elif shape == "ring":
        mask = (radius <= 1.0) & (radius >= 0.36)
    elif shape == "plus":
        mask = (np.abs(u) <= 0.34) | (np.abs(v) <= 0.34)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    return np.broadcast_to(mask, (height, width)).astype(np.float32)


@cache
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Column and row index ``[size, size]`` (float32) of every pixel."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float32)
    return u, v


@lru_cache(maxsize=8192)
def _alpha(shape: str, height: int, width: int, glyph: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """:func:`object_alpha` as a read-only ``[1, height, width]`` array and the tight box of its non-zero pixels
    (relative to the patch), cached: objects repeat their sizes."""
    alpha = object_alpha(shape, height, width, glyph)
    rows, cols = np.nonzero(alpha > 0)
    alpha = alpha[None]
    alpha.flags.writeable = False
    return alpha, (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


class SyntheticDetection(ImageDataset):
    """``size`` images of ``image_size`` px with 1..``max_objects`` objects of the first ``num_classes`` shapes."""

    collate = staticmethod(collate_detection)

    def __init__(
        self,
        split: str,
        *,
        size: int,
        image_size: int,
        seed: int = 0,
        num_classes: int = DEFAULT_NUM_CLASSES,
        max_objects: int = 4,
        measure_stats: bool = True,
    ) -> None:
        check_split(split)
        if not 1 <= num_classes <= len(SHAPES):
            raise ConfigError(f"synthetic_detection has 1..{len(SHAPES)} classes, got num_classes={num_classes}")
        if image_size < 16 or max_objects < 1 or size < 0:
            raise ConfigError(
                f"synthetic_detection needs image_size >= 16, max_objects >= 1 and size >= 0; got {image_size}, "
                f"{max_objects}, {size}"
            )
        self.split = split
        self.seed = 0 if split == "test" else seed
        self.image_size = image_size
        self.num_classes = num_classes
        self.max_objects = max_objects
        # one entry per object: (class, glyph, x, y, height, width, tight box); boxes/labels as tensors per image
        self.layouts = [self._layout(index) for index in range(size)]
        self.boxes = [torch.tensor([o[-1] for o in layout], dtype=torch.float32) for layout in self.layouts]
        self.labels = [torch.tensor([o[0] for o in layout], dtype=torch.int64) for layout in self.layouts]
        self.targets = first_labels(self.labels)
        self.numbers = list(range(size))  # each item's image number (its pixels' seed): a subset keeps them
        mean, std = _train_stats(image_size, seed, num_classes, max_objects) if measure_stats else ((0.5,) * 3,) * 2
        self.info = DatasetInfo(
            name="synthetic_detection", num_classes=num_classes, channels=3, classes=list(SHAPES[:num_classes]),
            mean=mean, std=std, mirror_invariant=True, kind=DETECTION_KIND,
        )  # fmt: skip

    def _rng(self, index: int, what: str) -> np.random.Generator:
        return np.random.default_rng(derive_seed("synthetic_detection", self.seed, self.split, index, what))

    def _layout(self, index: int) -> list[tuple]:
        rng = self._rng(index, "layout")
        size = self.image_size
        placed: list[tuple] = []
        taken = np.zeros((0, 4))  # boxes placed so far, grown by a 1-px margin: objects never touch
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            label = int(rng.integers(self.num_classes))
            glyph = int(rng.integers(len(_glyphs()))) if SHAPES[label] == "digit" else 0
            side = rng.uniform(*SIDE_RANGE) * size
            aspect = float(np.sqrt(rng.uniform(0.75, 4 / 3)))
            height = min(max(round(side * aspect), MIN_SIDE), size)
            width = min(max(round(side / aspect), MIN_SIDE), size)
            xs = rng.integers(0, size - width + 1, size=_PLACEMENT_TRIES)
            ys = rng.integers(0, size - height + 1, size=_PLACEMENT_TRIES)
            clear = (
                (xs[:, None] >= taken[None, :, 2])
                | (xs[:, None] + width <= taken[None, :, 0])
                | (ys[:, None] >= taken[None, :, 3])
                | (ys[:, None] + height <= taken[None, :, 1])
            ).all(axis=1)
            if not clear.any():
                continue  # no room left for an object of this size: the image gets fewer objects
            x, y = int(xs[clear.argmax()]), int(ys[clear.argmax()])
            left, top, right, bottom = _alpha(SHAPES[label], height, width, glyph)[1]
            box = (x + left, y + top, x + right, y + bottom)
            placed.append((label, glyph, x, y, height, width, box))
            taken = np.concatenate([taken, [[x - 1, y - 1, x + width + 1, y + height + 1]]])
        return placed

    def render(self, index: int) -> np.ndarray:
        """The float32 image ``[3, S, S]`` in [0, 1] of item ``index``."""
        rng = self._rng(self.numbers[index], "pixels")
        grey = rng.uniform(0.2, 0.65)
        tint = rng.uniform(-0.06, 0.06, size=(3, 1, 1)).astype(np.float32)
        image = rng.random(size=(3, self.image_size, self.image_size), dtype=np.float32)  # uniform pixel noise
        image -= np.float32(0.5)
        image *= np.float32(rng.uniform(0.02, 0.2))
        image += tint + np.float32(grey)
        if rng.random() < 0.5:  # half the images striped, at a random angle, frequency and amplitude
            u, v = _pixel_grid(self.image_size)
            angle, frequency, amplitude = rng.uniform(0, np.pi), rng.uniform(0.15, 0.9), rng.uniform(0.02, 0.12)
            image += np.float32(amplitude) * np.sin(np.float32(frequency) * (u * np.cos(angle) + v * np.sin(angle)))
        for label, glyph, x, y, height, width, _ in self.layouts[index]:
            alpha = _alpha(SHAPES[label], height, width, glyph)[0]
            if grey < 0.42:  # bright objects on dark backgrounds, dark ones on bright backgrounds
                colour = rng.uniform(0.75, 1.0, size=3)
                colour[rng.integers(3)] = rng.uniform(0.0, 0.45)
            else:
                colour = rng.uniform(0.0, 0.2, size=3)
                colour[rng.integers(3)] = rng.uniform(0.45, 0.8)
            patch = image[:, y : y + height, x : x + width]
            patch += (colour.astype(np.float32)[:, None, None] - patch) * alpha
        return np.clip(image, 0.0, 1.0, out=image)

    def subset(self, indices: Sequence[int]) -> SyntheticDetection:
        """The items at ``indices`` (same images, boxes and info), e.g. for a low-data detection task."""
        new = copy.copy(self)
        chosen = [int(i) for i in indices]
        new.numbers = [self.numbers[i] for i in chosen]
        new.layouts = [self.layouts[i] for i in chosen]
        new.boxes, new.labels = [self.boxes[i] for i in chosen], [self.labels[i] for i in chosen]
        new.targets = [self.targets[i] for i in chosen]
        return new

    def target(self, index: int) -> Target:
        return make_target(self.boxes[index], self.labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return torch.from_numpy(self.render(index)), self.target(index)


@cache
def _train_stats(image_size: int, seed: int, num_classes: int, max_objects: int) -> tuple[tuple, tuple]:
    """Per-channel mean and std of the first ``_STATS_IMAGES`` train images."""
    probe = SyntheticDetection(
        "train", size=_STATS_IMAGES, image_size=image_size, seed=seed, num_classes=num_classes,
        max_objects=max_objects, measure_stats=False,
    )  # fmt: skip
    pixels = np.stack([probe.render(i) for i in range(_STATS_IMAGES)]).astype(np.float64)
    mean = pixels.mean(axis=(0, 2, 3))
    std = pixels.std(axis=(0, 2, 3), ddof=1)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


@DATASETS.register("synthetic_detection")
def synthetic_detection(
    split: str,
    *,
    root: str | None = None,
    image_size: int,
    download: bool = False,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    num_classes: int = DEFAULT_NUM_CLASSES,
    max_objects: int = 4,
) -> SyntheticDetection:
    """The ``split`` of the synthetic detection set: 512 / 128 / 256 images by default (``sizes`` overrides,
    e.g. ``{"train": 4096}``), ``num_classes`` of :data:`SHAPES`; ``root``/``download`` are not needed."""
    check_split(split)
    chosen = {**DEFAULT_SIZES, **(sizes or {})}
    return SyntheticDetection(
        split, size=chosen[split], image_size=image_size, seed=seed, num_classes=num_classes, max_objects=max_objects
    )
