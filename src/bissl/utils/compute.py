"""What a run computed with its backbones: forward passes, backward passes, Hessian-vector products, images.

A :class:`ComputeCounter` is attached to every backbone a stage trains or scores (:meth:`ComputeCounter.watch`)
and counts where the work happens, with hooks on the backbone:

* ``forward``: calls of the backbone's ``forward`` (one batch each; a two-view pretext loss makes two), or of its
  ``feature_maps`` (the backbone contract's feature maps, which a detector reads instead of ``forward``), and
  ``images``: the rows of the batches it saw;
* ``backward``: the forward passes whose output received a gradient (counted once each: the Hessian-vector
  products that differentiate the same graph again are not backward passes of their own);
* ``hvp``: Hessian-vector products, added by the code that computes them (:class:`bissl.bilevel.BiSSLTrainer`).

The counter is a checkpointable object (``state_dict`` / ``load_state_dict``), so a resumed run continues its
counts, and :meth:`ComputeCounter.as_dict` is what a stage writes into ``summary.json`` under ``compute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

FIELDS = ("forward", "backward", "hvp", "images")


@dataclass
class ComputeCounter:
    """Counts of backbone work (module docstring); ``watch`` a module to count its passes."""

    forward: int = 0
    backward: int = 0
    hvp: int = 0
    images: int = 0

    def watch(self, module: nn.Module) -> RemovableHandle:
        """Count every forward pass of ``module`` (a ``forward`` or ``feature_maps`` call) and, once, the backward
        pass through its output."""
        if callable(getattr(type(module), "feature_maps", None)):
            module.__dict__["feature_maps"] = _CountedFeatureMaps(self, module)
        return module.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.forward += 1
        first = inputs[0] if inputs else None
        self.images += int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 0
        tensor = _first_tensor(output)
        if tensor is not None and tensor.requires_grad and torch.is_grad_enabled():
            fired = [False]

            def on_grad(grad: Tensor) -> None:
                if not fired[0]:
                    fired[0] = True
                    self.backward += 1

            tensor.register_hook(on_grad)

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in FIELDS}

    def state_dict(self) -> dict[str, int]:
        return self.as_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name in FIELDS:
            setattr(self, name, int(state.get(name, 0)))


class _CountedFeatureMaps:
    """A watched backbone's ``feature_maps``, counted as a forward pass. An object (not a closure) so that a deep
    copy of the backbone gets one bound to the copy, as its copied forward hook is."""

    def __init__(self, counter: ComputeCounter, module: nn.Module) -> None:
        self.counter, self.module = counter, module

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        maps = type(self.module).feature_maps(self.module, x, *args, **kwargs)  # type: ignore[attr-defined]
        self.counter._on_forward(self.module, (x,), maps)
        return maps


def _first_tensor(output: Any) -> Tensor | None:
    """The backbone's output tensor (the first of a tuple / list / dict of feature maps)."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, Tensor)), None)
