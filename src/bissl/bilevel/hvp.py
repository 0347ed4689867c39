"""Hessian-vector products ``H v`` of a scalar loss w.r.t. a list of parameter tensors, on flat vectors.

``H = d^2 loss_fn() / d params^2``; every other tensor the loss reads (e.g. a pretext head's parameters) is held
fixed. A :class:`HessianOperator` stands for one set of parameter values and one batch (whatever ``loss_fn``
closes over) and applies ``H`` to any number of vectors, so the ``N_U`` solves of a BiSSL cycle can share it.

Lazy by design: constructing an operator only checks its arguments; the forward pass and the first-order graph
(or the ``torch.func`` closures) are built at the first :meth:`~HessianOperator.matvec`, so a solve that needs no
product (``identity``) runs no Hessian forward pass. ``mean=`` (data parallel) averages every product over ranks
in place: the Hessian of the mean of the ranks' losses (:class:`bissl.bilevel.RankSync`).

Methods (``method=``):

- ``"double_backward"``: one forward pass and one first-order backward pass with ``create_graph=True`` at
  the first product; each product is then ``autograd.grad(grads, params, v, retain_graph=True)``. The graph (all
  activations) stays in memory while the operator lives.
- ``"func"``: ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse); each product runs the forward
  and backward pass again. Needs ``module=`` (the ``nn.Module`` that owns ``params``) to substitute the
  parameters, so ``loss_fn`` must reach them by calling the module; the first product checks (one extra
  forward and backward pass) that the loss does not read ``params`` directly, which would make ``H = 0``
  silently, and raises :class:`~bissl.utils.errors.ConfigError` if it does. Forward mode through a backward
  pass needs a forward-mode formula for every backward op the loss uses, and PyTorch's are not all usable:
  ``mse_loss``'s backward writes into the zero tangent of its constant target ("ZeroTensors are immutable",
  torch 2.14). When the first product fails so, the operator switches to reverse-over-reverse
  (``torch.func.vjp`` of ``torch.func.grad``, the same ``H v``, measured no slower on CPU: 159 vs 224 ms on the
  small conv net, 4.49 vs 4.53 s on ResNet-18 at 32 px) and warns once.

``benchmarks/hvp_methods.py`` measured ``double_backward`` about 1.9x faster per product on CPU (one HVP ~2.5x a
forward+backward vs ~4.7-5.2x for ``func``, ResNet-18 at 32 px and a small conv net at 16 px), so it is the
default (:data:`DEFAULT_HVP_METHOD`); its build costs ~1.2-1.7x a forward+backward.

BatchNorm: products use the statistics of the batch ``loss_fn`` sees (train mode) and must not move the running
statistics. Pass ``module=`` (a module containing every BatchNorm that ``loss_fn`` runs, e.g.
``nn.ModuleList([backbone, pretext_method])``): during each of the operator's forward passes its BatchNorm layers
in train mode normalise with batch statistics without updating running statistics, and all of its buffers
(``num_batches_tracked`` included) are restored afterwards. BatchNorm layers in eval mode read their running
statistics, which the graph keeps for the products: they are never written to. Without ``module=``, wrap the
products in :func:`preserve_buffers` yourself.

Attention: ``F.scaled_dot_product_attention`` dispatches to fused kernels (flash / memory-efficient; on CPU as on
CUDA, torch 2.14) whose backward has no derivative, so a product through them would fail. Every forward pass of the
operator (and, for ``func``, every product) runs under :func:`math_attention`, which restricts SDPA to its math
kernel: any module that calls SDPA (timm's ViT with fused attention on, a user's attention) gets exact products,
while ordinary training keeps the fused kernels.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bissl.utils.errors import ConfigError, NonFiniteError

HVPMethod = Literal["double_backward", "func"]
HVP_METHODS: tuple[str, ...] = ("double_backward", "func")
DEFAULT_HVP_METHOD: HVPMethod = "double_backward"


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one 1-D tensor (detached, in their common dtype)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(flat: Tensor, shapes: Sequence[torch.Size]) -> tuple[Tensor, ...]:
    """Split a 1-D tensor into views of the given ``shapes`` (the inverse of :func:`flatten`)."""
    sizes = [s.numel() for s in shapes]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(f"expected a 1-D tensor of {sum(sizes)} elements, got shape {tuple(flat.shape)}")
    return tuple(chunk.view(shape) for chunk, shape in zip(flat.split(sizes), shapes, strict=True))


@contextlib.contextmanager
def preserve_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``module`` (BatchNorm running statistics, ``num_batches_tracked``, ...) on exit.

    Only buffers whose values changed are copied back (in place, so the restored buffers are bit-identical and
    keep their identity); an unchanged buffer is not written, so a graph that saved it for backward (BatchNorm
    in eval mode saves its running statistics) stays valid::

        with preserve_buffers(model):
            loss = model(x).sum()  # may update running statistics; undone on exit
    """
    saved = [(name, buf, buf.detach().clone()) for name, buf in module.named_buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf, value in saved:
                owner_name, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                if getattr(owner, attr) is not buf:
                    setattr(owner, attr, buf)
                if not torch.equal(buf, value):
                    buf.copy_(value)


@contextlib.contextmanager
def frozen_buffers(module: nn.Module | None) -> Iterator[None]:
    """Run a forward pass that leaves ``module``'s buffers untouched.

    BatchNorm layers in train mode normalise with the batch statistics but do not update their running
    statistics (``track_running_stats`` is switched off for the duration, which also keeps in-place buffer
    updates out of ``torch.func`` transforms); other buffers are restored by :func:`preserve_buffers`.
    """
    if module is None:
        yield
        return
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    with preserve_buffers(module):
        for m in norms:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in norms:
                m.track_running_stats = True


def math_attention() -> contextlib.AbstractContextManager[None]:
    """A context in which ``F.scaled_dot_product_attention`` uses its math kernel only (twice differentiable)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class _LossModule(nn.Module):
    """Wraps a zero-argument loss so that ``torch.func.functional_call`` can swap ``module``'s parameters."""

    def __init__(self, module: nn.Module, loss_fn: Callable[[], Tensor]) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self) -> Tensor:
        return self.loss_fn()


