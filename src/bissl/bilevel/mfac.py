"""M-FAC: the implicit Jacobian with the Hessian replaced by the empirical Fisher of recent lower-level gradients.

With ``g_1..g_n`` the last ``n <= m`` flattened pretext gradients of the lower backbone (recorded by the lower steps,
before the proximal term) and ``F = (1/n) sum_i g_i g_i^T``, the hypergradient ``mu (H + mu I)^-1 v`` of the other
solvers becomes::

    x = mu (F + mu I)^-1 v = (I + F/mu)^-1 v,      mu = lam + damping (the same damping as every other solver)

so ``identity`` is its ``F = 0`` limit. ``F`` is taken block-diagonal: for each block ``b`` of coordinates (one
parameter tensor, or consecutive chunks of ``block_size`` entries) with ``G_b`` the ``n x d_b`` rows of the window,
the Woodbury identity (the closed form of M-FAC's rank-one recursion) gives::

    x_b = v_b - G_b^T (n mu I_n + G_b G_b^T)^-1 G_b v_b

Set-up (the Gram matrices ``G_b G_b^T`` and their Cholesky factors): ``O(n^2 d)`` once per cycle; each solve:
``O(n d)``, no Hessian-vector products. Memory: the ``m x d`` window. The Fisher is a different operator from the
pretext Hessian, so the error against a converged Hessian solve does not measure its worth; downstream accuracy
does (BiSSLight, the paper authors' follow-up, uses it in place of CG).

:class:`MFACInverse` is an :class:`~bissl.bilevel.implicit.InverseOperator` like any other: pass it to
:func:`~bissl.bilevel.implicit_gradient`, which applies it instead of running a solver. Its Fisher comes from the
lower steps' gradients, which :class:`~bissl.bilevel.trainer.BiSSLTrainer` records in a :class:`GradientWindow`
when ``bilevel.solver.name`` names an entry of :data:`INVERSES` (``mfac``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bissl.bilevel.implicit import InverseOperator
from bissl.bilevel.solvers import SolveInfo, _rhs_norm
from bissl.utils.errors import ConfigError, NonFiniteError
from bissl.utils.registry import Registry

STORAGES: tuple[str, ...] = ("fp32", "bf16", "fp16", "cpu")


class GradientWindow:
    """Ring buffer of the last ``size`` flattened gradients (``size x numel``, preallocated on first push).

    ``storage``: ``fp32`` (the gradients' dtype and device), ``bf16`` / ``fp16`` (half the memory, on the gradients'
    device; rows rounded once when pushed) or ``cpu`` (the gradients' dtype in host memory, moved block by block
    when used). :class:`MFACInverse` computes in the right-hand side's dtype (fp32) whatever the storage: each block is
    cast (and moved) when used, the Gram matrices are formed in fp32 and factorised in fp64.
    """

    def __init__(self, size: int, storage: str = "fp32") -> None:
        if size < 1:
            raise ConfigError(f"bilevel.solver.mfac_window={size} must be >= 1 (the paper's follow-up uses N_L = 20)")
        if storage not in STORAGES:
            raise ConfigError(f"bilevel.solver.mfac_storage={storage!r}; choose one of: {', '.join(STORAGES)}")
        self.size = size
        self.storage = storage
        self.rows: Tensor | None = None
        self.count = 0  # gradients pushed so far (the buffer holds the last min(count, size))

    def push(self, grads: Sequence[Tensor]) -> None:
        """Store one gradient, given as tensors (e.g. ``p.grad`` of each backbone parameter) or one flat tensor."""
        numel = sum(g.numel() for g in grads)
        if self.rows is None:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.storage, grads[0].dtype)
            device = torch.device("cpu") if self.storage == "cpu" else grads[0].device
            self.rows = torch.empty(self.size, numel, dtype=dtype, device=device)
        elif self.rows.shape[1] != numel:
            raise ValueError(f"gradient of {numel} entries pushed into a window of {self.rows.shape[1]}-entry rows")
        row, start = self.rows[self.count % self.size], 0
        for g in grads:  # tensor by tensor: no full-size temporary in the gradients' dtype
            row[start : start + g.numel()].copy_(g.detach().reshape(-1), non_blocking=True)
            start += g.numel()
        self.count += 1

    def gradients(self) -> Tensor | None:
        """The stored gradients as an ``n x numel`` tensor (a view when the window is full), or ``None``."""
        if self.rows is None:
            return None
        return self.rows if self.count >= self.size else self.rows[: self.count]

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "count": self.count, "rows": self.gradients()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size:
            raise ConfigError(f"the checkpoint's mfac window holds {state['size']} gradients, the config {self.size}")
        self.count, rows = int(state["count"]), state["rows"]
        self.rows = None
        if rows is not None:
            self.rows = torch.zeros(self.size, rows.shape[1], dtype=rows.dtype, device=rows.device)
            self.rows[: rows.shape[0]] = rows


def block_sizes(param_sizes: Sequence[int], block_size: int | None) -> tuple[int, ...]:
    """Blocks of the flat vector: one per parameter tensor (``block_size=None``) or consecutive chunks."""
    if block_size is None:
        return tuple(param_sizes)
    if block_size < 1:
        raise ConfigError(f"bilevel.solver.mfac_block_size={block_size} must be >= 1 (or null: one per tensor)")
    full, rest = divmod(sum(param_sizes), block_size)
    return (block_size,) * full + ((rest,) if rest else ())


def _as(block: Tensor, like: Tensor) -> Tensor:
    """``block`` in ``like``'s dtype and on its device (no copy when it already is)."""
    return block.to(device=like.device, dtype=like.dtype, non_blocking=True)


