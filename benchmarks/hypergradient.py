"""Time, peak memory and accuracy of the implicit hypergradient, and of whole BiSSL cycles, side by side.

For each model, on one seeded state (SimCLR pretext after a short pretraining, digit classification downstream,
the same Hessian batch, downstream batch and gradient window for every case), it measures:

- one solve of ``mu (H + mu I)^-1 v`` (``mu = lam + damping = 10.001``, ``v = grad_theta L_D``): wall time as a
  multiple of one plain pretext step, peak memory, Hessian-vector products (HVPs), relative error and cosine
  similarity against a tightly converged reference (dense ``exact`` on the tiny model; CG to relative residual
  1e-10 in float64 on the small net; CG to 1e-7 in float32 on the ResNets, whose float32 products are only
  good to ~1e-7);
- one BiSSL cycle (``N_L = 20`` lower steps, ``N_U = 8`` upper steps): wall time as a multiple of
  ``N_L + N_U`` plain pretext steps, the time spent computing implicit terms, peak memory, HVPs.

Cases: the paper code's way (``reference_paper_way.py``: forward and first-order graph rebuilt in each of 5 CG
iterations; per-tensor "layer-wise" CG, its default, and whole-vector CG), the library's default (the
``bilevel.solver`` config defaults with one operator per cycle), each solver option, a Hessian on half the
batch, and torchopt's ``custom_root`` + ``solve_cg`` (skipped, with the reason printed, where torchopt is not
installed: ``pip install -e '.[bench]'``).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation at the start of the case; on CPU the
peak resident set size (psutil, sampled every millisecond by a thread) above the RSS at the start of the case,
after glibc's ``malloc_trim`` has returned freed memory to the system. Timings on a shared CPU are noisy: cases
run interleaved, ``--repeats`` times, and the minimum is reported.

    python benchmarks/hypergradient.py [--quick] [--device cpu|cuda] [--models tiny,small,resnet18] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from reference_paper_way import PAPER_ITERS, PaperWayTrainer, paper_solve
from torch import Tensor, nn

from bissl.bilevel import (
    PAPER_SOLVER,
    BilevelSettings,
    BiSSLTrainer,
    HessianOperator,
    SolveInfo,
    SolverSpec,
    implicit_gradient,
)
from bissl.bilevel.hvp import flatten, frozen_buffers, preserve_buffers
from bissl.bilevel.mfac import GradientWindow, MFACInverse, block_sizes
from bissl.data import build_dataset
from bissl.data.augment import build_view_augmentation, normalize
from bissl.downstream.classification import ClassificationTask
from bissl.models import build_backbone
from bissl.pretext import build_pretext
from bissl.utils.seed import make_generator

LAM, DAMPING = 1e-3, 10.0
MU = LAM + DAMPING
N_L, N_U = 20, 8
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class ModelSpec:
    backbone: str
    kwargs: dict[str, Any]
    image_size: int
    batch: int  # images per pretext batch (2 views each) and per downstream batch
    pretrain_steps: int
    small_images: bool = True
    reference: str = "cg64"  # exact | cg64 (float64 CG to 1e-10) | cg32 (float32 CG to 1e-7)
    repeats: int = 2  # interleaved repeats (the minimum time is kept)
    cycle_cases: tuple[str, ...] = ("plain", "paper-layerwise", "paper-cg", "default", "cg-5", "cg-warm-start",
                                    "recycled-cg", "identity", "mfac")  # fmt: skip


LARGE_CYCLES = ("plain", "paper-layerwise", "default", "recycled-cg", "identity", "mfac")
MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("small_cnn", {"width": 4, "depth": 2}, 8, 16, 30, reference="exact"),
    "small": ModelSpec("small_cnn", {"width": 32}, 16, 32, 40),
    # a batch of 4 makes H too indefinite for CG at damping 10 (negative curvature at iteration 2): 8 is the least.
    # One repeat and the cycles that differ (paper-cg costs what paper-layerwise costs) keep it under 10 minutes.
    "resnet18": ModelSpec("resnet18", {}, 32, 8, 20, reference="cg32", repeats=1, cycle_cases=LARGE_CYCLES),
    "resnet50-96": ModelSpec(
        "resnet50", {}, 96, 32, 20, small_images=False, reference="cg32", repeats=1, cycle_cases=LARGE_CYCLES
    ),
    "resnet50-224": ModelSpec(
        "resnet50", {}, 224, 16, 20, small_images=False, reference="cg32", repeats=1, cycle_cases=LARGE_CYCLES
    ),
}
DEFAULT_MODELS = {"cpu": "tiny,small,resnet18", "cuda": "small,resnet18,resnet50-96,resnet50-224"}


# ------------------------------------------------------------------------------------------------ measurement
class PeakMemory:
    """Peak memory (bytes) above the level at entry: CUDA allocator statistics, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        import psutil

        _trim()
        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self._max = self._start
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self._max = max(self._max, self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
            return
        self._running = False
        self._thread.join()
        self.peak = max(self._max, self._process.memory_info().rss) - self._start


def _trim() -> None:
    """Return freed heap memory to the system (glibc), so RSS deltas start from what is really in use."""
    with contextlib.suppress(OSError):  # not glibc: RSS deltas may then count freed memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, int]:
    """``fn()``'s result, its wall time in seconds and its peak memory in bytes."""
    with PeakMemory(device) as memory:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return out, seconds, memory.peak


# ------------------------------------------------------------------------------------------------ the problem
@dataclass
class Problem:
    """One seeded BiSSL state: modules (pretrained), batches, the downstream gradient ``v`` and a gradient window."""

    name: str
    spec: ModelSpec
    device: torch.device
    backbone: nn.Module
    pretext: Any
    task: ClassificationTask
    head: nn.Module
    lower_views: list[list[Tensor]]
    hessian_views: list[Tensor]
    upper_batches: list[tuple[Tensor, Tensor]]
    window: GradientWindow
    v: tuple[Tensor, ...] = ()
    reference: Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def theta(self) -> list[Tensor]:
        return list(self.backbone.parameters())

    @property
    def modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.backbone, self.pretext])

    def lower_loss(self, fraction: float = 1.0) -> Callable[[], Tensor]:
        views = [v[: max(1, math.ceil(fraction * v.shape[0]))] for v in self.hessian_views]
        return lambda: self.pretext.loss(self.backbone, views)


