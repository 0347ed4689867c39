"""Seeded, stratified, disjoint splits of a labelled dataset into parts of exact sizes.

The split is a pure function of ``(targets, sizes, seed)``: the same call returns the same indices in every run,
which is what makes train/val/test stable across the stages of a study.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch

from bissl.utils.seed import derive_seed

log = logging.getLogger("bissl.data")


def fraction_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Part sizes for ``n`` items: every part but the first gets ``round(n * f)``, the first gets the rest.

    E.g. ``fraction_sizes(1797, (0.6, 0.2, 0.2)) == [1079, 359, 359]``.
    """
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    tail = [round(n * f) for f in fractions[1:]]
    if sum(tail) > n:
        raise ValueError(f"cannot split {n} items into fractions {tuple(fractions)}")
    return [n - sum(tail), *tail]


def stratified_split(targets: Sequence[int] | torch.Tensor, sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Partition ``range(len(targets))`` into disjoint parts of exactly ``sizes[j]`` indices each (sorted ascending).

    Every class is spread over the parts in proportion to their sizes (to within one item per part): the items of
    each class are shuffled with a generator seeded from ``seed``, each item gets the key
    ``(rank within its class + 0.5) / class size``, all items are ordered by that key (ties in shuffled order), and
    the order is cut at the cumulative sizes.
    """
    labels = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else list(targets), dtype=np.int64)
    n = labels.size
    if any(s < 0 for s in sizes) or sum(sizes) != n:
        raise ValueError(f"split sizes {tuple(sizes)} must be non-negative and sum to the dataset size {n}")
    generator = torch.Generator().manual_seed(derive_seed("stratified_split", seed))
    perm = torch.randperm(n, generator=generator).numpy()
    shuffled = labels[perm] - (labels.min() if n else 0)
    by_class = np.argsort(shuffled, kind="stable")  # shuffled positions grouped by class, shuffled order kept
    counts = np.bincount(shuffled)
    starts = np.cumsum(counts) - counts
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - starts[shuffled[by_class]]
    key = (rank + 0.5) / counts[shuffled]
    order = perm[np.argsort(key, kind="stable")]
    bounds = np.cumsum([0, *sizes])
    parts = [sorted(order[lo:hi].tolist()) for lo, hi in pairwise(bounds)]
    _warn_missing_classes(labels, parts)
    return parts


def _warn_missing_classes(labels: np.ndarray, parts: list[list[int]]) -> None:
    """Say which classes have too few images to reach every (non-empty) part: their scores there are missing."""
    present = set(labels.tolist())
    for j, part in enumerate(parts):
        missing = sorted(present - set(labels[part].tolist())) if part else []
        if missing:
            counts = {c: int((labels == c).sum()) for c in missing[:5]}
            log.warning(
                "stratified split: part %d of %d (%d images) holds no image of class(es) %s (images in all: %s); "
                "too few to spread over every part",
                j, len(parts), len(part), missing, counts,
            )  # fmt: skip