InverseFactory = Callable[[Tensor | None, Sequence[int]], InverseOperator]

INVERSES: Registry[InverseFactory] = Registry("inverse operator")
"""Curvature inverses built from the lower level's gradient window: ``factory(gradients, blocks)`` with
``gradients`` the ``n x d`` window (or ``None``) and ``blocks`` the block sizes; :class:`BiSSLTrainer` records the
window and builds one per cycle when ``bilevel.solver.name`` names an entry here instead of a solver."""


@INVERSES.register("mfac")
class MFACInverse:
    """``v -> mu (F + mu I)^-1 v`` with the block-diagonal empirical Fisher ``F`` of ``gradients`` (module docstring).

    An :class:`~bissl.bilevel.implicit.InverseOperator`. ``gradients`` is ``n x d`` (``n = 0`` or ``None``:
    ``F = 0``, the identity). It is kept by reference, not copied: build the inverse after the lower steps of a
    cycle and drop it before the next push into the window. Lazy: the Gram matrices are formed at the first
    :meth:`inverse`, and their Cholesky factors once per ``mu``.
    """

    def __init__(self, gradients: Tensor | None, blocks: Sequence[int]) -> None:
        self.blocks = tuple(blocks)
        self.g = gradients if gradients is not None and gradients.shape[0] > 0 else None
        if self.g is not None and sum(self.blocks) != self.g.shape[1]:
            raise ValueError(f"mfac: blocks sum to {sum(self.blocks)}, the gradients have {self.g.shape[1]} entries")
        self._grams: list[Tensor] | None = None
        self._factors: dict[float, list[Tensor]] = {}

    def _cholesky(self, g: Tensor, mu: float, like: Tensor) -> list[Tensor]:
        """Cholesky factors of ``n mu I + G_b G_b^T`` per block, in float64 (cached per ``mu``); the Gram matrices
        are formed from blocks cast to ``like``'s dtype and device (fp32 for a bf16 or host window)."""
        if self._grams is None:
            self._grams = [(b @ b.T).double() for b in (_as(g_b, like) for g_b in g.split(self.blocks, dim=1))]
            if not all(bool(torch.isfinite(gram).all()) for gram in self._grams):  # no n x d temporary
                raise NonFiniteError("mfac: a recorded lower-level gradient is NaN/inf; lower the lower-level lr")
        if mu not in self._factors:
            n = g.shape[0]
            eye = torch.eye(n, dtype=torch.float64, device=like.device)
            self._factors[mu] = [torch.linalg.cholesky(gram + n * mu * eye) for gram in self._grams]
        return self._factors[mu]

    def inverse(self, v: Tensor, mu: float) -> tuple[Tensor, SolveInfo]:
        """``mu (F + mu I)^-1 v`` for a flat ``v``: ``x_b = v_b - G_b^T (n mu I + G_b G_b^T)^-1 G_b v_b``; no
        Hessian-vector product (``SolveInfo.residual`` is NaN: the Hessian residual would cost one)."""
        if not mu > 0:
            raise ConfigError(f"mfac: mu = lam + damping = {mu} must be > 0")
        _rhs_norm("mfac", v)
        out = v.clone()
        if self.g is not None:
            for g_b, v_b, x_b, chol in zip(
                self.g.split(self.blocks, dim=1), v.split(self.blocks), out.split(self.blocks),
                self._cholesky(self.g, mu, v), strict=True,
            ):  # fmt: skip
                g_b = _as(g_b, v)
                coeff = torch.cholesky_solve((g_b @ v_b).double().unsqueeze(1), chol).squeeze(1)
                x_b.sub_(g_b.T @ coeff.to(g_b.dtype))
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError("mfac: the solution is NaN/inf; check the recorded gradients")
        return out, SolveInfo("mfac", 0, 0, math.nan, False, "no_solve")
