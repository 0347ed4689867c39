"""``bissl pretrain``: self-supervised pretraining of a backbone with any registered pretext method.

Each step draws the views of its batch from a generator seeded by ``(seed, step)`` and each epoch's
batch order from ``(seed, epoch)``, so ``--resume`` continues bit-exactly on CPU.

Under ``torchrun`` every rank trains on its shard of each global batch of ``data.batch_size`` in
``DistributedDataParallel``; SimCLR-type methods then contrast with the negatives of every rank
(``pretext.params.gather_distributed``, on unless set), and rank 0 alone writes logs, checkpoints and exports.
How views are drawn per shard, and which runs therefore equal which: :mod:`bissl.engine.step`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bissl.config import BackboneConfig, PretrainConfig
from bissl.data import build_dataset
from bissl.data.augment import build_view_augmentation
from bissl.data.base import ImageDataset
from bissl.dist import (
    barrier,
    init_from_env,
    is_main,
    main_only,
    on_main,
    require_in_sync,
    world,
    wrap_ddp,
)
from bissl.engine.checkpoint import (
    BACKBONE_FILE,
    PRETEXT_HEAD_FILE,
    backbone_spec,
    export_backbone,
    export_head,
    load_state,
    save_state,
)
from bissl.engine.logger import MetricLogger
from bissl.engine.names import validate_names
from bissl.engine.optim import build_optimizer, cosine_with_warmup
from bissl.engine.runtime import RESUMABLE_KEYS, STATE_FILE, check_batch_size, prepare_run_dir, write_summary
from bissl.engine.sampling import BatchStream, steps_per_epoch
from bissl.engine.step import BatchPlan, Objective, accumulate_gradients, resolve_precision, use_channels_last
from bissl.models import build_backbone
from bissl.models.weights import load_backbone_weights
from bissl.pretext import PRETEXT_METHODS, build_pretext
from bissl.pretext.base import PretextMethod
from bissl.stages.evaluate import frozen_features, frozen_scores
from bissl.utils.errors import ConfigError
from bissl.utils.numerics import clip_gradients, require_finite
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


def build_backbone_from_config(
    cfg: BackboneConfig, in_channels: int, image_size: int | None = None, plugins: list[str] | tuple[str, ...] = ()
) -> tuple[nn.Module, dict[str, Any]]:
    """The configured backbone (optionally initialised from local weights) and its rebuild spec."""
    backbone = build_backbone(
        cfg.name, in_channels=in_channels, small_images=cfg.small_images, image_size=image_size, **cfg.kwargs
    )
    if cfg.weights is not None:
        load_backbone_weights(backbone, cfg.weights)
    spec = backbone_spec(cfg.name, in_channels, cfg.small_images, cfg.kwargs, image_size=image_size, plugins=plugins)
    return backbone, spec


def distributed_pretext_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` of pretext method ``name``, with ``gather_distributed`` switched on under DDP (more than one
    process) for a method that has that setting, unless ``params`` sets it."""
    params = dict(params)
    if world() > 1 and "gather_distributed" in PRETEXT_METHODS.get(name).Config.model_fields:
        params.setdefault("gather_distributed", True)
    return params


def build_pretext_from_config(cfg: PretrainConfig, backbone: nn.Module) -> PretextMethod:
    """The configured pretext method, set up on ``backbone``; under DDP a method with a ``gather_distributed``
    setting contrasts with every rank's samples unless ``pretext.params`` says otherwise."""
    params = distributed_pretext_params(cfg.pretext.name, cfg.pretext.params)
    method = build_pretext(cfg.pretext.name, backbone.feature_dim, params)
    method.setup(backbone)
    return method


def monitor_sets(cfg: PretrainConfig) -> dict[str, ImageDataset] | None:
    """Labelled train/val/test splits for kNN monitoring, or ``None`` when monitoring is off or impossible."""
    name = cfg.monitor.dataset or cfg.data.name
    if cfg.monitor.every_epochs == 0 and cfg.monitor.linear_probe_epochs == 0:
        return None
    kwargs = {"root": cfg.data.root, "image_size": cfg.data.image_size, "download": cfg.data.download}
    sets = {split: build_dataset(name, split, seed=cfg.data.seed, **kwargs) for split in ("train", "val", "test")}
    if sets["train"].info.num_classes == 0:
        if cfg.monitor.dataset is not None:
            raise ConfigError(f"monitor.dataset={name!r} has no labels; choose a labelled dataset for kNN")
        log.info("dataset %s has no labels: kNN monitoring is off (set monitor.dataset)", name)
        return None
    return sets


