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


class BatchStream:
    """An endless, seeded stream of batches over epochs, resumable from its position.

    ``position`` counts the batches drawn so far; batch ``k`` is batch ``k % per_epoch`` of epoch
    ``k // per_epoch``, whose order :class:`EpochBatchSampler` fixes from ``(seed, epoch)``. ``batch_size`` is
    the global batch; with ``world_size > 1`` this rank gets its shard of it. Loader workers are seeded from
    ``(seed, epoch, rank)``.
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
        self.position = position
        self.rank, self.world_size = rank, world_size
        self._iterator: Iterator[Any] | None = None

    @property
    def epoch(self) -> int:
        return self.position // self.per_epoch

    def _start_epoch(self) -> Iterator[Any]:
        sampler = EpochBatchSampler(
            len(self.dataset),  # type: ignore[arg-type]
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            start=self.position % self.per_epoch,
            rank=self.rank,
            world_size=self.world_size,
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            worker_init_fn=seed_worker,
            pin_memory=self.pin_memory,
            generator=make_generator(self.seed, "workers", self.epoch, self.rank),
        )
        return iter(loader)

    def __next__(self) -> Any:
        if self._iterator is None or self.position % self.per_epoch == 0:
            self._iterator = self._start_epoch()
        batch = next(self._iterator)
        self.position += 1
        return batch

    def __iter__(self) -> BatchStream:
        return self
