"""Divergence guard: a run stops, naming the step and the setting to change, when its loss or weights leave their
starting range — not only on NaN/inf.

``check(step, loss, params)`` raises :class:`~bissl.utils.errors.NonFiniteError` when the loss is NaN/inf, when
``|loss|`` exceeds ``loss_factor x (1 + max |loss|)`` over the first ``warmup`` checks, or when the parameters'
global norm exceeds ``norm_factor x`` its norm at the first check (e.g. pretraining at lr 1e6 keeps a bounded
contrastive loss while the weights reach 1e29). The defaults leave ordinary training far inside the range: a
cross-entropy of 2.3 may grow to 330 and weights to 100x their starting norm before the run is stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor

from bissl.utils.errors import NonFiniteError


@dataclass
class DivergenceGuard:
    """Watches one loss and one set of weights (module docstring); ``what`` and ``setting`` name them in errors."""

    what: str = "loss"
    setting: str = "optim.lr"
    weights: str = "weights"
    loss_factor: float = 100.0
    norm_factor: float = 100.0
    warmup: int = 10
    _losses: list[float] = field(default_factory=list)
    _norm0: float | None = None

    def check(self, step: int, loss: float | Tensor, params: Iterable[Tensor] = ()) -> None:
        value = float(loss)
        where = f"{self.what} at step {step}"
        if not math.isfinite(value):
            raise NonFiniteError(f"{where} became {value}; lower {self.setting} or set a gradient clip")
        if len(self._losses) < self.warmup:
            self._losses.append(abs(value))
        elif abs(value) > self.loss_factor * (1 + max(self._losses)):
            raise NonFiniteError(
                f"{where} is {value:.4g}, over {self.loss_factor:g}x its starting range (<= {max(self._losses):.4g}): "
                f"the run diverged; lower {self.setting}"
            )
        params = list(params)
        if not params:
            return
        norm = math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in params))
        if not math.isfinite(norm):
            raise NonFiniteError(f"the {self.weights} became NaN/inf at step {step}; lower {self.setting}")
        if self._norm0 is None:
            self._norm0 = norm
        elif norm > self.norm_factor * max(self._norm0, 1e-12):
            raise NonFiniteError(
                f"the norm of the {self.weights} at step {step} is {norm:.3g}, {norm / self._norm0:.3g}x its start "
                f"({self._norm0:.3g}): the run diverged; lower {self.setting}"
            )

    def state_dict(self) -> dict[str, object]:
        return {"losses": list(self._losses), "norm0": self._norm0}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._losses = [float(v) for v in state["losses"]]  # type: ignore[union-attr]
        self._norm0 = None if state["norm0"] is None else float(state["norm0"])  # type: ignore[arg-type]
