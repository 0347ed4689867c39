"""Per-row lists in a batch: what the engine splits and joins row by row besides tensors
(:mod:`bissl.engine.microbatches`)."""

from __future__ import annotations

from typing import Any


class Rows(list):  # type: ignore[type-arg]
    """A list with one entry per row of a batch (e.g. per-image detection targets), split and joined as rows.

    A plain ``list`` in a batch is a list of parts, each split row-wise (the views of a pretext batch); a ``Rows``, or
    a plain list whose entries are dicts (what a dataset's ``collate`` returns for per-image targets: no batch part
    is ever a dict of a list of dicts), is the rows themselves.
    """


def is_rows(batch: Any) -> bool:
    """Whether ``batch`` is a list of rows (:class:`Rows`, or a list of per-row dicts) rather than of parts."""
    return isinstance(batch, Rows) or (isinstance(batch, list) and bool(batch) and isinstance(batch[0], dict))
