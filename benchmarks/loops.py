"""Where the time of a pretext (pretraining) step and of a fine-tuning step goes, and what the knobs change.

Each step is split into: ``load`` (the next batch from ``BatchStream``, i.e. the DataLoader), ``augment`` (the
batched per-sample views, or ``task.prepare`` for fine-tuning), ``forward`` (the loss), ``backward`` and ``step``
(the optimiser). Loops are built as ``bissl pretrain`` / ``bissl finetune`` build them from the shipped configs
(``pretrain_digits``, ``finetune_digits``; the fine-tuning backbone is the pretraining architecture, freshly
initialised), plus a heavier pretext case: ResNet-18 (small stem) on digits resized to 32 px, batch 16.

Variants, side by side in one run: 1 or 2 torch threads, DataLoader workers (0 or 2), ``channels_last`` (model and
images), ``torch.compile`` of the backbone (its compile time reported apart; only with ``--compile``, it takes
minutes on 2 cores). Per case: mean milliseconds per phase over ``--steps`` steps after ``--warmup`` steps, taken
from interleaved rounds (the minimum over rounds), so that other jobs on a shared machine bias every variant alike.

    python benchmarks/loops.py [--steps 10] [--rounds 2] [--compile] [--cases pretrain,finetune,pretrain-resnet18]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bissl.config import FinetuneConfig, PretrainConfig, load_config
from bissl.data import build_dataset
from bissl.data.augment import build_view_augmentation
from bissl.downstream.base import build_task
from bissl.engine.build import build_backbone_from_config, build_pretext_on
from bissl.engine.sampling import BatchStream
from bissl.utils.seed import make_generator

PHASES = ("load", "augment", "forward", "backward", "step")
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Variant:
    name: str
    threads: int = 1
    workers: int = 0
    channels_last: bool = False
    compile: bool = False


VARIANTS = (
    Variant("baseline (1 thread, 0 workers)"),
    Variant("2 threads", threads=2),
    Variant("2 DataLoader workers", workers=2),
    Variant("channels_last", channels_last=True),
)
COMPILE = Variant("torch.compile", compile=True)


@dataclass
class Loop:
    """One training step split into phases: each callable takes the previous phase's output."""

    load: Callable[[], Any]
    augment: Callable[[Any], Any]
    forward: Callable[[Any], Tensor]
    params: list[nn.Parameter]
    backbone: nn.Module


def pretext_loop(cfg: PretrainConfig, variant: Variant) -> Loop:
    data = build_dataset(cfg.data.name, "train", image_size=cfg.data.image_size, seed=cfg.data.seed)
    info = data.info
    torch.manual_seed(cfg.seed)
    backbone, _ = build_backbone_from_config(cfg.backbone, info.channels)
    method = build_pretext_on(cfg.pretext.name, cfg.pretext.params, backbone)
    augment = build_view_augmentation(
        cfg.pretext.augmentation or method.augmentation, image_size=cfg.data.image_size, channels=info.channels,
        mean=info.mean, std=info.std, **cfg.pretext.augmentation_params,
    )  # fmt: skip
    stream = BatchStream(data, cfg.data.batch_size, seed=cfg.seed, num_workers=variant.workers)
    net = prepare(backbone, variant)
    step = [0]

    def views(batch: Any) -> list[Tensor]:
        step[0] += 1
        return [memory_format(v, variant) for v in augment(batch[0], make_generator(cfg.seed, "views", step[0]))]

    return Loop(lambda: next(stream), views, lambda v: method.loss(net, v),
                [*backbone.parameters(), *method.head_parameters()], backbone)  # fmt: skip


def finetune_loop(cfg: FinetuneConfig, arch: PretrainConfig, variant: Variant) -> Loop:
    task, splits = build_task(cfg.downstream)
    torch.manual_seed(cfg.seed)
    backbone, _ = build_backbone_from_config(arch.backbone, splits["train"].info.channels)
    head = task.build_head(backbone.feature_dim)
    stream = BatchStream(splits["train"], cfg.batch_size, seed=cfg.seed, num_workers=variant.workers)
    net = prepare(backbone, variant)
    step = [0]

    def prepared(batch: Any) -> tuple[Tensor, Tensor]:
        step[0] += 1
        images, labels = task.prepare(batch, torch.device("cpu"), make_generator(cfg.seed, "finetune_views", step[0]))
        return memory_format(images, variant), labels

    return Loop(lambda: next(stream), prepared, lambda b: task.loss(net, head, b),
                [*backbone.parameters(), *head.parameters()], backbone)  # fmt: skip


