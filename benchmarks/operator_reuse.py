"""Reusing one cycle's Hessian operator across its N_U solves: Krylov recycling, Nystrom sketches, Chebyshev.

All ``N_U = 8`` upper steps of a BiSSL cycle solve ``(I + H/mu) x = v_j`` with the SAME ``H`` and a new ``v_j``.
On the seeded state of ``hypergradient.py`` this script runs one real cycle (20 lower steps, 8 upper steps through
``BiSSLTrainer``, default solver) and records the 8 right-hand sides ``v_j = grad_theta L_D`` its upper steps
solved for, then, on the operator of that cycle, measures per method: Hessian-vector products (HVPs) per cycle,
mean and max relative error of the 8 solutions against tightly converged ones (float64 CG to 1e-11 on tiny/small,
float32 CG to 1e-5 on ResNet-18), and the wall time of the solve phase (operator build + 8 solves), side by side
in one process at 1 thread. Methods:

- ``cg``: the default (CG, relative residual 5e-4, at most 10 iterations), each solve from zero;
- ``cg-oracle``: CG stopped at the first iterate within 1e-3 of the reference (the fewest products CG can use);
- ``recycled_cg-m``: the library's deflated CG (``solver.name=recycled_cg``), keeping the last ``m`` A-conjugate
  directions of the cycle's solves (``m = 16``: the default);
- ``nystrom-pcg-r``: a rank-``r`` randomized Nystrom sketch of ``H/mu + s I`` (``s`` a shift that makes it positive
  semi-definite, from the Lanczos bounds) from ``r`` products with Gaussian vectors, built once per cycle, used as
  CG preconditioner (``r`` products added to the count), and its error as a direct approximate inverse;
- ``chebyshev``: Chebyshev iteration on the spectrum bounds of the first solve's Lanczos (4 steps), stopped at
  1e-3 by the oracle (no inner products; it needs at least as many products as CG);
- ``identity``: ``x = v``.

It also prints the spectrum of ``E = H/mu`` (Lanczos with full re-orthogonalisation from a random start, and the
weight of ``v_1`` by eigenvalue, from Lanczos started at ``v_1``) and times ``r`` products batched into one
``autograd.grad(..., is_grads_batched=True)`` against ``r`` separate products.

    python benchmarks/operator_reuse.py [--models small,resnet18] [--lanczos 120] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable
from typing import Any

import hypergradient as hg
import torch
from torch import Tensor

from bissl.bilevel.hvp import HessianOperator, flatten
from bissl.bilevel.solvers import CG, RecycledCG, RecycleSpace

TARGET = 1e-3


class CountedA:
    """``x -> (I + H/mu) x`` on one operator, counting products."""

    def __init__(self, op: HessianOperator) -> None:
        self.op, self.calls = op, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.op.matvec(x).div_(hg.MU).add_(x)


def rel_err(x: Tensor, ref: Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def record_cycle(problem: hg.Problem) -> tuple[hg.BiSSLTrainer, list[Tensor]]:
    """One default cycle through the trainer; the right-hand sides of its 8 upper steps."""
    trainer = hg.make_trainer(problem, "default")
    rhs: list[Tensor] = []
    solve = trainer.solve_implicit

    def recording(v: Any, operator: Any) -> Any:
        rhs.append(flatten(v).clone())
        return solve(v, operator)

    trainer.solve_implicit = recording  # type: ignore[method-assign]
    for views in problem.lower_views:
        trainer.lower_step(views, total_lower_steps=hg.N_L)
    trainer.begin_cycle(problem.hessian_views)
    for batch in problem.upper_batches:
        trainer.upper_step(batch)
    trainer.end_cycle()
    return trainer, rhs


def make_operator(trainer: hg.BiSSLTrainer, views: list[Tensor], double: bool = False) -> HessianOperator:
    modules = trainer._lower_modules
    if double:
        modules = copy.deepcopy(modules).double()
        views = [v.double() for v in views]
    theta = [p for p in modules[0].parameters() if p.requires_grad]
    return HessianOperator(lambda: modules[1].loss(modules[0], views), theta, module=modules)


def lanczos(apply_e: Callable[[Tensor], Tensor], start: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Ritz values of ``E`` and the weights of ``start`` on them (Lanczos, full re-orthogonalisation, float64)."""
    basis = [start / start.norm()]
    alphas, betas = [], []
    for _ in range(steps):
        w = apply_e(basis[-1])
        alphas.append(float(torch.dot(w, basis[-1])))
        for _ in range(2):
            for q in basis:
                w -= torch.dot(w, q) * q
        betas.append(float(w.norm()))
        basis.append(w / betas[-1])
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[:-1], dtype=torch.float64)
    values, vectors = torch.linalg.eigh(t + torch.diag(off, 1) + torch.diag(off, -1))
    return values, vectors[0] ** 2