def _check_finite(value: Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(
            f"{what} is NaN/inf: lower the learning rate or check the data (non-finite parameters or batch), "
            "or compute in float32 or higher if the curvature overflows"
        )


class HessianOperator:
    """The linear map ``v -> H v`` on flat vectors, ``H`` the Hessian of ``loss_fn()`` w.r.t. ``params``.

    Built lazily at the first :meth:`matvec` (module docstring), which may then be called any number of times (it
    is not differentiable). ``num_hvps`` counts the products computed so far; ``cache`` holds state that solvers
    keep for this operator (:func:`~bissl.bilevel.implicit_gradient` puts ``recycled_cg``'s directions there).
    ``mean(tensors)``, if given, averages each product over ranks in place. See the module docstring for
    ``method`` and for how ``module`` keeps BatchNorm running statistics unchanged.
    """

    def __init__(
        self,
        loss_fn: Callable[[], Tensor],
        params: Sequence[Tensor],
        *,
        method: HVPMethod = DEFAULT_HVP_METHOD,
        module: nn.Module | None = None,
        mean: Callable[[Sequence[Tensor]], None] | None = None,
    ) -> None:
        if method not in HVP_METHODS:
            raise ConfigError(f"unknown HVP method {method!r}; choose one of: {', '.join(HVP_METHODS)}")
        self.params = tuple(params)
        if not self.params:
            raise ValueError("params is empty; pass the tensors (e.g. backbone parameters) to differentiate")
        self.method = method
        self.module = module
        self.mean = mean
        self.shapes = tuple(p.shape for p in self.params)
        self.numel = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_hvps = 0
        self.cache: dict[object, object] = {}  # per-operator solver state (recycled_cg's directions), dies with it
        self._loss_fn: Callable[[], Tensor] | None = loss_fn  # None once built
        self._names = self._parameter_names() if method == "func" else ()

    @property
    def built(self) -> bool:
        """Whether the first product has built the graph (``double_backward``) or the closures (``func``)."""
        return self._loss_fn is None

    def _parameter_names(self) -> tuple[str, ...]:
        """``module``'s names of ``params`` (as seen through :class:`_LossModule`), for ``functional_call``."""
        if self.module is None:
            raise ConfigError("method='func' needs module=<the nn.Module that owns params>; or use 'double_backward'")
        names_by_id = {id(p): f"module.{name}" for name, p in self.module.named_parameters(remove_duplicate=False)}
        missing = [i for i, p in enumerate(self.params) if id(p) not in names_by_id]
        if missing:
            raise ValueError(f"params {missing} are not parameters of module; pass the module that owns them")
        return tuple(names_by_id[id(p)] for p in self.params)

    def _build(self) -> None:
        loss_fn, self._loss_fn = self._loss_fn, None
        assert loss_fn is not None
        if self.method == "double_backward":
            self._build_double_backward(loss_fn)
        else:
            self._build_func(loss_fn)

    def _build_double_backward(self, loss_fn: Callable[[], Tensor]) -> None:
        with torch.enable_grad(), frozen_buffers(self.module), math_attention():
            loss = loss_fn()
            _check_finite(loss.detach(), "the lower-level loss")
            if not loss.requires_grad:
                raise ValueError("the lower-level loss does not depend on params; check loss_fn and params")
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True)
        # A gradient that does not require grad is constant: its rows (and, by symmetry, columns) of H are zero.
        self._graph = [(i, g) for i, g in enumerate(grads) if g.requires_grad]

    def _build_func(self, loss_fn: Callable[[], Tensor]) -> None:
        assert self.module is not None
        wrapper = _LossModule(self.module, loss_fn)

        def loss_of(*values: Tensor) -> Tensor:
            return torch.func.functional_call(wrapper, dict(zip(self._names, values, strict=True)), ())

        self._check_substitution(loss_of)
        self._grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(self._names))))
        self._primals = tuple(p.detach() for p in self.params)
        self._func_mode = "forward_over_reverse"

    def _check_substitution(self, loss_of: Callable[..., Tensor]) -> None:
        """Raise if ``loss_fn`` reads ``params`` other than through ``module`` (``functional_call`` would not
        substitute them and ``func`` would silently compute ``H = 0`` for them): one forward and backward pass."""
        values = [p.detach().requires_grad_() for p in self.params]
        with torch.enable_grad(), frozen_buffers(self.module), math_attention():
            loss = loss_of(*values)
            if not loss.requires_grad:
                raise ValueError("the lower-level loss does not depend on params; check loss_fn and params")
            tracked = [i for i, p in enumerate(self.params) if p.requires_grad]
            direct = torch.autograd.grad(loss, [self.params[i] for i in tracked], allow_unused=True) if tracked else ()
        read = [i for i, g in zip(tracked, direct, strict=True) if g is not None]
        if read:
            raise ConfigError(
                f"hvp='func': loss_fn reads params {read} directly, not by calling module, so their Hessian would "
                "be 0; call the module inside loss_fn, or use hvp='double_backward'"
            )

    def _hvp_func(self, tangents: tuple[Tensor, ...]) -> Sequence[Tensor]:
        # no outer graph through fixed tensors (head)
        with torch.no_grad(), frozen_buffers(self.module), math_attention():
            if self._func_mode == "forward_over_reverse":
                try:
                    return torch.func.jvp(self._grad_fn, self._primals, tangents)[1]
                except RuntimeError as exc:
                    if self.num_hvps > 0:  # it worked before: a real error, not a missing forward-mode formula
                        raise
                    warnings.warn(
                        f"HVP method 'func': forward-over-reverse failed ({str(exc).splitlines()[0][:120]}); "
                        "using reverse-over-reverse (vjp of grad) for this operator",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    self._func_mode = "reverse_over_reverse"
            _, vjp_fn = torch.func.vjp(self._grad_fn, *self._primals)
            return vjp_fn(tangents)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat ``v`` of ``numel`` elements, in the parameters' dtype (averaged over ranks with
        ``mean``); builds the operator on the first call; raises :class:`NonFiniteError` on NaN/inf."""
        if not self.built:
            self._build()
        tangents = unflatten(v.to(dtype=self.dtype, device=self.device), self.shapes)
        hv = self._hvp_double_backward(tangents) if self.method == "double_backward" else self._hvp_func(tangents)
        self.num_hvps += 1
        out = torch.cat([h.detach().reshape(-1) for h in hv]).to(self.dtype)
        if self.mean is not None:
            self.mean([out])
        _check_finite(out, "a Hessian-vector product")
        return out

    def _hvp_double_backward(self, tangents: tuple[Tensor, ...]) -> Sequence[Tensor]:
        if not self._graph:
            return [torch.zeros_like(t) for t in tangents]
        with torch.enable_grad():
            return torch.autograd.grad(
                [g for _, g in self._graph],
                self.params,
                grad_outputs=[tangents[i] for i, _ in self._graph],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec(v)
