"""Seeded, resumable batch order: epoch ``e`` shuffles with a generator derived from ``(seed, e)``.

Because the order depends only on the seed and the epoch, a run resumed at any step sees exactly the
batches an uninterrupted run would have seen. With ``world_size > 1`` every rank takes a disjoint
strided shard of each global batch, so the union over ranks equals the single-process batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bissl.data.base import collate_of
from bissl.utils.seed import make_generator, seed_worker


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices for one epoch, starting at batch ``start`` (for mid-epoch resume)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        start: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the world size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed, self.epoch, self.start = seed, epoch, start
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size

    def num_batches(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=make_generator(self.seed, "shuffle", self.epoch))
        else:
            order = torch.arange(self.num_samples)
        for b in range(self.start, self.num_batches()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.rank :: self.world_size].tolist()


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch with ``drop_last=True`` (at least one batch is required)."""
    return num_samples // batch_size


class StreamBatchSampler(Sampler[list[int]]):
    """The batches of epochs ``start // per_epoch, ...`` without end, from global batch ``start`` on.

    Each epoch's order is :class:`EpochBatchSampler`'s, so the stream is the same batches whether it is read in
    one go or resumed at any position.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, start: int, rank: int, world_size: int) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self.per_epoch = steps_per_epoch(num_samples, batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            yield from EpochBatchSampler(
                self.num_samples, self.batch_size, seed=self.seed, epoch=epoch, start=offset,
                rank=self.rank, world_size=self.world_size,
            )  # fmt: skip
            epoch, offset = epoch + 1, 0


class BatchStream:
    """An endless, seeded stream of batches over epochs, resumable from its position.

    ``position`` counts the batches drawn so far; batch ``k`` is batch ``k % per_epoch`` of epoch
    ``k // per_epoch``, whose order :class:`EpochBatchSampler` fixes from ``(seed, epoch)``. ``batch_size`` is
    the global batch; with ``world_size > 1`` this rank gets its shard of it.

    One ``DataLoader`` iterates over every epoch, so its workers live as long as the stream (re-spawning them at
    each epoch made loading with workers slower than without, ``benchmarks/README.md``); setting ``position``
    starts a new one there. Workers are seeded from ``(seed, position at start, rank)``: datasets load
    deterministically (random views are drawn in the main process from seeded generators), so which worker loads
    a batch never changes it. A dataset whose items do not stack (detection targets) declares a ``collate``
    (:func:`bissl.data.base.collate_of`); the stream batches with it.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        *,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        position: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.per_epoch = steps_per_epoch(len(dataset), batch_size)  # type: ignore[arg-type]
        self.rank, self.world_size = rank, world_size
        self._position = position
        self._iterator: Iterator[Any] | None = None

    @property
    def position(self) -> int:
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        if value != self._position:
            self._iterator = None
        self._position = value

    @property
    def epoch(self) -> int:
        return self.position // self.per_epoch

    def _start(self) -> Iterator[Any]:
        sampler = StreamBatchSampler(
            len(self.dataset),  # type: ignore[arg-type]
            self.batch_size, seed=self.seed, start=self.position, rank=self.rank, world_size=self.world_size,
        )  # fmt: skip
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            worker_init_fn=seed_worker,
            pin_memory=self.pin_memory,
            collate_fn=collate_of(self.dataset),
            generator=make_generator(self.seed, "workers", self.position, self.rank),
        )
        return iter(loader)

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self._position += 1
        return batch

    def __iter__(self) -> BatchStream:
        return self
