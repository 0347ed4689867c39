"""One optimizer step on a global batch: how its rows are dealt out, and how their gradients are accumulated.

Every rule deals row ``i`` of a global batch (in sampler order) to part ``i mod n``, so the rules compose:

* rank ``r`` of ``W`` processes holds rows ``r::W`` (:class:`~bissl.engine.sampling.EpochBatchSampler`);
* with ``grad_accumulation = A`` its local rows ``m::A`` are micro-batch ``m``: global rows ``s::S`` with
  ``S = W * A`` and ``s = r + W * m``;
* with ``V`` augmentation shards (``distributed.augment_shards``, a multiple of ``S``; default ``S``) micro-batch
  ``s`` splits further into ``V / S`` parts, part ``t`` being global rows ``v::V`` with ``v = s + S * t``, whose
  random views are drawn from the generator seeded by ``(seed, tag, step, v)`` (by ``(seed, tag, step)`` when
  ``V = 1``, as a single process has always done).

So the views of a step depend on ``(seed, step, V)`` only, never on how the shards are spread over processes and
micro-batches. What that gives, for runs with the same ``V`` (test: ``tests/stages/test_distributed.py``):

* ``W`` processes with ``distributed.sync_batchnorm`` (SimCLR negatives gathered across ranks) equal one process on
  the whole batch, to float rounding: the same views, BatchNorm statistics and contrastive negatives;
* ``W`` processes without it train the same weights as one process with ``grad_accumulation = W`` for losses
  that are a mean over samples (cross-entropy, BYOL): BatchNorm normalises each rank's (each micro-batch's) rows
  alone in both. Their BatchNorm running statistics differ (DDP copies rank 0's to every rank);
* with ``A > 1``, BatchNorm and SimCLR's negatives see one micro-batch (of every rank, when synchronised /
  gathered), ``1 / A`` of the batch: accumulation equals the unsplit batch only for models without BatchNorm in
  train mode and losses that are a mean over samples. Gradients are the mean over micro-batches, so the
  learning rate needs no change.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bissl.distributed import all_reduce_mean, rank, world
from bissl.utils.errors import ConfigError
from bissl.utils.precision import autocast
from bissl.utils.rows import Rows, is_rows
from bissl.utils.seed import make_generator

T = TypeVar("T")


def take_rows(batch: Any, start: int, step: int) -> Any:
    """Rows ``start::step`` of every tensor (and :class:`Rows`) in a (nested tuple / list / dict) batch."""
    if isinstance(batch, Tensor):
        return batch[start::step]
    if is_rows(batch):
        return Rows(batch[start::step])
    if isinstance(batch, (list, tuple)):
        return type(batch)(take_rows(item, start, step) for item in batch)
    if isinstance(batch, dict):
        return {key: take_rows(value, start, step) for key, value in batch.items()}
    raise TypeError(f"cannot split a batch holding {type(batch).__name__}; batches must hold tensors")


def cat_rows(batches: Sequence[Any]) -> Any:
    """The batches of the same structure concatenated along dim 0, tensor by tensor."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches))
    if is_rows(first):
        return Rows(row for rows in batches for row in rows)
    if isinstance(first, (list, tuple)):
        return type(first)(cat_rows(items) for items in zip(*batches, strict=True))
    if isinstance(first, dict):
        return {key: cat_rows([batch[key] for batch in batches]) for key in first}
    raise TypeError(f"cannot concatenate batches holding {type(first).__name__}")


