"""Cost of one BiSSL cycle per pretext method, against the same number of plain lower-level steps.

For each pretrain run folder given (``bissl pretrain --config pretrain_digits_<method>``), it loads the backbone and
the pretext heads as ``bissl align`` does, builds the BiSSL trainer with ``align_digits``' settings (N_L = 20,
N_U = 8, lam 1e-3, damping 10, CG at most 5 iterations with the default tolerance and warm start, lower batch 64,
upper batch 32; 10-way digits downstream) and times, on the same pre-drawn views (augmentation excluded):

- ``plain``: N_L + N_U = 28 lower-level steps (pretext loss + proximal term, SGD);
- ``cycle``: one cycle: N_L lower steps, the cycle's Hessian operator, N_U upper steps (hypergradients by CG).

Each case runs ``--repeats`` times interleaved after one warm-up; the minimum is reported, with the ratio.
Also reported: the mean CG relative residual and the number of HVPs per cycle.

    python benchmarks/pretext_cycle.py RUN_DIR [RUN_DIR ...] [--threads 1] [--repeats 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bissl.bilevel.implicit import SolverSpec
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer
from bissl.data import build_dataset
from bissl.data.augment import build_view_augmentation
from bissl.downstream.classification import ClassificationTask
from bissl.engine.build import build_pretext_on
from bissl.engine.checkpoint import load_backbone, read_head_file, resolve_backbone_file
from bissl.engine.files import PRETEXT_HEAD_FILE
from bissl.utils.compute import ComputeCounter

N_LOWER, N_UPPER, LOWER_BATCH, UPPER_BATCH = 20, 8, 64, 32


def _setup(
    run: Path, trainer_cls: type[BiSSLTrainer] = BiSSLTrainer, compute: ComputeCounter | None = None, **settings: Any
) -> tuple[BiSSLTrainer, list[list[torch.Tensor]], list[Any], str]:
    """The trainer (``trainer_cls``, ``align_digits``' settings with ``settings`` replaced; ``compute`` watching
    its backbones), pre-drawn lower views and upper batches, and the pretext method's name."""
    path = resolve_backbone_file(str(run))
    torch.manual_seed(0)
    backbone, _ = load_backbone(path)
    head_file = read_head_file(path.parent / PRETEXT_HEAD_FILE, "pretext")
    pretext = build_pretext_on(head_file["name"], head_file["params"], backbone)
    pretext.load_state_dict(head_file["state_dict"])
    data = build_dataset("digits", "train", image_size=8)
    info = data.info
    augment = build_view_augmentation(
        pretext.augmentation, image_size=8, channels=info.channels, mean=info.mean, std=info.std, flip_p=0.0
    )
    g = torch.Generator().manual_seed(0)
    images = data.images  # uint8 [N, 1, 8, 8]
    views = [augment(images[torch.randint(len(images), (LOWER_BATCH,), generator=g)], g) for _ in range(N_LOWER + 1)]
    task = ClassificationTask(10, mean=info.mean, std=info.std)
    head = task.build_head(backbone.feature_dim)
    targets = torch.as_tensor(data.targets)
    batches = []
    for _ in range(N_UPPER):
        idx = torch.randint(len(images), (UPPER_BATCH,), generator=g)
        batches.append(((images[idx].float() / 255 - info.mean[0]) / info.std[0], targets[idx]))
    defaults = {"n_lower": N_LOWER, "n_upper": N_UPPER, "lam": 1e-3, "damping": 10.0, "gamma": 1.0,
                "solver": SolverSpec("cg", maxiter=5)}  # fmt: skip
    sgd = lambda lr, wd: lambda params: torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=0.9)  # noqa: E731
    trainer = trainer_cls(backbone=backbone, pretext=pretext, task=task, head=head,
                          settings=BilevelSettings(**{**defaults, **settings}), compute=compute,
                          make_lower_optimizer=sgd(0.05, 1e-5), make_upper_optimizer=sgd(0.01, 1e-4))  # fmt: skip
    for module in trainer.backbones() if compute is not None else []:
        compute.watch(module)
    return trainer, views, batches, str(head_file["name"])


def _plain(trainer: BiSSLTrainer, views: list[list[torch.Tensor]]) -> dict[str, float]:
    for i in range(N_LOWER + N_UPPER):
        trainer.lower_step(views[i % N_LOWER], 10**6)
    return {}


def _cycle(trainer: BiSSLTrainer, views: list[list[torch.Tensor]], batches: list[Any]) -> dict[str, float]:
    for i in range(N_LOWER):
        trainer.lower_step(views[i], 10**6)
    trainer.begin_cycle(views[N_LOWER])
    stats = [trainer.upper_step(batch) for batch in batches]
    return {
        "cg_residual": sum(s["solver_residual"] for s in stats) / len(stats),
        "hvps": sum(s["solver_hvps"] for s in stats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        trainer, views, batches, name = _setup(run)
        cases = {
            "plain": lambda t=trainer, v=views: _plain(t, v),
            "cycle": lambda t=trainer, v=views, b=batches: _cycle(t, v, b),
        }
        times: dict[str, list[float]] = {case: [] for case in cases}
        extra: dict[str, float] = {}
        for repeat in range(args.repeats + 1):
            for case, fn in cases.items():
                start = time.perf_counter()
                out = fn()
                if repeat:  # the first round warms up
                    times[case].append(time.perf_counter() - start)
                extra.update(out)
        plain, cycle = min(times["plain"]), min(times["cycle"])
        row = {"method": name, "plain_28_steps_s": plain, "cycle_s": cycle, "ratio": cycle / plain, **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
