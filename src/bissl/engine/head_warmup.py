"""Downstream head warm-up: a linear probe of the task head on a frozen backbone (BiSSL's first step)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bissl.distributed import all_reduce_mean_
from bissl.downstream.base import DownstreamTask
from bissl.engine.guard import DivergenceGuard
from bissl.engine.microbatches import BatchPlan
from bissl.utils.precision import autocast


def warm_up_head(
    task: DownstreamTask,
    backbone: nn.Module,
    head: nn.Module,
    batches: Iterator[Any],
    *,
    steps: int,
    lr: float,
    device: torch.device,
    seed: int,
    plan: BatchPlan | None = None,
    precision: str = "fp32",
    lr_key: str = "bilevel.head_warmup_lr",
) -> float:
    """Train ``head`` for ``steps`` batches with the backbone frozen (eval mode, no gradients).

    SGD with momentum 0.9 and a cosine learning rate; returns the mean loss of the last 10 steps. Under DDP
    ``batches`` yields this rank's rows of each global batch and ``plan``
    (:class:`~bissl.engine.microbatches.BatchPlan`) says how their augmentation is drawn; the head's gradients and
    the losses are averaged over ranks, so every rank trains the same head as one process on the global batches
    (same augmentation shards). ``precision`` (resolved, :func:`~bissl.utils.precision.resolve_precision`):
    ``bf16`` runs the forward passes under autocast.
    """
    if steps == 0:
        return float("nan")
    requires = [p.requires_grad for p in backbone.parameters()]
    backbone.requires_grad_(False)
    modes = [(m, m.training) for m in backbone.modules()]  # each submodule's own mode (a user's frozen BN stays)
    backbone.eval()
    head.train()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    plan = plan if plan is not None else BatchPlan(batch_size=0)  # one process, one augmentation shard
    recent: list[float] = []
    guard = DivergenceGuard("head warm-up loss", lr_key, "head weights")  # NaN/inf, or a loss or head blown up

    def prepare(rows: Any, generator: torch.Generator) -> Any:
        return task.prepare(rows, device, generator)

    try:
        for step in range(steps):
            batch = plan.augment(prepare, next(batches), plan.rank, seed, "head_warmup", step)
            with autocast(precision, device):
                loss = task.loss(backbone, head, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = loss.detach().clone()
            all_reduce_mean_([*(p.grad for p in head.parameters() if p.grad is not None), value])
            guard.check(step, value, head.parameters())
            optimizer.step()
            scheduler.step()
            recent = [*recent[-9:], value.item()]
    finally:
        for param, flag in zip(backbone.parameters(), requires, strict=True):
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training
    return sum(recent) / len(recent)
