"""``bissl pretrain``: self-supervised pretraining of a backbone with any registered pretext method.

Each step draws the views of its batch from a generator seeded by ``(seed, step)`` and each epoch's
batch order from ``(seed, epoch)``, so ``--resume`` continues bit-exactly on CPU.

Under ``torchrun`` every rank trains on its shard of each global batch of ``data.batch_size`` in
``DistributedDataParallel``; SimCLR-type methods then contrast with the negatives of every rank
(``pretext.params.gather_distributed``, on unless set), and rank 0 alone writes logs, checkpoints and exports.
How views are drawn per shard, and which runs therefore equal which: :mod:`bissl.engine.microbatches`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bissl.config import PretrainConfig
from bissl.data import build_dataset
from bissl.data.base import ImageDataset
from bissl.distributed import require_in_sync, world, wrap_ddp
from bissl.engine.build import (
    build_backbone_from_config,
    build_optimization,
    build_pretext_on,
    data_kwargs,
    view_augmentation,
)
from bissl.engine.checkpoint import export_backbone, export_head
from bissl.engine.data_checks import check_batch_size
from bissl.engine.files import BACKBONE_FILE, PRETEXT_HEAD_FILE
from bissl.engine.guard import DivergenceGuard
from bissl.engine.microbatches import BatchPlan, Objective, accumulate_gradients, use_channels_last
from bissl.engine.run import Run
from bissl.engine.sampling import BatchStream, steps_per_epoch
from bissl.eval.frozen import frozen_features, frozen_scores
from bissl.utils.compute import ComputeCounter
from bissl.utils.errors import ConfigError
from bissl.utils.numerics import clip_gradients
from bissl.utils.seed import seed_everything

log = logging.getLogger("bissl.pretrain")


@dataclass
class PretrainResult:
    out_dir: Path
    backbone_path: Path | None
    pretext_head_path: Path | None
    step: int
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)


def monitor_sets(cfg: PretrainConfig) -> dict[str, ImageDataset] | None:
    """Labelled train/val/test splits for kNN monitoring, or ``None`` when monitoring is off or impossible."""
    name = cfg.monitor.dataset or cfg.data.name
    if cfg.monitor.every_epochs == 0 and cfg.monitor.linear_probe_epochs == 0:
        return None
    kwargs = {"root": cfg.data.root, "image_size": cfg.data.image_size, "download": cfg.data.download}
    sets = {split: build_dataset(name, split, seed=cfg.data.seed, **kwargs) for split in ("train", "val", "test")}
    info = sets["train"].info
    if info.num_classes == 0 or getattr(info, "kind", "classification") != "classification":
        what = "no labels" if info.num_classes == 0 else f"{info.kind} targets, not classes"
        if cfg.monitor.dataset is not None:
            raise ConfigError(f"monitor.dataset={name!r} has {what}; choose a labelled dataset for kNN")
        log.info("dataset %s has %s: kNN monitoring is off (set monitor.dataset)", name, what)
        return None
    return sets


def pretrain(
    cfg: PretrainConfig, *, resume: bool = False, overwrite: bool = False, until_step: int | None = None
) -> PretrainResult:
    """Run (or continue, with ``resume``) pretraining; stop early after ``until_step`` steps if given.

    Writes ``backbone.pt`` and ``pretext_head.pt`` (weights-only loadable), ``checkpoints/last.pt``,
    ``metrics.jsonl|csv``, TensorBoard events and ``summary.json`` under ``cfg.out_dir``.
    """
    with Run.start("pretrain", cfg, resume=resume, overwrite=overwrite) as run:
        train_set = build_dataset(cfg.data.name, "train", seed=cfg.data.seed, **data_kwargs(cfg.data))
        check_batch_size(len(train_set), cfg.data.batch_size, cfg.data.name, "data.batch_size")
        plan = BatchPlan.create(
            cfg.data.batch_size, accumulation=cfg.grad_accumulation, augment_shards=cfg.distributed.augment_shards,
            batch_key="data.batch_size",
        )  # fmt: skip
        monitor = monitor_sets(cfg)
        seed_everything(cfg.seed)
        backbone, spec = build_backbone_from_config(
            cfg.backbone, train_set.info.channels, cfg.data.image_size, cfg.plugins
        )
        use_channels_last(backbone.to(run.device), cfg.channels_last)
        method = build_pretext_on(cfg.pretext.name, cfg.pretext.params, backbone).to(run.device)
        compute = ComputeCounter()
        compute.watch(backbone)
        augment = view_augmentation(cfg.pretext, method, cfg.data, train_set.info)
        model = wrap_ddp(
            Objective(lambda views: method.loss(backbone, views), backbone=backbone, pretext=method), run.device,
            sync_batchnorm=cfg.distributed.sync_batchnorm,
        )  # fmt: skip
        trainable = [*(p for p in backbone.parameters() if p.requires_grad), *method.head_parameters()]
        per_epoch = steps_per_epoch(len(train_set), cfg.data.batch_size)
        optimizer, scheduler = build_optimization(cfg.optim, trainable, cfg.epochs * per_epoch, per_epoch)
        saved = run.resume(backbone=backbone, pretext=method, optimizer=optimizer, scheduler=scheduler, compute=compute)
        step = int(saved.get("step", 0))
        plan.check_resumed(saved.get("augment_shards", plan.augment_shards))
        require_in_sync(model, "the backbone or pretext heads (BYOL: with its EMA target)")
        stream = BatchStream(
            train_set, cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
            pin_memory=run.device.type == "cuda", position=step, rank=plan.rank, world_size=plan.world_size,
        )  # fmt: skip
        guard = DivergenceGuard("pretext loss", "optim.lr")
        total, stop = cfg.epochs * per_epoch, min(cfg.epochs * per_epoch, until_step or cfg.epochs * per_epoch)
        if step == 0:
            monitor_knn(run, cfg, backbone, monitor, step)
        bar = run.progress(total, step, "step")
        while step < stop:
            images = next(stream)[0].to(run.device, non_blocking=True)
            views = [plan.augment(augment, rows, s, cfg.seed, "views", step) for s, rows in plan.micro_batches(images)]
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(model, views, precision=run.precision, device=run.device)
            guard.check(step, loss, backbone.parameters())
            grad_norm = clip_gradients(trainable, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            method.on_step_end(backbone, step, total)
            bar.update(1)
            if step % cfg.log.every_steps == 0 or step == stop:
                run.log(
                    step, "train", {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}
                )
                bar.set_postfix(loss=f"{loss.item():.4f}")
            epoch_end = step % per_epoch == 0
            if epoch_end and cfg.monitor.every_epochs and (step // per_epoch) % cfg.monitor.every_epochs == 0:
                monitor_knn(run, cfg, backbone, monitor, step)
            every = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
            run.checkpoint(due=epoch_end or step == stop or bool(every), log_step=step, step=step,
                           augment_shards=plan.augment_shards)  # fmt: skip
        bar.close()
        if step < total:
            return PretrainResult(run.out, None, None, step, finished=False)
        metrics = final_metrics(cfg, backbone, monitor, run.device, train_set.info.channels)
        run.log(step, "final", metrics)
        out = run.out
        run.finish(
            {"steps": step, "processes": world(), "metrics": metrics, "backbone": str(out / BACKBONE_FILE),
             "pretext_head": str(out / PRETEXT_HEAD_FILE), "compute": compute.as_dict()},
            [lambda out: export_backbone(out / BACKBONE_FILE, backbone, spec),
             lambda out: export_head(out / PRETEXT_HEAD_FILE, method, kind="pretext", name=cfg.pretext.name,
                                     params=cfg.pretext.params, plugins=cfg.plugins)],
        )  # fmt: skip
    return PretrainResult(out, out / BACKBONE_FILE, out / PRETEXT_HEAD_FILE, step, finished=True, metrics=metrics)


def monitor_knn(
    run: Run, cfg: PretrainConfig, backbone: nn.Module, monitor: dict[str, ImageDataset] | None, step: int
) -> None:
    """Log the kNN accuracy of the frozen backbone on the monitor's validation split (when monitoring)."""
    if monitor is not None and cfg.monitor.every_epochs > 0:
        scores = monitor_scores(cfg, backbone, monitor, run.device, "val", probe_epochs=0)
        run.log(step, "monitor", {"knn_val": scores["knn_val"]})
        backbone.train()