def build_problem(name: str, device: torch.device, seed: int = 0) -> Problem:
    spec = MODELS[name]
    torch.manual_seed(seed)
    data = build_dataset("digits", "train", image_size=spec.image_size)
    info = data.info
    backbone = build_backbone(
        spec.backbone, in_channels=info.channels, small_images=spec.small_images, **spec.kwargs
    ).to(device)
    pretext = build_pretext("simclr", backbone.feature_dim, {})
    pretext.setup(backbone)
    pretext.to(device)
    augment = build_view_augmentation(
        "simclr", image_size=spec.image_size, channels=info.channels, mean=info.mean, std=info.std
    )
    task = ClassificationTask(info.num_classes, mean=info.mean, std=info.std)
    head = task.build_head(backbone.feature_dim).to(device)
    gen = torch.Generator().manual_seed(seed)

    def batch() -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(data), (spec.batch,), generator=gen).tolist()
        images = torch.stack([data[i][0] for i in idx]).to(device)
        return images, torch.tensor([data[i][1] for i in idx], device=device)

    def views(key: str, step: int) -> list[Tensor]:
        return list(augment(batch()[0], make_generator(seed, key, step)))

    # short pretraining so that H is not the Hessian at initialisation; its last N_L gradients fill the window
    window = GradientWindow(N_L)
    backbone.train()
    pretext.train()
    opt = torch.optim.SGD([*backbone.parameters(), *pretext.head_parameters()], lr=0.05, momentum=0.9)
    for step in range(spec.pretrain_steps):
        opt.zero_grad(set_to_none=True)
        pretext.loss(backbone, views("pretrain", step)).backward()
        window.push([p.grad for p in backbone.parameters()])
        opt.step()
    upper = []
    for _ in range(N_U):
        images, labels = batch()
        upper.append((normalize(images, info.mean, info.std), labels))
    problem = Problem(
        name, spec, device, backbone, pretext, task, head,
        lower_views=[views("lower", s) for s in range(N_L)], hessian_views=views("hessian", 0),
        upper_batches=upper, window=window,
    )  # fmt: skip
    with preserve_buffers(problem.modules):
        loss = task.loss(backbone, head, upper[0])
        problem.v = torch.autograd.grad(loss, problem.theta)
    return problem