def prepare(backbone: nn.Module, variant: Variant) -> nn.Module:
    backbone.train()
    if variant.channels_last:
        backbone.to(memory_format=torch.channels_last)
    return torch.compile(backbone) if variant.compile else backbone


def memory_format(x: Tensor, variant: Variant) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if variant.channels_last else x


def profile(make: Callable[[Variant], Loop], variant: Variant, steps: int, warmup: int) -> dict[str, float]:
    """Mean milliseconds per phase over ``steps`` steps, after ``warmup`` steps (compile time reported apart)."""
    torch.set_num_threads(variant.threads)
    loop = make(variant)
    optimizer = torch.optim.SGD(loop.params, lr=0.01, momentum=0.9)
    totals = dict.fromkeys(PHASES, 0.0)
    start = time.perf_counter()
    for i in range(warmup + steps):
        marks = [time.perf_counter()]
        batch = loop.load()
        marks.append(time.perf_counter())
        inputs = loop.augment(batch)
        marks.append(time.perf_counter())
        loss = loop.forward(inputs)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if i == warmup - 1:
            first = time.perf_counter() - start
        if i >= warmup:
            for phase, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True):
                totals[phase] += 1e3 * (b - a)
    out = {phase: total / steps for phase, total in totals.items()}
    out["total"] = sum(out.values())
    out["warmup_s"] = first
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the minimum per phase is kept")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the backbone (slow to compile)")
    parser.add_argument("--cases", default="pretrain,finetune,pretrain-resnet18")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    pre = load_config(PretrainConfig, "pretrain_digits")
    fine = load_config(FinetuneConfig, "finetune_digits")
    resnet = pre.model_copy(
        update={
            "data": pre.data.model_copy(update={"image_size": 32, "batch_size": 16}),
            "backbone": pre.backbone.model_copy(update={"name": "resnet18", "kwargs": {}}),
        }
    )
    cases: dict[str, Callable[[Variant], Loop]] = {
        "pretrain": lambda v: pretext_loop(pre, v),
        "finetune": lambda v: finetune_loop(fine, pre, v),
        "pretrain-resnet18": lambda v: pretext_loop(resnet, v),
    }
    variants = [*VARIANTS, COMPILE] if args.compile else list(VARIANTS)
    threads = torch.get_num_threads()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for case in args.cases.split(","):
        rows: dict[str, dict[str, float]] = {}
        for r in range(args.rounds):
            for variant in variants:
                warmup = args.warmup if not variant.compile else max(args.warmup, 3)
                row = profile(cases[case], variant, args.steps, warmup)
                best = rows.setdefault(variant.name, row)
                for key in (*PHASES, "total"):
                    best[key] = min(best[key], row[key])
                print(f"  [{case}] {variant.name:<32} round {r + 1}/{args.rounds}: {row['total']:8.1f} ms/step",
                      flush=True)  # fmt: skip
        results[case] = rows
        base = rows[VARIANTS[0].name]["total"]
        print(f"\n[{case}] ms per step (share of the step)")
        print(f"{'variant':<32} " + " ".join(f"{p:>15}" for p in PHASES) + f" {'total':>9} {'vs base':>8}")
        for name, row in rows.items():
            cells = " ".join(f"{row[p]:7.1f} ({100 * row[p] / row['total']:3.0f}%)" for p in PHASES)
            print(f"{name:<32} {cells} {row['total']:9.1f} {base / row['total']:7.2f}x")
        compiled = rows.get(COMPILE.name)
        if compiled is not None:
            print(f"torch.compile: first {max(args.warmup, 3)} steps took {compiled['warmup_s']:.1f} s (compilation)")
    torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"loops{'-compile' if args.compile else ''}-cpu.json"
    path.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