def final_metrics(
    cfg: PretrainConfig,
    backbone: nn.Module,
    monitor: dict[str, ImageDataset] | None,
    device: torch.device,
    channels: int,
) -> dict[str, float]:
    """Test-split kNN / linear-probe accuracy of the trained backbone and of its random initialisation."""
    if monitor is None:
        return {}
    seed_everything(cfg.seed)  # the same initial weights the run started from
    random_init, _ = build_backbone_from_config(cfg.backbone, channels, cfg.data.image_size)
    metrics: dict[str, float] = {}
    for label, model in (("", backbone), ("random_init_", random_init.to(device))):
        scores = monitor_scores(cfg, model, monitor, device, "test", probe_epochs=cfg.monitor.linear_probe_epochs)
        metrics.update({f"{label}{key}": value for key, value in scores.items()})
    return metrics


def monitor_scores(
    cfg: PretrainConfig,
    backbone: nn.Module,
    sets: dict[str, ImageDataset],
    device: torch.device,
    split: str,
    *,
    probe_epochs: int,
) -> dict[str, float]:
    """``knn_<split>`` (and ``linear_probe_<split>``) of the frozen backbone, the train split as memory bank."""
    train, scored = (
        frozen_features(backbone, sets[s], device=device, num_workers=cfg.data.num_workers) for s in ("train", split)
    )
    return frozen_scores(
        train, {split: scored}, knn_k=cfg.monitor.knn_k, knn_temperature=cfg.monitor.knn_temperature,
        probe_epochs=probe_epochs, seed=cfg.seed,
    )  # fmt: skip