def reference_solution(problem: Problem) -> tuple[Tensor, str]:
    """The tightly converged ``mu (H + mu I)^-1 v`` (flat) and how it was obtained."""
    kind = problem.spec.reference
    if kind == "cg32":
        op = HessianOperator(problem.lower_loss(), problem.theta, module=problem.modules)
        x, info = implicit_gradient(op, problem.v, mu=MU, solver=SolverSpec("cg", maxiter=100, rtol=1e-7))
        return flatten(x), f"float32 CG, relative residual {info.residual:.1e} after {info.iterations} iterations"
    model = copy.deepcopy(problem.modules).double()
    views = [v.double() for v in problem.hessian_views]
    params = list(model[0].parameters())
    v64 = [t.double() for t in problem.v]
    spec = SolverSpec("exact") if kind == "exact" else SolverSpec("cg", maxiter=200, rtol=1e-10)
    op = HessianOperator(lambda: model[1].loss(model[0], views), params, module=model)
    x, info = implicit_gradient(op, v64, mu=MU, solver=spec)
    how = "dense exact solve" if kind == "exact" else f"CG to relative residual {info.residual:.1e}"
    return flatten(x), f"float64 {how}"


# ------------------------------------------------------------------------------------------------ solve cases
SolveFn = Callable[[Problem], tuple[Tensor, int]]


def library_solve(spec: SolverSpec, fraction: float = 1.0) -> SolveFn:
    """``implicit_gradient`` with its own operator (built inside the solve, as the first solve of a cycle does)."""

    def run(p: Problem) -> tuple[Tensor, int]:
        op = HessianOperator(p.lower_loss(fraction), p.theta, module=p.modules)
        x, info = implicit_gradient(op, p.v, mu=MU, solver=spec)
        return flatten(x), info.matvecs

    return run


def paper_case(layerwise: bool) -> SolveFn:
    def run(p: Problem) -> tuple[Tensor, int]:
        x = paper_solve(p.lower_loss(), p.theta, p.v, MU, p.modules, layerwise=layerwise)
        return flatten(x), PAPER_ITERS

    return run


def mfac_case(p: Problem) -> tuple[Tensor, int]:
    """Set-up (Gram matrices, Cholesky) and one application: what the first solve of a cycle costs."""
    inverse = MFACInverse(p.window.gradients(), block_sizes([t.numel() for t in p.theta], None))
    x, info = inverse.inverse(flatten(p.v), MU)
    return x, info.matvecs


