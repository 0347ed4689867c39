"""Downstream head warm-up: a linear probe of the task head on a frozen backbone (BiSSL's first step)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bissl.downstream.base import DownstreamTask
from bissl.utils.numerics import require_finite
from bissl.utils.seed import make_generator


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
) -> float:
    """Train ``head`` for ``steps`` batches with the backbone frozen (eval mode, no gradients).

    SGD with momentum 0.9 and a cosine learning rate; returns the mean loss of the last 10 steps.
    """
    if steps == 0:
        return float("nan")
    requires = [p.requires_grad for p in backbone.parameters()]
    backbone.requires_grad_(False)
    was_training = backbone.training
    backbone.eval()
    head.train()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    recent: list[float] = []
    try:
        for step in range(steps):
            batch = task.prepare(next(batches), device, make_generator(seed, "head_warmup", step))
            loss = task.loss(backbone, head, batch)
            require_finite(loss, f"head warm-up loss at step {step}", "lower bilevel.head_warmup_lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            recent = [*recent[-9:], loss.item()]
    finally:
        for param, flag in zip(backbone.parameters(), requires, strict=True):
            param.requires_grad_(flag)
        backbone.train(was_training)
    return sum(recent) / len(recent)
