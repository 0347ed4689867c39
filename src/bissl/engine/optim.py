"""Optimisers (SGD, AdamW, LARS) by name, with biases and norm parameters excluded from weight decay,
and the cosine learning-rate schedule with linear warm-up.

Users add an optimiser with the registry the built-ins use::

    @OPTIMIZERS.register("adam")
    def adam(groups, s: OptimizerSettings, **options):
        return torch.optim.Adam(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, **options)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from bissl.utils.errors import ConfigError
from bissl.utils.registry import Registry


@dataclass(frozen=True)
class OptimizerSettings:
    """The settings every optimiser builder receives (each uses those it needs)."""

    lr: float
    weight_decay: float
    momentum: float
    betas: tuple[float, float]


ParamGroup = dict[str, Any]
OptimizerBuilder = Callable[..., Optimizer]  # (groups, settings, **options) -> Optimizer
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), per parameter tensor ``w``::

        d = grad + weight_decay * w
        d = d * eta * ||w|| / ||d||     (only if lars_adaptation and both norms > 0)
        m = momentum * m + d
        w = w - lr * m

    Groups with ``lars_adaptation=False`` (biases and norm parameters, see :func:`build_optimizer`) skip the
    scaling. ``eta`` is the trust coefficient.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[ParamGroup],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        lars_adaptation: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS settings: lr={lr}, momentum={momentum}, wd={weight_decay}, eta={eta}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_adaptation": lars_adaptation,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad.add(param, alpha=group["weight_decay"])
                if group["lars_adaptation"]:
                    w_norm = torch.linalg.vector_norm(param)
                    d_norm = torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
                    update.mul_(trust)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                param.add_(buf, alpha=-group["lr"])
        return loss


@OPTIMIZERS.register("sgd")
def sgd(groups: list[ParamGroup], s: OptimizerSettings, **options: Any) -> Optimizer:
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, **options)


@OPTIMIZERS.register("adamw")
def adamw(groups: list[ParamGroup], s: OptimizerSettings, **options: Any) -> Optimizer:
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, **options)


@OPTIMIZERS.register("lars")
def lars(groups: list[ParamGroup], s: OptimizerSettings, **options: Any) -> Optimizer:
    return LARS(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, **options)


def _split_bias_and_norm(groups: list[ParamGroup]) -> list[ParamGroup]:
    """Each group split in two: tensors with ``ndim > 1`` (weights) and the rest (biases, norm scales/shifts).

    The second part gets ``weight_decay=0`` and ``lars_adaptation=False``; other group options are kept.
    """
    split = []
    for group in groups:
        params = list(group["params"])
        weights = [p for p in params if p.ndim > 1]
        others = [p for p in params if p.ndim <= 1]
        if weights:
            split.append({**group, "params": weights})
        if others:
            split.append({**group, "params": others, "weight_decay": 0.0, "lars_adaptation": False})
    return split


def build_optimizer(
    name: str,
    params_or_groups: Iterable[Tensor] | Iterable[ParamGroup],
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    exclude_bias_and_norm: bool = True,
    **options: Any,
) -> Optimizer:
    """The registered optimiser ``name`` over parameters or param groups (dicts with ``"params"``).

    With ``exclude_bias_and_norm`` every 1-d tensor (biases, BatchNorm/LayerNorm weights) gets no weight
    decay and no LARS adaptation. ``options`` go to the optimiser (e.g. ``eta`` of LARS, ``nesterov`` of SGD).
    """
    items = list(params_or_groups)
    if not items:
        raise ConfigError("build_optimizer got no parameters to optimise")
    groups = [dict(item) for item in items] if isinstance(items[0], dict) else [{"params": items}]
    if exclude_bias_and_norm:
        groups = _split_bias_and_norm(groups)
    builder = OPTIMIZERS.get(name)
    return builder(groups, OptimizerSettings(lr, weight_decay, momentum, tuple(betas)), **options)


def cosine_with_warmup(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """LR factor at (0-based) step ``s``, with ``W`` warm-up steps, ``T`` steps in all and ``m = min_lr_ratio``::

        (s + 1) / W                                             for s < W
        m + (1 - m) * (1 + cos(pi * min(1, (s - W) / (T - W)))) / 2   otherwise

    so the LR rises linearly to its base value at step ``W - 1`` and decays to ``m`` times it at step ``T``.
    """
    if warmup_steps < 0 or total_steps < 0 or warmup_steps > total_steps or not 0 <= min_lr_ratio <= 1:
        raise ConfigError(
            f"invalid LR schedule: warmup_steps={warmup_steps}, total_steps={total_steps}, min_lr_ratio={min_lr_ratio}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2

    return LambdaLR(optimizer, factor)