def torchopt_case(p: Problem) -> tuple[Tensor, int]:
    """torchopt's implicit differentiation as its users write it: ``custom_root(grad(objective))`` + ``solve_cg``.

    The lower objective ``L_P(theta) + mu/2 ||theta - phi||^2`` has the stationarity condition
    ``F = grad_theta L_P + mu (theta - phi) = 0``; the gradient it returns for ``phi`` is ``mu (H + mu I)^-1 v``.
    A counting wrapper around ``solve_cg``'s product counts the HVPs.
    """
    import torchopt

    names = [n for n, _ in p.backbone.named_parameters()]
    counter = [0]

    def objective(theta: tuple[Tensor, ...], phi: tuple[Tensor, ...]) -> Tensor:
        params = dict(zip(names, theta, strict=True))
        fmodel = lambda x: torch.func.functional_call(p.backbone, params, (x,))  # noqa: E731
        prox = sum(((t - f) ** 2).sum() for t, f in zip(theta, phi, strict=True))
        return p.pretext.loss(fmodel, p.hessian_views) + 0.5 * MU * prox

    def counting_cg(matvec: Callable[[Any], Any], b: Any) -> Any:
        def counted(u: Any) -> Any:
            counter[0] += 1
            return matvec(u)

        return torchopt.linear_solve.solve_cg(maxiter=PAPER_ITERS)(counted, b)

    @torchopt.diff.implicit.custom_root(torch.func.grad(objective, argnums=0), argnums=1, solve=counting_cg)
    def inner_solution(theta: tuple[Tensor, ...], phi: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return theta  # the lower iterate the N_L steps reached

    phi = tuple(t.detach().clone().requires_grad_() for t in p.theta)
    with frozen_buffers(p.modules):
        theta_star = inner_solution(tuple(t.detach() for t in p.theta), phi)
        inner = sum((t * v).sum() for t, v in zip(theta_star, p.v, strict=True))  # d/dtheta* of L_D is v
        grads = torch.autograd.grad(inner, phi)
    return flatten(grads), counter[0]


def solve_cases(problem: Problem, has_torchopt: bool) -> dict[str, SolveFn]:
    cases: dict[str, SolveFn] = {
        "paper-layerwise": paper_case(layerwise=True),
        "paper-cg": paper_case(layerwise=False),
        "default": library_solve(SolverSpec()),
        "cg-5": library_solve(SolverSpec("cg", maxiter=5, rtol=None)),
        "cg-rtol1e-3": library_solve(SolverSpec("cg", maxiter=20, rtol=1e-3)),
        "cg-rtol1e-4": library_solve(SolverSpec("cg", maxiter=20, rtol=1e-4)),
        "cg-half-batch": library_solve(SolverSpec(), fraction=0.5),
        "neumann-5": library_solve(SolverSpec("neumann", maxiter=5, rtol=None)),
        "identity": library_solve(SolverSpec("identity")),
        "mfac": mfac_case,
    }
    if problem.spec.reference == "exact":
        cases["exact"] = library_solve(SolverSpec("exact"))
    if has_torchopt:
        cases["torchopt-cg-5"] = torchopt_case
    return cases


def plain_step_seconds(problem: Problem, repeats: int) -> float:
    """Minimum time of one plain pretext step (forward, backward, SGD step) on a lower batch."""
    model = copy.deepcopy(problem.modules)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(views: list[Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        model[1].loss(model[0], views).backward()
        opt.step()

    times = [timed(lambda r=r: step(problem.lower_views[r % N_L]), problem.device)[1] for r in range(repeats + 2)]
    return min(times[1:])  # the first run warms up


def run_solves(problem: Problem, has_torchopt: bool, repeats: int, plain: float) -> list[dict[str, Any]]:
    ref = problem.reference
    cases = solve_cases(problem, has_torchopt)
    results: dict[str, dict[str, Any]] = {}
    for r in range(repeats):
        for name, fn in cases.items():
            with preserve_buffers(problem.modules):
                (x, hvps), seconds, peak = timed(lambda fn=fn: fn(problem), problem.device)
            x, ref = x.double(), ref.double()
            row = results.setdefault(name, {"case": name, "seconds": math.inf, "peak_mb": 0.0})
            row["seconds"] = min(row["seconds"], seconds)
            row["peak_mb"] = max(row["peak_mb"], peak / 2**20)
            row.update(hvps=hvps, rel_err=float((x - ref).norm() / ref.norm()),
                       cosine=float(torch.nn.functional.cosine_similarity(x, ref, dim=0)))  # fmt: skip
            print(f"  [{problem.name}] solve {name:<16} repeat {r + 1}/{repeats}: {seconds:7.2f} s, "
                  f"rel. error {row['rel_err']:.1e}", flush=True)  # fmt: skip
    base = results["paper-layerwise"]
    for row in results.values():
        row["x_plain_step"] = row["seconds"] / plain
        row["speedup_vs_paper"] = base["seconds"] / row["seconds"]
        row["mem_vs_paper"] = row["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else math.nan
    return list(results.values())


# ------------------------------------------------------------------------------------------------ cycle cases
def make_trainer(problem: Problem, case: str) -> BiSSLTrainer:
    """A fresh trainer on copies of the problem's modules, configured for ``case``."""
    default = SolverSpec()
    settings: dict[str, Any] = {
        "paper-layerwise": {"solver": PAPER_SOLVER},
        "paper-cg": {"solver": PAPER_SOLVER},
        "default": {},
        "cg-5": {"solver": SolverSpec("cg", maxiter=5, rtol=None)},
        "cg-warm-start": {"solver": replace(default, warm_start=True)},
        # deflated CG sharing the cycle's directions (operator_reuse.py)
        "recycled-cg": {"solver": replace(default, name="recycled_cg")},
        "identity": {"solver": SolverSpec("identity")},
        "mfac": {"solver": SolverSpec("mfac"), "mfac_window": N_L},
    }[case]
    backbone = copy.deepcopy(problem.backbone)
    kwargs = {
        "backbone": backbone, "pretext": copy.deepcopy(problem.pretext), "task": problem.task,
        "head": copy.deepcopy(problem.head), "settings": BilevelSettings(lam=LAM, damping=DAMPING, **settings),
        "make_lower_optimizer": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        "make_upper_optimizer": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    }  # fmt: skip
    if case.startswith("paper"):
        return PaperWayTrainer(layerwise=case == "paper-layerwise", **kwargs)
    return BiSSLTrainer(**kwargs)


def run_cycle(problem: Problem, trainer: BiSSLTrainer) -> dict[str, float]:
    """One cycle; returns the seconds spent in implicit solves and the HVPs they used."""
    spent = {"solve_seconds": 0.0, "hvps": 0.0}
    solve = trainer.solve_implicit

    def timed_solve(v: Sequence[Tensor], operator: Any) -> tuple[tuple[Tensor, ...], SolveInfo]:
        start = time.perf_counter()
        out = solve(v, operator)
        spent["solve_seconds"] += time.perf_counter() - start
        spent["hvps"] += out[1].matvecs
        return out

    trainer.solve_implicit = timed_solve  # type: ignore[method-assign]
    for views in problem.lower_views:
        trainer.lower_step(views, total_lower_steps=N_L)
    trainer.begin_cycle(problem.hessian_views)
    for batch in problem.upper_batches:
        trainer.upper_step(batch)
    trainer.end_cycle()
    return spent


def plain_cycle(problem: Problem) -> None:
    """``N_L + N_U`` plain pretext steps (forward, backward, SGD step) on the cycle's lower batches."""
    model = copy.deepcopy(problem.modules)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(N_L + N_U):
        opt.zero_grad(set_to_none=True)
        model[1].loss(model[0], problem.lower_views[step % N_L]).backward()
        opt.step()


def run_cycles(problem: Problem, repeats: int, cases: Sequence[str]) -> list[dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for r in range(repeats):
        for case in cases:
            if case == "plain":
                fn: Callable[[], Any] = lambda: plain_cycle(problem)  # noqa: E731
            else:
                trainer = make_trainer(problem, case)
                fn = lambda t=trainer: run_cycle(problem, t)  # noqa: E731
            spent, seconds, peak = timed(fn, problem.device)
            row = results.setdefault(case, {"case": case, "seconds": math.inf, "peak_mb": 0.0})
            if seconds < row["seconds"]:
                row.update(seconds=seconds, **(spent or {}))
            row["peak_mb"] = max(row["peak_mb"], peak / 2**20)
            print(f"  [{problem.name}] cycle {case:<16} repeat {r + 1}/{repeats}: {seconds:7.2f} s", flush=True)
    plain, base = results["plain"], results.get("paper-layerwise")
    for row in results.values():
        row["x_plain_steps"] = row["seconds"] / plain["seconds"]
        if base is not None and "solve_seconds" in row:
            row["solve_speedup_vs_paper"] = base["solve_seconds"] / max(row["solve_seconds"], 1e-9)
            row["mem_vs_paper"] = row["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else math.nan
    return list(results.values())


# ------------------------------------------------------------------------------------------------ output
def print_table(title: str, rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    print(" | ".join(f"{label:>{len(label) if i else 16}}" for i, (_, label, _) in enumerate(columns)))
    for row in rows:
        cells = []
        for i, (key, label, fmt) in enumerate(columns):
            value = row.get(key, "")
            text = format(value, fmt) if isinstance(value, float | int) and fmt else str(value)
            cells.append(f"{text:>{len(label) if i else 16}}")
        print(" | ".join(cells))


SOLVE_COLUMNS = (
    ("case", "case", ""), ("seconds", "time s", ".2f"), ("x_plain_step", "x plain step", ".2f"),
    ("speedup_vs_paper", "speed-up vs paper", ".2f"), ("peak_mb", "peak MiB", ".0f"),
    ("mem_vs_paper", "mem vs paper", ".2f"), ("hvps", "HVPs", "d"), ("rel_err", "rel. error", ".1e"),
    ("cosine", "cosine", ".6f"),
)  # fmt: skip
CYCLE_COLUMNS = (
    ("case", "case", ""), ("seconds", "cycle s", ".1f"), ("x_plain_steps", "x (N_L+N_U) plain", ".2f"),
    ("solve_seconds", "solve s", ".1f"), ("solve_speedup_vs_paper", "solve speed-up", ".2f"),
    ("peak_mb", "peak MiB", ".0f"), ("mem_vs_paper", "mem vs paper", ".2f"), ("hvps", "HVPs", ".0f"),
)  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[plots]')")
        return
    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for row in results["models"][model]["solve"]:
            point = (max(row["x_plain_step"], 1e-2), max(row["rel_err"], 1e-12))
            ax.scatter(*point)
            ax.annotate(row["case"], point, fontsize=7)
        ax.axhline(1e-3, color="grey", linestyle="--", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="one solve, x plain pretext step",
               ylabel="relative error vs reference", title=model)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="tiny and small models, one repeat (< 2 min on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per case (default: per model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1: shared machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    models = (args.models or ("tiny,small" if args.quick else DEFAULT_MODELS[device.type])).split(",")
    try:
        import torchopt

        has_torchopt, why = True, f"torchopt {torchopt.__version__}"
    except ImportError:
        has_torchopt, why = False, "torchopt not installed (pip install -e '.[bench]'): its cases are skipped"
    header = {
        "device": str(device), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(), "torch": torch.__version__, "torchopt": why, "lam": LAM,
        "damping": DAMPING, "n_lower": N_L, "n_upper": N_U,
        "default_solver": asdict(SolverSpec()),
    }  # fmt: skip
    print(json.dumps(header))
    results: dict[str, Any] = {**header, "models": {}}
    for name in models:
        start = time.perf_counter()
        problem = build_problem(name, device)
        repeats = args.repeats or (1 if args.quick else problem.spec.repeats)
        problem.reference, how = reference_solution(problem)
        print(f"[{name}] {sum(t.numel() for t in problem.theta)} backbone parameters, batch {problem.spec.batch}x2 "
              f"views at {problem.spec.image_size} px; reference: {how}", flush=True)  # fmt: skip
        plain = plain_step_seconds(problem, repeats)
        solves = run_solves(problem, has_torchopt, repeats, plain)
        cycles = run_cycles(problem, repeats, problem.spec.cycle_cases)
        results["models"][name] = {
            "spec": {**problem.spec.__dict__}, "reference": how, "plain_step_seconds": plain, "solve": solves,
            "cycle": cycles, "repeats": repeats, "wall_seconds": time.perf_counter() - start,
        }  # fmt: skip
        print_table(f"[{name}] one hypergradient solve (plain pretext step {plain:.3f} s)", solves, SOLVE_COLUMNS)
        print_table(f"[{name}] one BiSSL cycle, N_L={N_L}, N_U={N_U}", cycles, CYCLE_COLUMNS)
    results["load_average_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min): {header['load_average_at_start']} at start, {os.getloadavg()} at end")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"hypergradient{'-quick' if args.quick else ''}-{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / f'{stem}.json'}")
    plot(results, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
