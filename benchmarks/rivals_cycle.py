"""Cost of one cycle of each rival and of BiSSL's solvers, in plain pretext steps (issue #18's equal compute).

With the settings of ``benchmarks/pretext_cycle.py`` (``align_digits``: N_L = 20, N_U = 8, lower batch 64, upper
batch 32, CG at most 5 iterations; the pretrain run given) it times, on the same pre-drawn views and batches:

- ``plain``: N_L + N_U = 28 lower-level steps (pretext loss + proximal term): the unit;
- ``bissl_cg`` / ``bissl_mfac`` / ``bissl_identity``: one BiSSL cycle (N_L lower steps, N_U upper steps) per solver;
- ``penalty``: one cycle of the first-order penalty rule (N_L lower steps, N_U upper steps of z, phi, omega);
- ``multitask``: 28 steps on L_P + w L_D (w = 1); ``tapt``: 28 steps on L_P alone (w = 0; on the task's images in a
  study, on the same views here);
- ``downstream``: the 28 downstream forward + backward passes (upper batches, no step) that ``multitask`` adds to
  ``tapt``: what its extra cost is made of.

Each case runs ``--repeats`` times interleaved after one warm-up; the minimum CPU time of the process (one thread:
what the cycle itself costs, whatever else the shared cores run) and the minimum wall time are reported, with
their ratios to ``plain`` and the counts of one cycle (:class:`bissl.utils.compute.ComputeCounter`: backbone
forward / backward passes, Hessian-vector products).

    python benchmarks/rivals_cycle.py RUN_DIR [--threads 1] [--repeats 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pretext_cycle import N_LOWER, N_UPPER, _cycle, _plain, _setup

from bissl.bilevel.implicit import SolverSpec
from bissl.bilevel.rivals import MultitaskTrainer, PenaltyTrainer
from bissl.bilevel.trainer import BiSSLTrainer
from bissl.utils.compute import ComputeCounter

CASES: dict[str, tuple[type[BiSSLTrainer], dict[str, Any]]] = {
    "plain": (BiSSLTrainer, {}),
    "bissl_cg": (BiSSLTrainer, {}),
    "bissl_mfac": (BiSSLTrainer, {"solver": SolverSpec("mfac")}),
    "bissl_identity": (BiSSLTrainer, {"solver": SolverSpec("identity")}),
    "penalty": (PenaltyTrainer, {"penalty_rho": 1.0}),
    "multitask": (MultitaskTrainer, {"n_upper": 0, "multitask_weight": 1.0}),
    "tapt": (MultitaskTrainer, {"n_upper": 0, "multitask_weight": 0.0}),
    "downstream": (MultitaskTrainer, {"n_upper": 0, "multitask_weight": 1.0}),
}


def _joint(trainer: BiSSLTrainer, views: list[list[torch.Tensor]], batches: list[Any]) -> dict[str, float]:
    """N_L + N_U lower steps of the multitask rule, a downstream batch each when its weight is positive."""
    for i in range(N_LOWER + N_UPPER):
        trainer.lower_step(views[i % N_LOWER], 10**6, batches[i % N_UPPER] if trainer.lower_needs_batch else None)
    return {}


def _downstream(trainer: BiSSLTrainer, batches: list[Any]) -> dict[str, float]:
    """The downstream forward + backward passes of N_L + N_U multitask steps, nothing else."""
    for i in range(N_LOWER + N_UPPER):
        trainer._downstream_loss(trainer.lower_backbone, batches[i % N_UPPER]).backward()
    return {}


def _runner(case: str, trainer: BiSSLTrainer, views: Any, batches: Any) -> Callable[[], dict[str, float]]:
    if case == "plain":
        return lambda: _plain(trainer, views)
    if case == "downstream":
        return lambda: _downstream(trainer, batches)
    if case in ("multitask", "tapt"):
        return lambda: _joint(trainer, views, batches)
    return lambda: _cycle(trainer, views, batches) if case.startswith("bissl") else _penalty(trainer, views, batches)


def _penalty(trainer: BiSSLTrainer, views: list[list[torch.Tensor]], batches: list[Any]) -> dict[str, float]:
    for i in range(N_LOWER):
        trainer.lower_step(views[i], 10**6)
    trainer.begin_cycle(views[N_LOWER])
    for batch in batches:
        trainer.upper_step(batch)
    trainer.end_cycle()
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runners, counters = {}, {}
    for case, (cls, settings) in CASES.items():
        counters[case] = ComputeCounter()
        trainer, views, batches, _ = _setup(args.run, cls, counters[case], **settings)
        runners[case] = _runner(case, trainer, views, batches)
    times: dict[str, dict[str, list[float]]] = {case: {"cpu": [], "wall": []} for case in CASES}
    cycle_counts: dict[str, dict[str, int]] = {}
    for repeat in range(args.repeats + 1):
        for case, run in runners.items():
            before = counters[case].as_dict()
            cpu, wall = time.process_time(), time.perf_counter()
            run()
            if repeat:  # the first round warms up
                times[case]["cpu"].append(time.process_time() - cpu)
                times[case]["wall"].append(time.perf_counter() - wall)
            cycle_counts[case] = {k: v - before[k] for k, v in counters[case].as_dict().items()}
    best = {case: {clock: min(values) for clock, values in t.items()} for case, t in times.items()}
    rows = [
        {"case": case, "cpu_s": best[case]["cpu"], "wall_s": best[case]["wall"],
         "cpu_ratio_to_plain": best[case]["cpu"] / best["plain"]["cpu"],
         "wall_ratio_to_plain": best[case]["wall"] / best["plain"]["wall"], **cycle_counts[case]}
        for case in CASES
    ]  # fmt: skip
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out is not None:
        result = {"threads": args.threads, "repeats": args.repeats, "plain_steps": N_LOWER + N_UPPER, "rows": rows}
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
