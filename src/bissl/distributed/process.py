"""The process group and its helpers: one process per device under ``torchrun``, nothing at all without it.

A stage calls :func:`init_from_env` first. Launched by ``torchrun`` (``WORLD_SIZE > 1`` in the environment,
with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` or torchrun's rendezvous store) it joins the
default process group: NCCL for CUDA devices (``cuda:LOCAL_RANK``), gloo on CPU. Otherwise nothing is
initialised and every helper here is a cheap no-op for a single process (rank 0 of 1), so the stages have one
code path. Multi-node runs differ only in torchrun's arguments.

Conventions the stages follow:

* every rank builds the same model from the same seed; :func:`wrap_ddp` wraps it in
  ``DistributedDataParallel`` (which also broadcasts rank 0's parameters and buffers once);
* files (config, logs, checkpoints, exports) are written by rank 0 only (:func:`is_main`, :func:`on_main`,
  :func:`main_only`), and :func:`barrier` makes the other ranks wait for them where they read them;
* evaluation splits are sharded without padding (:func:`shard_dataset`) and put back together in dataset order
  (:func:`gather_shards`), so metrics count every sample exactly once.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from bissl.utils.errors import ConfigError

log = logging.getLogger("bissl.distributed")

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible; set device=cpu or device=auto")
    return torch.device(name)


def init_from_env(device: str = "auto") -> torch.device:
    """Join torchrun's process group (once per process) and return this process's device.

    ``device`` is ``auto|cpu|cuda`` as in the configs; under torchrun ``cuda`` means ``cuda:LOCAL_RANK``. Without
    torchrun, or with a group the caller initialised already (e.g. ``init_process_group`` in a test), no new
    group is created. On ranks other than 0 the ``bissl`` loggers are quietened to warnings.
    """
    resolved = resolve_device(device)
    if resolved.type == "cuda" and "LOCAL_RANK" in os.environ:
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(resolved)
    if launched_by_torchrun() and not _initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", device_id=resolved if backend == "nccl" else None)
        atexit.register(cleanup)
        log.info("rank %d of %d joined the process group (%s, %s)", rank(), world(), backend, resolved)
    if not is_main():
        logging.getLogger("bissl").setLevel(logging.WARNING)
    return resolved


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (``WORLD_SIZE > 1`` in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cleanup() -> None:
    """Leave the process group (a no-op without one); :func:`init_from_env` registers it to run at exit."""
    if _initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if _initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if _initialized() else 0


def is_main() -> bool:
    """True on rank 0, the process that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here."""
    if world() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives need their tensors: the current CUDA device for NCCL, the CPU otherwise."""
    if world() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: Tensor | float) -> Tensor:
    """The sum over ranks of ``value`` (a copy; not differentiable: for metrics and logged losses, not gradients)."""
    tensor = torch.as_tensor(value).detach()
    if world() == 1:
        return tensor.clone()
    reduced = tensor.to(_comm_device(), copy=True)
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)


def all_reduce_mean(value: Tensor | float) -> Tensor:
    """The mean over ranks of ``value`` (see :func:`all_reduce_sum`)."""
    return all_reduce_sum(value) / world()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (any picklable object) on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return cast(T, box[0])


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank; an exception it raises is raised on all.

    For work that writes files or needs no parallelism (preparing the run folder, a linear probe): the other
    ranks wait in the broadcast, so they never run ahead of a folder rank 0 has not created yet.
    """
    if world() == 1:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks have been told
            error = exc
    shared_result, shared_error = broadcast_object((result, error))
    if error is not None:
        raise error
    if shared_error is not None:
        raise shared_error
    return cast(T, shared_result)


class _Silent:
    """Accepts every method call and does nothing: stands in for loggers and writers on ranks other than 0."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def main_only(factory: Callable[[], T]) -> T:
    """``factory()`` on rank 0; elsewhere an object whose every method call does nothing (e.g. a metric logger)."""
    return factory() if is_main() else cast(T, _Silent())


def shard_dataset(dataset: Dataset[Any]) -> Dataset[Any]:
    """This rank's strided shard (items ``rank, rank + world, ...``) for evaluation: no padding, no duplicates."""
    if world() == 1:
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world()))  # type: ignore[arg-type]


def gather_shards(rows: Tensor) -> Tensor:
    """Put the per-rank results of :func:`shard_dataset` shards back together, in dataset order, on every rank.

    ``rows[i]`` is this rank's result for item ``rank + i * world``; shards may differ in length by one (they are
    padded for the all-gather and cut back, so nothing is counted twice).
    """
    if world() == 1:
        return rows
    device = _comm_device()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([len(rows)], device=device))
    counts = [int(size.item()) for size in sizes]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]), device=device)
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    out = rows.new_empty((sum(counts), *rows.shape[1:]))
    for r, (part, count) in enumerate(zip(parts, counts, strict=True)):
        out[r :: world()] = part[:count].to(out.device)
    return out


def gather_rows(rows: Any) -> Any:
    """:func:`gather_shards` for a whole prediction, in dataset order, on every rank: a tensor (rows = samples), a
    tuple or dict of such (each gathered), or a list with one picklable entry per sample (gathered as objects)."""
    if world() == 1:
        return rows
    if isinstance(rows, Tensor):
        return gather_shards(rows)
    if isinstance(rows, dict):
        return {key: gather_rows(value) for key, value in rows.items()}
    if isinstance(rows, tuple):
        return type(rows)(gather_rows(value) for value in rows)
    if isinstance(rows, list):
        parts: list[list[Any]] = [[] for _ in range(world())]
        dist.all_gather_object(parts, rows)
        out: list[Any] = [None] * sum(len(p) for p in parts)
        for r, part in enumerate(parts):
            out[r :: world()] = part
        return out
    raise TypeError(f"cannot gather predictions of type {type(rows).__name__}; return tensors or per-sample lists")