def chebyshev(a: CountedA, b: Tensor, ref: Tensor, low: float, high: float, maxiter: int) -> tuple[Tensor, int]:
    """Chebyshev iteration for an SPD ``A`` with spectrum in ``[low, high]``, stopped at TARGET by the oracle."""
    centre, half = (high + low) / 2, (high - low) / 2
    sigma = centre / half
    rho = 1 / sigma
    x, r = torch.zeros_like(b), b.clone()
    d = r / centre
    for k in range(1, maxiter + 1):
        x += d
        r -= a(d)
        if rel_err(x, ref) <= TARGET:
            return x, k
        rho_next = 1 / (2 * sigma - rho)
        d = rho_next * rho * d + (2 * rho_next / half) * r
        rho = rho_next
    return x, maxiter


def pcg_oracle(a: CountedA, b: Tensor, ref: Tensor, precondition: Callable[[Tensor], Tensor], maxiter: int) -> Tensor:
    """Preconditioned CG from zero, stopped at the first iterate within TARGET of the reference."""
    x, r = torch.zeros_like(b), b.clone()
    z = precondition(r)
    p, rz = z.clone(), float(torch.dot(r.double(), z.double()))
    for _ in range(maxiter):
        ap = a(p)
        alpha = rz / float(torch.dot(p.double(), ap.double()))
        x += alpha * p
        r -= alpha * ap
        if rel_err(x, ref) <= TARGET:
            break
        z = precondition(r)
        rz_next = float(torch.dot(r.double(), z.double()))
        p = z + (rz_next / rz) * p
        rz = rz_next
    return x