@dataclass(frozen=True)
class BatchPlan:
    """This rank's part of a global batch of ``batch_size`` rows: micro-batches and augmentation shards (module doc)."""

    batch_size: int
    world_size: int = 1
    rank: int = 0
    accumulation: int = 1
    augment_shards: int = 1

    @classmethod
    def create(cls, batch_size: int, *, accumulation: int, augment_shards: int | None, batch_key: str) -> BatchPlan:
        """The plan for this process; a batch that does not split evenly is a :class:`ConfigError`."""
        split = world() * accumulation
        shards = split if augment_shards is None else augment_shards
        if batch_size % split:
            raise ConfigError(
                f"{batch_key}={batch_size} must be divisible by processes x grad_accumulation = {world()} x "
                f"{accumulation}; change one of them"
            )
        if shards % split or batch_size % shards:
            raise ConfigError(
                f"distributed.augment_shards={shards} must be a multiple of processes x grad_accumulation = {split} "
                f"and divide {batch_key}={batch_size}"
            )
        return cls(batch_size, world(), rank(), accumulation, shards)

    @property
    def micro_shards(self) -> int:
        """``S = world_size * accumulation``: the global batch's micro-batches over all ranks."""
        return self.world_size * self.accumulation

    def micro_batches(self, local_batch: T) -> list[tuple[int, T]]:
        """``(s, rows)`` for each micro-batch of this rank's part of the batch; ``s`` is its global shard index."""
        if self.accumulation == 1:
            return [(self.rank, local_batch)]
        return [
            (self.rank + self.world_size * m, take_rows(local_batch, m, self.accumulation))
            for m in range(self.accumulation)
        ]

    def generator(self, shard: int, *seed_parts: object) -> torch.Generator:
        """The random views' generator of augmentation shard ``shard`` (``seed_parts``: e.g. seed, tag, step)."""
        return make_generator(*seed_parts) if self.augment_shards == 1 else make_generator(*seed_parts, shard)

    def check_resumed(self, saved_shards: int) -> None:
        """Warn when a run continues with another number of augmentation shards than it was saved with."""
        if saved_shards != self.augment_shards:
            warnings.warn(
                f"this run drew its views in {saved_shards} shards and continues with {self.augment_shards} (the "
                "number of processes or grad_accumulation changed): from here on its views differ from an "
                f"uninterrupted run's; set distributed.augment_shards={saved_shards} to keep them",
                stacklevel=2,
            )

    def augment(self, fn: Callable[[Any, torch.Generator], T], micro_batch: Any, shard: int, *seed_parts: object) -> T:
        """``fn(rows, generator)`` applied to each augmentation shard of micro-batch ``shard``, results concatenated."""
        parts = self.augment_shards // self.micro_shards
        if parts == 1:
            return fn(micro_batch, self.generator(shard, *seed_parts))
        outputs = [
            fn(take_rows(micro_batch, t, parts), self.generator(shard + self.micro_shards * t, *seed_parts))
            for t in range(parts)
        ]
        return cat_rows(outputs)


class Objective(nn.Module):
    """The trained modules and their loss as one module, so that DDP sees one forward per micro-batch.

    ``Objective(lambda views: method.loss(backbone, views), backbone=backbone, pretext=method)``.
    """

    def __init__(self, loss: Callable[[Any], Tensor], **modules: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self._loss = loss

    def forward(self, batch: Any) -> Tensor:
        return self._loss(batch)


def use_channels_last(module: nn.Module, enabled: bool) -> None:
    """Store ``module``'s 4-D weights channels-last (NHWC): faster convolutions, on CPU too (1.1-1.2x measured in
    ``benchmarks/loops.py``); inputs need no change (convolutions take the weights' memory format)."""
    if enabled:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def accumulate_gradients(
    model: nn.Module, micro_batches: Sequence[Any], *, precision: str, device: torch.device
) -> Tensor:
    """Forward and backward of every micro-batch, each loss weighted ``1 / len(micro_batches)``.

    DDP synchronises the gradients once, in the last backward. Returns the loss of the whole global batch (the
    mean over micro-batches and ranks, detached), the same on every rank.
    """
    total = torch.zeros((), device=device)
    count = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        skip_sync = isinstance(model, DistributedDataParallel) and i < count - 1
        with model.no_sync() if skip_sync else contextlib.nullcontext():  # type: ignore[operator]
            with autocast(precision, device):
                loss = model(batch)
            (loss if count == 1 else loss / count).backward()
        total = total + loss.detach().float()
    return all_reduce_mean(total / count)