def pretrain(cfg: PretrainConfig, *, resume: bool = False, until_step: int | None = None) -> PretrainResult:
    """Run (or continue, with ``resume``) pretraining; stop early after ``until_step`` steps if given.

    Writes ``backbone.pt`` and ``pretext_head.pt`` (weights-only loadable), ``checkpoints/last.pt``,
    ``metrics.jsonl|csv``, TensorBoard events and ``summary.json`` under ``cfg.out_dir``.
    """
    start_time = time.perf_counter()
    validate_names(cfg)
    device = init_from_env(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    out, has_state = on_main(lambda: prepare_run_dir(cfg.out_dir, cfg, resume=resume))
    data_kwargs = {"root": cfg.data.root, "image_size": cfg.data.image_size, "download": cfg.data.download}
    train_set = build_dataset(cfg.data.name, "train", seed=cfg.data.seed, **data_kwargs)
    check_batch_size(len(train_set), cfg.data.batch_size, cfg.data.name, "data.batch_size")
    plan = BatchPlan.create(
        cfg.data.batch_size, accumulation=cfg.grad_accumulation, augment_shards=cfg.distributed.augment_shards,
        batch_key="data.batch_size",
    )  # fmt: skip
    info = train_set.info
    monitor = monitor_sets(cfg)

    seed_everything(cfg.seed)
    backbone, spec = build_backbone_from_config(cfg.backbone, info.channels, cfg.data.image_size, cfg.plugins)
    backbone.to(device)
    use_channels_last(backbone, cfg.channels_last)
    method = build_pretext_from_config(cfg, backbone).to(device)
    augment = build_view_augmentation(
        cfg.pretext.augmentation or method.augmentation,
        image_size=cfg.data.image_size,
        channels=info.channels,
        mean=info.mean,
        std=info.std,
        **cfg.pretext.augmentation_params,
    )
    objective = Objective(lambda views: method.loss(backbone, views), backbone=backbone, pretext=method)
    model = wrap_ddp(objective, device, sync_batchnorm=cfg.distributed.sync_batchnorm)
    trainable = [*backbone.parameters(), *method.head_parameters()]
    optimizer = build_optimizer(
        cfg.optim.name, trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum
    )
    per_epoch = steps_per_epoch(len(train_set), cfg.data.batch_size)
    total_steps = cfg.epochs * per_epoch
    scheduler = cosine_with_warmup(
        optimizer, round(cfg.optim.warmup_epochs * per_epoch), total_steps, min_lr_ratio=cfg.optim.min_lr_ratio
    )

    config_dict = cfg.model_dump(mode="json")
    step = 0
    if has_state:
        state = load_state(out / STATE_FILE, config_dict, ignore=RESUMABLE_KEYS)
        backbone.load_state_dict(state["backbone"])
        method.load_state_dict(state["pretext"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        plan.check_resumed(state.get("augment_shards", 1))
        log.info("resumed %s at step %d/%d", out, step, total_steps)
    require_in_sync(objective, "the backbone or pretext heads (BYOL: with its EMA target)")
    logger = main_only(
        lambda: MetricLogger(out, tensorboard=cfg.log.tensorboard, resume_step=step if has_state else None)
    )

    def checkpoint() -> None:
        if not is_main():
            return
        save_state(
            out / STATE_FILE,
            {
                "step": step,
                "backbone": backbone.state_dict(),
                "pretext": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "augment_shards": plan.augment_shards,
            },
            config_dict,
        )

    def monitor_knn() -> None:
        if monitor is not None and cfg.monitor.every_epochs > 0:
            scores = monitor_scores(cfg, backbone, monitor, device, "val", probe_epochs=0)
            logger.log(step, "monitor", {"knn_val": scores["knn_val"]})
            backbone.train()

    if step == 0:
        monitor_knn()
    show = cfg.log.progress and is_main()
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", disable=not show, dynamic_ncols=True)
    backbone.train()
    method.train()
    stop = total_steps if until_step is None else min(total_steps, until_step)
    stream = BatchStream(
        train_set, cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda", position=step, rank=plan.rank, world_size=plan.world_size,
    )  # fmt: skip
    while step < stop:
        images, _ = next(stream)
        images = images.to(device, non_blocking=True)
        views = [plan.augment(augment, rows, s, cfg.seed, "views", step) for s, rows in plan.micro_batches(images)]
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, views, precision=precision, device=device)
        require_finite(loss, f"pretext loss at step {step}", "lower optim.lr or set optim.grad_clip")
        grad_norm = clip_gradients(trainable, cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        method.on_step_end(backbone, step, total_steps)
        bar.update(1)
        if step % cfg.log.every_steps == 0 or step == stop:
            lr = optimizer.param_groups[0]["lr"]
            logger.log(step, "train", {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        epoch_end = step % per_epoch == 0
        if epoch_end and cfg.monitor.every_epochs and (step // per_epoch) % cfg.monitor.every_epochs == 0:
            monitor_knn()
        if epoch_end or step == stop or (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0):
            checkpoint()
    bar.close()
    if step < total_steps:
        logger.close()
        barrier()
        return PretrainResult(out, None, None, step, finished=False)

    if is_main():
        export_backbone(out / BACKBONE_FILE, backbone, spec)
        export_head(
            out / PRETEXT_HEAD_FILE, method, kind="pretext", name=cfg.pretext.name, params=cfg.pretext.params,
            plugins=cfg.plugins,
        )  # fmt: skip
    metrics = final_metrics(cfg, backbone, monitor, device, info.channels)
    logger.log(step, "final", metrics)
    logger.close()
    summary = {
        "stage": "pretrain",
        "steps": step,
        "processes": world(),
        "wall_time_s": time.perf_counter() - start_time,
        "metrics": metrics,
        "backbone": str(out / BACKBONE_FILE),
        "pretext_head": str(out / PRETEXT_HEAD_FILE),
    }
    on_main(lambda: write_summary(out, summary))
    barrier()
    return PretrainResult(out, out / BACKBONE_FILE, out / PRETEXT_HEAD_FILE, step, finished=True, metrics=metrics)


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