class _AllReduceSum(torch.autograd.Function):
    """``sum over ranks`` with gradient (itself differentiable): each rank's gradient is the sum of all ranks'."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _AllReduceSum.apply(grad)


class _AllGatherRows(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order; the backward (itself differentiable) sums the ranks' gradients
    of the gathered rows and keeps this rank's block, so gradients and Hessian-vector products of the sum of the
    ranks' losses reach every rank's rows. It all-reduces the whole gathered gradient (gloo has no reduce-scatter):
    ``W`` times the traffic of a reduce-scatter, negligible for embeddings."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(world())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _AllReduceSum.apply(grad).narrow(0, rank() * ctx.rows, ctx.rows)


def sum_across_ranks(tensor: Tensor) -> Tensor:
    """The sum over ranks of ``tensor`` (``tensor`` itself in a single process), differentiable any number of times.

    For a cross-rank term inside a loss (Barlow Twins' cross-correlation, batch statistics of the global batch):
    its backward all-reduces the gradient, so each rank receives the gradient of the sum of the ranks' losses; when
    every rank computes the same loss from the summed value, the mean of the ranks' gradients (what DDP and
    :func:`all_reduce_mean_` take) is the gradient of that loss, and likewise for Hessian-vector products. Unlike
    :func:`all_reduce_sum` (a detached copy for metrics) it keeps the graph. Every rank must pass the same shape.
    """
    return tensor if world() == 1 else cast(Tensor, _AllReduceSum.apply(tensor))


def all_gather_rows(tensor: Tensor) -> Tensor:
    """The rows of ``tensor`` on every rank, concatenated in rank order (``tensor`` itself in a single process).

    Differentiable any number of times: the gradient of rank ``r``'s rows is the sum over ranks of the gradients
    of that block of the gathered tensor (what the sum of the ranks' losses asks for). Every rank must pass the
    same shape.
    """
    return tensor if world() == 1 else cast(Tensor, _AllGatherRows.apply(tensor))


def _flat_in_place(tensors: Sequence[Tensor], collective: Callable[[Tensor], object]) -> None:
    """Run ``collective`` on the tensors flattened into one buffer per dtype, and copy the result back in place."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    with torch.no_grad():
        for group in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(_comm_device())
            collective(flat)
            for tensor, chunk in zip(group, flat.split([t.numel() for t in group]), strict=True):
                tensor.copy_(chunk.view_as(tensor))


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Replace each floating-point tensor, in place, by its mean over ranks (not differentiable: for gradients,
    logged losses, Hessian-vector products).

    One collective per dtype; every rank must pass tensors of the same shapes and dtypes in the same order. The
    result is bit-identical on every rank (the collective hands one reduced value to all).
    """
    if world() > 1 and tensors:
        _flat_in_place(tensors, lambda flat: (dist.all_reduce(flat), flat.div_(world())))


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers of ``module`` (BatchNorm running statistics, ...) to every rank, as DDP does for
    BatchNorm layers that are not synchronised."""
    buffers = list(module.buffers())
    if world() > 1 and buffers:
        _flat_in_place(buffers, lambda flat: dist.broadcast(flat, src=src))


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm with statistics over the samples of every rank, for devices ``nn.SyncBatchNorm`` refuses (CPU).

    Two differentiable all-reduces (sums, then centred sums of squares) per layer; forward, gradients and running
    statistics equal a ``BatchNorm`` on the concatenated batch. Without a process group, or in eval mode, it is a
    plain BatchNorm. Meant for gloo runs and tests; CUDA runs use ``nn.SyncBatchNorm``.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and world() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        local_count = input.new_full((1,), float(input.numel() // input.shape[1]))
        sums = _AllReduceSum.apply(torch.cat([input.sum(dims), local_count]))  # channel sums and sample count
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = input - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), factor)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a synchronised one (``nn.SyncBatchNorm`` on CUDA, else
    :class:`GlobalBatchNorm`), keeping its parameter objects, buffers and mode; returns the (new) root."""
    if isinstance(module, _BatchNorm) and not isinstance(module, (nn.SyncBatchNorm, GlobalBatchNorm)):
        cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
        synced = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def wrap_ddp(module: nn.Module, device: torch.device, *, sync_batchnorm: bool = False) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` (BatchNorms synchronised first with ``sync_batchnorm``); the module
    itself in a single process. Its submodules are converted in place, so references to them stay valid."""
    if world() == 1:
        return module
    if sync_batchnorm:
        module = convert_sync_batchnorm(module, device)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``module`` itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def require_in_sync(module: nn.Module, what: str) -> None:
    """Raise ``RuntimeError`` unless every rank holds bit-identical parameters and buffers in ``module``."""
    if world() == 1:
        return
    tensors = [t.detach() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if not tensors:
        return
    checksum = torch.stack([torch.stack([t.double().sum(), t.double().abs().sum()]) for t in tensors]).flatten()
    checksum = checksum.to(_comm_device())
    parts = [torch.empty_like(checksum) for _ in range(world())]
    dist.all_gather(parts, checksum)
    if not all(torch.equal(parts[0], part) for part in parts[1:]):
        raise RuntimeError(f"{what} differs between ranks; every rank must build it from the same seed and state")
