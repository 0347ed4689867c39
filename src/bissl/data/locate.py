"""Finding a dataset under the data root, downloading it on request, and carving splits a dataset lacks.

Root resolution: the ``root`` argument, else the ``BISSL_DATA_ROOT`` environment variable. Under it a dataset is
looked for in its usual folder names (torchvision's first), then in the root itself, so the root may also point
directly at the dataset's folder.

Carved splits: where a dataset has no official val (or test) split it is carved, stratified by class, from the
official train split (or from all images) with :func:`bissl.data.splits.stratified_split`: the test part is
``TEST_FRACTION`` drawn with a fixed seed (every run is evaluated on the same images), the val part is
``VAL_FRACTION`` of what remains, drawn with the run's ``seed``; train is the rest. The three never overlap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bissl.data.base import SPLITS, missing_data_error
from bissl.data.lazy import LazyImageDataset
from bissl.data.splits import fraction_sizes, stratified_split
from bissl.utils.errors import ConfigError, DataError

ROOT_ENV_VAR = "BISSL_DATA_ROOT"
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
TEST_SPLIT_SEED = 0  # carved test splits do not change with the run's seed

Fetch = Callable[[Path, str], None]  # (data root, split) -> downloads the dataset into the data root


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


def data_root(root: str | os.PathLike[str] | None) -> Path | None:
    """The ``root`` argument, else ``$BISSL_DATA_ROOT``, else ``None``."""
    chosen = root if root is not None else os.environ.get(ROOT_ENV_VAR) or None
    return Path(chosen).expanduser() if chosen is not None else None


@dataclass(frozen=True)
class OnDisk:
    """Where a dataset lives under the data root and how to get it.

    ``folders`` are the usual folder names under the root (the first is torchvision's; the root itself is tried
    last), ``marker`` a path inside the dataset folder that proves it is there, ``fetch`` a torchvision download
    into the data root (``None`` where it cannot be downloaded automatically).
    """

    name: str
    folders: tuple[str, ...]
    marker: str
    url: str
    fetch: Fetch | None = None

    def candidates(self, base: Path) -> list[Path]:
        return list(dict.fromkeys([base / folder for folder in self.folders] + [base]))

    def how(self) -> str:
        get = f"download it with --download or from {self.url}" if self.fetch else f"get it from {self.url}"
        return f"{get}, then pass --data-root DIR (or set {ROOT_ENV_VAR}) with DIR holding {self.folders[0]}/"

    def find(
        self, root: str | os.PathLike[str] | None, *, download: bool, split: str, marker: str | None = None
    ) -> Path:
        """The dataset folder (the one holding ``marker``), downloading it first if asked to and it is missing."""
        base = data_root(root)
        marker = marker or self.marker
        if base is None:
            raise missing_data_error(self.name, [], self.how())
        for folder in self.candidates(base):
            if (folder / marker).exists():
                return folder
        if download and self.fetch is not None:
            self.fetch(base, split)
            return self.find(base, download=False, split=split, marker=marker)
        raise missing_data_error(self.name, [str(folder / marker) for folder in self.candidates(base)], self.how())


def require(path: Path) -> Path:
    """``path``, or a one-line error saying the dataset folder holding it is incomplete."""
    if not path.exists():
        raise DataError(f"{path} is missing: the dataset folder is incomplete; re-extract or re-download it")
    return path


def read_lines(path: Path) -> list[str]:
    """The non-empty, non-comment lines of an index file (stripped)."""
    return [line.strip() for line in require(path).read_text().splitlines() if line.strip() and line[0] != "#"]


def lookup(mapping: dict[str, int], key: str, source: Path) -> int:
    """``mapping[key]``, or a one-line error naming the index file that used an unknown class."""
    try:
        return mapping[key]
    except KeyError:
        raise DataError(f"{source} names the unknown class {key!r}; the dataset's index files do not match") from None


def carve(pool: LazyImageDataset, split: str, seed: int, *, test: bool, val: bool = True) -> LazyImageDataset:
    """Take ``split`` out of ``pool`` (an official train split, or a folder holding everything).

    With ``test=True`` a fixed, stratified ``TEST_FRACTION`` of the pool is the test split; with ``val=True`` a
    stratified ``VAL_FRACTION`` of the rest, drawn with ``seed``, is val; what remains is train.
    """
    parts = [("test", TEST_FRACTION, TEST_SPLIT_SEED)] if test else []
    parts += [("val", VAL_FRACTION, seed)] if val else []
    if split != "train" and split not in [name for name, _, _ in parts]:
        raise ValueError(f"carve() does not carve a {split} split here; read the dataset's own {split} split")
    for name, fraction, part_seed in parts:
        kept, held = stratified_split(pool.targets, fraction_sizes(len(pool), (1 - fraction, fraction)), part_seed)
        if split == name:
            pool = pool.subset(held)
            break
        pool = pool.subset(kept)
    if len(pool) == 0:
        raise DataError(f"dataset {pool.info.name!r}: its carved {split} split is empty: too few images")
    return pool
