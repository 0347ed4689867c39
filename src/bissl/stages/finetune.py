"""``bissl finetune``: supervised fine-tuning of a backbone on a downstream task, selected on validation.

The backbone and a fresh task head are trained together (cosine schedule, optional warm-up); the weights with
the best validation value of the task's primary metric (in the direction the task declares) are kept and
evaluated once on the TEST split. Batches and augmentations are seeded by ``(seed, step)``; ``--resume``
continues exactly.

Under ``torchrun`` every rank trains on its shard of each global batch of ``batch_size`` in
``DistributedDataParallel``; validation and test splits are sharded without padding and their predictions put
back together, so metrics count every sample once; rank 0 alone writes logs, checkpoints and exports.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bissl.config import FinetuneConfig
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
from bissl.downstream.base import build_task
from bissl.engine.checkpoint import (
    BACKBONE_FILE,
    DOWNSTREAM_HEAD_FILE,
    export_backbone,
    export_head,
    load_backbone,
    load_state,
    resolve_backbone_file,
    save_state,
)
from bissl.engine.evaluation import evaluate_split
from bissl.engine.logger import MetricLogger
from bissl.engine.names import validate_names
from bissl.engine.optim import build_optimizer, cosine_with_warmup
from bissl.engine.runtime import (
    RESUMABLE_KEYS,
    STATE_FILE,
    check_batch_size,
    check_channels,
    prepare_run_dir,
    write_summary,
)
from bissl.engine.sampling import BatchStream, steps_per_epoch
from bissl.engine.step import BatchPlan, Objective, accumulate_gradients, resolve_precision, use_channels_last
from bissl.utils.numerics import clip_gradients, require_finite
from bissl.utils.seed import derive_seed, seed_everything

log = logging.getLogger("bissl.finetune")


@dataclass
class FinetuneResult:
    out_dir: Path
    epoch: int
    finished: bool
    best_epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def finetune(
    cfg: FinetuneConfig,
    *,
    resume: bool = False,
    until_epoch: int | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune (or continue, with ``resume``); stop after ``until_epoch`` epochs if given (resumable).

    ``on_eval(epoch, val_metrics)`` is called after every validation (hyper-parameter search uses it to
    report and prune); an exception it raises stops the run after that epoch's checkpoint is written.
    """
    start_time = time.perf_counter()
    validate_names(cfg)
    device = init_from_env(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    out, has_state = on_main(lambda: prepare_run_dir(cfg.out_dir, cfg, resume=resume))
    seed_everything(cfg.seed)
    backbone, spec = load_backbone(resolve_backbone_file(cfg.backbone), cfg.plugins)
    task, splits = build_task(cfg.downstream)
    train_set = splits["train"]
    check_batch_size(len(train_set), cfg.batch_size, cfg.downstream.data.name, "batch_size")
    plan = BatchPlan.create(
        cfg.batch_size, accumulation=cfg.grad_accumulation, augment_shards=cfg.distributed.augment_shards,
        batch_key="batch_size",
    )  # fmt: skip
    check_channels(train_set.info.channels, spec["in_channels"], cfg.downstream.data.name)
    seed_everything(derive_seed(cfg.seed, "head"))
    head = task.build_head(backbone.feature_dim)
    backbone.to(device)
    head.to(device)
    use_channels_last(backbone, cfg.channels_last)
    objective = Objective(lambda batch: task.loss(backbone, head, batch), backbone=backbone, head=head)
    model = wrap_ddp(objective, device, sync_batchnorm=cfg.distributed.sync_batchnorm)
    params = [*backbone.parameters(), *head.parameters()]
    o = cfg.optim
    optimizer = build_optimizer(o.name, params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    per_epoch = steps_per_epoch(len(train_set), cfg.batch_size)
    total = cfg.epochs * per_epoch
    scheduler = cosine_with_warmup(optimizer, round(o.warmup_epochs * per_epoch), total, min_lr_ratio=o.min_lr_ratio)
    stream = BatchStream(
        train_set, cfg.batch_size, seed=derive_seed(cfg.seed, "finetune"), num_workers=cfg.downstream.data.num_workers,
        pin_memory=device.type == "cuda", rank=plan.rank, world_size=plan.world_size,
    )  # fmt: skip

    config_dict = cfg.model_dump(mode="json")
    epoch, step = 0, 0
    primary = task.primary()
    best: dict[str, Any] = {"score": primary.worst, "epoch": 0, "backbone": None, "head": None}
    if has_state:
        state = load_state(out / STATE_FILE, config_dict, ignore=RESUMABLE_KEYS)
        backbone.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, best = int(state["epoch"]), state["best"]
        step = stream.position = epoch * per_epoch
        plan.check_resumed(state.get("augment_shards", 1))
        log.info("resumed %s at epoch %d/%d", out, epoch, cfg.epochs)
    require_in_sync(objective, "the backbone or head")
    logger = main_only(
        lambda: MetricLogger(out, tensorboard=cfg.log.tensorboard, resume_step=epoch if has_state else None)
    )

    def prepare(rows: Any, generator: torch.Generator) -> Any:
        return task.prepare(rows, device, generator)

    def score(split: str) -> dict[str, float]:
        return evaluate_split(task, backbone, head, splits[split], device, precision)

    try:
        stop = cfg.epochs if until_epoch is None else min(cfg.epochs, until_epoch)
        show = cfg.log.progress and is_main()
        bar = tqdm(total=cfg.epochs, initial=epoch, desc="finetune", unit="epoch", disable=not show)
        while epoch < stop:
            backbone.train()
            head.train()
            loss_sum = 0.0
            for _ in range(per_epoch):
                batches = [
                    plan.augment(prepare, rows, s, cfg.seed, "finetune_views", step)
                    for s, rows in plan.micro_batches(next(stream))
                ]
                optimizer.zero_grad(set_to_none=True)
                loss = accumulate_gradients(model, batches, precision=precision, device=device)
                require_finite(loss, f"fine-tuning loss at step {step}", "lower optim.lr or set optim.grad_clip")
                clip_gradients(params, o.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum += loss.item()
            epoch += 1
            record = {"train_loss": loss_sum / per_epoch, "lr": optimizer.param_groups[0]["lr"]}
            if epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs:
                val = score("val")
                record.update({f"val_{k}": v for k, v in val.items()})
                if primary.better(val[primary.key], best["score"]):
                    best = {
                        "score": val[primary.key],
                        "epoch": epoch,
                        "backbone": copy.deepcopy(backbone.state_dict()),
                        "head": copy.deepcopy(head.state_dict()),
                    }
            logger.log(epoch, "epoch", record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{record.get('val_' + primary.key, 0):.3f}")
            state = {
                "epoch": epoch,
                "backbone": backbone.state_dict(),
                "head": head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best": best,
                "augment_shards": plan.augment_shards,
            }
            if is_main():
                save_state(out / STATE_FILE, state, config_dict)
            if on_eval is not None and "val_" + primary.key in record:
                on_eval(epoch, {k.removeprefix("val_"): v for k, v in record.items() if k.startswith("val_")})
        bar.close()
        if epoch < cfg.epochs:
            barrier()
            return FinetuneResult(out, epoch, finished=False)

        backbone.load_state_dict(best["backbone"])
        head.load_state_dict(best["head"])
        metrics = {f"test_{k}": v for k, v in score("test").items()}
        metrics.update({f"val_{k}": v for k, v in score("val").items()})
        logger.log(epoch, "final", {**metrics, "best_epoch": best["epoch"]})
    finally:
        logger.close()
    summary = {
        "stage": "finetune",
        "epochs": epoch,
        "best_epoch": best["epoch"],
        "processes": world(),
        "wall_time_s": time.perf_counter() - start_time,
        "metrics": metrics,
        "backbone_init": str(resolve_backbone_file(cfg.backbone)),
    }
    if is_main():
        export_backbone(out / BACKBONE_FILE, backbone, spec)
        export_head(
            out / DOWNSTREAM_HEAD_FILE, head, kind="downstream", name=cfg.downstream.task,
            params=config_dict["downstream"], plugins=cfg.plugins,
        )  # fmt: skip
        write_summary(out, summary)
    barrier()
    return FinetuneResult(out, epoch, finished=True, best_epoch=best["epoch"], metrics=metrics)