def nystrom(a: CountedA, n: int, rank: int, shift: float, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` Nystrom approximation ``U diag(lam) U^T`` of the PSD ``E + shift I`` (``rank`` products)."""
    omega = torch.linalg.qr(torch.randn(n, rank, generator=torch.Generator().manual_seed(seed)))[0]
    y = torch.stack([a(omega[:, i]) - omega[:, i] for i in range(rank)], 1) + shift * omega
    nu = 1e-7 * float(y.norm())
    y += nu * omega
    chol = torch.linalg.cholesky(omega.T @ y)
    u, s, _ = torch.linalg.svd(torch.linalg.solve_triangular(chol, y.T, upper=False).T, full_matrices=False)
    return u, (s**2 - nu).clamp_min(0)


def batched_products(op: HessianOperator, r: int) -> dict[str, float]:
    """Seconds for ``r`` separate products vs one ``is_grads_batched`` call computing the same ``r`` products."""
    vs = torch.randn(r, op.numel, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    separate = torch.stack([op.matvec(v) for v in vs])
    t_sep = time.perf_counter() - start
    chunks = vs.split([p.numel() for p in op.params], dim=1)
    tangents = [chunk.reshape(r, *shape) for chunk, shape in zip(chunks, op.shapes, strict=True)]
    graph = op._graph
    start = time.perf_counter()
    with torch.enable_grad():
        out = torch.autograd.grad([g for _, g in graph], op.params, grad_outputs=[tangents[i] for i, _ in graph],
                                  retain_graph=True, is_grads_batched=True, materialize_grads=True)  # fmt: skip
    t_batch = time.perf_counter() - start
    batched = torch.cat([o.reshape(r, -1) for o in out], dim=1)
    return {"r": r, "separate_s": t_sep, "batched_s": t_batch,
            "max_rel_diff": float((batched - separate).norm() / separate.norm())}  # fmt: skip


def study(name: str, lanczos_steps: int, full: bool) -> dict[str, Any]:
    """``full=False`` (the ResNets' default): no Chebyshev, Nystrom or m = 32 rows, 20-step Lanczos for ``v_1``."""
    start = time.perf_counter()
    problem = hg.build_problem(name, torch.device("cpu"))
    trainer, rhs = record_cycle(problem)
    views = problem.hessian_views
    if name == "resnet18":
        a_ref = CountedA(make_operator(trainer, views))
        refs = [CG(maxiter=100, rtol=1e-5)(a_ref, b)[0].double() for b in rhs]
        how = "float32 CG to 1e-5"
    else:
        a_ref = CountedA(make_operator(trainer, views, double=True))
        refs = [CG(maxiter=300, rtol=1e-11)(a_ref, b.double())[0] for b in rhs]
        how = "float64 CG to 1e-11"
    n = rhs[0].numel()
    out: dict[str, Any] = {"parameters": n, "reference": how, "methods": []}
    cosines = [float(torch.nn.functional.cosine_similarity(rhs[i], rhs[i + 1], dim=0)) for i in range(len(rhs) - 1)]
    out["consecutive_rhs_cosine"] = cosines
    print(f"[{name}] {n} parameters; reference {how}; consecutive right-hand sides' cosines "
          f"{' '.join(f'{c:.2f}' for c in cosines)} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip

    def run(method: str, solve_all: Callable[[CountedA], list[Tensor]]) -> None:
        op = make_operator(trainer, views)
        a = CountedA(op)
        t0 = time.perf_counter()
        xs = solve_all(a)
        seconds = time.perf_counter() - t0
        errs = [rel_err(x, ref) for x, ref in zip(xs, refs, strict=True)]
        row = {"method": method, "hvps": a.calls, "mean_err": sum(errs) / len(errs), "max_err": max(errs),
               "seconds": seconds, "per_solve_hvps": getattr(a, "per_solve", None)}  # fmt: skip
        out["methods"].append(row)
        print(f"  {method:<18} HVPs/cycle {a.calls:3d}  error mean {row['mean_err']:.1e} max {row['max_err']:.1e}  "
              f"{seconds:6.1f} s  {row['per_solve_hvps'] or ''}", flush=True)  # fmt: skip

    def per_solve(a: CountedA, fn: Callable[[Tensor, Tensor], Tensor]) -> list[Tensor]:
        xs, counts = [], []
        for b, ref in zip(rhs, refs, strict=True):
            before = a.calls
            xs.append(fn(b, ref))
            counts.append(a.calls - before)
        a.per_solve = counts  # type: ignore[attr-defined]
        return xs

    cfg = hg.SolverSpec()
    run("identity", lambda a: [b.clone() for b in rhs])
    cg = CG(maxiter=cfg.maxiter, rtol=cfg.rtol)
    run("cg", lambda a: per_solve(a, lambda b, _: cg(a, b)[0]))
    run("cg-oracle", lambda a: per_solve(a, lambda b, ref: pcg_oracle(a, b, ref, lambda r: r, 30)))
    for m in (16, 8, 32) if full else (16, 8):

        def recycled(a: CountedA, m: int = m) -> list[Tensor]:
            solve = RecycledCG(maxiter=cfg.maxiter, rtol=cfg.rtol, space=RecycleSpace(m))
            return per_solve(a, lambda b, _: solve(a, b)[0])

        run(f"recycled_cg-{m}", recycled)

    # spectrum of E = H/mu (products not counted in any method)
    a = CountedA(make_operator(trainer, views))
    values, _ = lanczos(lambda q: a(q) - q, torch.randn(n, generator=torch.Generator().manual_seed(0)), lanczos_steps)
    values_b, weights_b = lanczos(lambda q: a(q) - q, rhs[0].clone(), 40 if full else 20)
    spectrum = {
        "lanczos_steps": lanczos_steps, "min": float(values[0]), "max": float(values[-1]),
        "lowest": values[:5].tolist(), "highest": values[-5:].tolist(),
        "cond_A": float((1 + values[-1]) / (1 + values[0])),
        "ritz_abs_above": {str(t): int((values.abs() > t).sum()) for t in (0.05, 0.1, 0.2, 0.3)},
        "rhs_weight_abs_above": {str(t): float(weights_b[values_b.abs() > t].sum()) for t in (0.02, 0.05, 0.1, 0.2)},
    }  # fmt: skip
    out["spectrum_E"] = spectrum
    print(f"  spectrum of E = H/mu ({lanczos_steps} Lanczos steps): [{spectrum['min']:.3f}, {spectrum['max']:.3f}], "
          f"cond(I + E) {spectrum['cond_A']:.2f}; Ritz values |lam| > 0.05/0.1/0.2/0.3: "
          f"{list(spectrum['ritz_abs_above'].values())}; weight of v_1 at |lam| > 0.02/0.05/0.1/0.2: "
          f"{' '.join(f'{w:.3f}' for w in spectrum['rhs_weight_abs_above'].values())}", flush=True)  # fmt: skip

    if not full:
        out["batched_products"] = batched_products(make_operator(trainer, views), 4)
        print(f"  4 products: {out['batched_products']}", flush=True)
        out["wall_seconds"] = time.perf_counter() - start
        return out
    low4, high4 = lanczos(lambda q: a(q) - q, rhs[0].clone(), 4)[0][[0, -1]].tolist()
    run("chebyshev", lambda a: per_solve(a, lambda b, ref: chebyshev(a, b, ref, 1 + low4, 1 + high4, 30)[0]))
    shift = -1.02 * spectrum["min"]
    for rank in (8, 32):

        def sketched(a: CountedA, rank: int = rank) -> list[Tensor]:
            u, lam = nystrom(a, n, rank, shift)
            eig_a = lam + 1 - shift  # A = (1 - s) I + (E + s I)

            def inverse(z: Tensor) -> Tensor:  # A^-1 on the sketch, scaled identity elsewhere
                c = u.T @ z
                return u @ (c / eig_a) + (z - u @ c) / float(eig_a[-1])

            out.setdefault("nystrom_direct_err", {})[rank] = sum(
                rel_err(u @ ((u.T @ b) / eig_a) + (b - u @ (u.T @ b)), ref) for b, ref in zip(rhs, refs, strict=True)
            ) / len(rhs)
            return per_solve(a, lambda b, ref: pcg_oracle(a, b, ref, inverse, 30))

        run(f"nystrom-pcg-{rank}", sketched)
    print(
        f"  Nystrom sketch as a direct inverse (identity outside the sketch), mean error: {out['nystrom_direct_err']}"
    )
    out["batched_products"] = batched_products(make_operator(trainer, views), 8)
    print(f"  8 products: {out['batched_products']}", flush=True)
    out["wall_seconds"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,resnet18")
    parser.add_argument("--lanczos", type=int, default=None, help="Lanczos steps for H/mu (120 small, 30 ResNets)")
    parser.add_argument("--full", action="store_true", help="every method on the ResNets too (slow)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(hg.RESULTS / "operator_reuse-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                               "load_average_at_start": os.getloadavg(), "models": {}}  # fmt: skip
    for name in args.models.split(","):
        full = args.full or not name.startswith("resnet")
        results["models"][name] = study(name, args.lanczos or (120 if full else 30), full)
    results["load_average_at_end"] = os.getloadavg()
    hg.RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    print(f"wrote {args.out}; load average {results['load_average_at_start']} -> {results['load_average_at_end']}")


if __name__ == "__main__":
    main()
