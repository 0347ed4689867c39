"""``bissl finetune``: supervised fine-tuning of a backbone on a downstream task, selected on validation.

The backbone and a fresh task head are trained together (cosine schedule, optional warm-up; optionally the
backbone at ``backbone_lr_factor`` times the head's lr and pulled toward its starting weights by L2-SP, ``l2sp``);
the weights with the best validation value of the task's primary metric (in the direction the task declares) are
kept and evaluated once on the TEST split. Batches and augmentations are seeded by ``(seed, step)``; ``--resume``
continues exactly.

Under ``torchrun`` every rank trains on its shard of each global batch of ``batch_size`` in
``DistributedDataParallel``; validation and test splits are sharded without padding and their predictions put
back together, so metrics count every sample once; rank 0 alone writes logs, checkpoints and exports.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bissl.config import FinetuneConfig
from bissl.data.base import ImageDataset
from bissl.distributed import require_in_sync, world, wrap_ddp
from bissl.downstream.base import DownstreamTask, build_task
from bissl.engine.anchor import L2SP
from bissl.engine.build import add_lora, build_optimization, trainable
from bissl.engine.checkpoint import (
    export_backbone,
    export_head,
    load_backbone,
    resolve_backbone_file,
)
from bissl.engine.data_checks import check_batch_size, check_channels
from bissl.engine.files import BACKBONE_FILE, DOWNSTREAM_HEAD_FILE
from bissl.engine.guard import DivergenceGuard
from bissl.engine.head_warmup import warm_up_head
from bissl.engine.microbatches import BatchPlan, Objective, accumulate_gradients, use_channels_last
from bissl.engine.run import Run
from bissl.engine.sampling import BatchStream, steps_per_epoch
from bissl.eval.task import evaluate_split
from bissl.models.lora import set_trainable
from bissl.utils.compute import ComputeCounter
from bissl.utils.numerics import clip_gradients
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
    overwrite: bool = False,
    until_epoch: int | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune (or continue, with ``resume``); stop after ``until_epoch`` epochs if given (resumable).
    ``on_eval(epoch, val)`` runs after each validation (HPO reports and prunes there; what it raises ends the run)."""
    with Run.start("finetune", cfg, resume=resume, overwrite=overwrite) as run:
        seed_everything(cfg.seed)
        backbone, spec = add_lora(*load_backbone(resolve_backbone_file(cfg.backbone), cfg.plugins), cfg.lora)
        set_trainable(backbone, cfg.trainable)
        task, splits = build_task(cfg.downstream)
        check_batch_size(len(splits["train"]), cfg.batch_size, cfg.downstream.data.name, "batch_size")
        plan = BatchPlan.create(
            cfg.batch_size, accumulation=cfg.grad_accumulation, augment_shards=cfg.distributed.augment_shards,
            batch_key="batch_size",
        )  # fmt: skip
        check_channels(splits["train"].info.channels, spec["in_channels"], cfg.downstream.data.name)
        seed_everything(derive_seed(cfg.seed, "head"))
        head = task.build_head_for(backbone).to(run.device)
        use_channels_last(backbone.to(run.device), cfg.channels_last)
        compute = ComputeCounter()
        compute.watch(backbone)
        objective = Objective(lambda batch: task.loss(backbone, head, batch), backbone=backbone, head=head)
        model = wrap_ddp(objective, run.device, sync_batchnorm=cfg.distributed.sync_batchnorm)
        backbone_params = trainable(backbone.parameters())
        anchor = L2SP(backbone_params, cfg.l2sp) if cfg.l2sp > 0 else None  # w0: the backbone as loaded (not resumed)
        params = [*backbone_params, *head.parameters()]
        groups = [{"params": backbone_params, "lr": cfg.optim.lr * cfg.backbone_lr_factor},
                  {"params": list(head.parameters())}]  # fmt: skip
        per_epoch = steps_per_epoch(len(splits["train"]), cfg.batch_size)
        optimizer, scheduler = build_optimization(cfg.optim, groups, cfg.epochs * per_epoch, per_epoch)
        primary = task.primary()
        saved = run.resume(backbone=backbone, head=head, optimizer=optimizer, scheduler=scheduler, compute=compute)
        epoch = int(saved.get("epoch", 0))
        best = saved.get("best", {"score": primary.worst, "epoch": 0, "backbone": None, "head": None})
        plan.check_resumed(saved.get("augment_shards", plan.augment_shards))
        require_in_sync(objective, "the backbone or head")
        stream = BatchStream(
            splits["train"], cfg.batch_size, seed=derive_seed(cfg.seed, "finetune"), position=epoch * per_epoch,
            num_workers=cfg.downstream.data.num_workers, pin_memory=run.device.type == "cuda", rank=plan.rank,
            world_size=plan.world_size,
        )  # fmt: skip
        guard = DivergenceGuard("fine-tuning loss", "optim.lr (or set optim.grad_clip)")
        score = lambda split: evaluate_split(task, backbone, head, splits[split], run.device, run.precision)  # noqa: E731

        def prepare(rows: Any, generator: torch.Generator) -> Any:
            return task.prepare(rows, run.device, generator)

        if not run.has_state and cfg.head_warmup_epochs > 0:
            with run.interruptible("the head warm-up"):
                best = _probe_first(cfg, run, task, backbone, head, splits, plan, score)
            run.checkpoint(log_step=0, epoch=0, best=best, augment_shards=plan.augment_shards)
        bar = run.progress(cfg.epochs, epoch, "epoch")
        while epoch < min(cfg.epochs, until_epoch or cfg.epochs):
            backbone.train()
            head.train()
            losses = []
            for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
                batches = [plan.augment(prepare, rows, s, cfg.seed, "finetune_views", step)
                           for s, rows in plan.micro_batches(next(stream))]  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                loss = accumulate_gradients(model, batches, precision=run.precision, device=run.device)
                guard.check(step, loss, backbone.parameters())
                if anchor is not None:
                    anchor.add_gradient()
                clip_gradients(params, cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
            epoch += 1
            record = {"train_loss": sum(losses) / per_epoch, "lr": optimizer.param_groups[-1]["lr"]}  # the head's
            if anchor is not None:
                record["l2sp_penalty"] = anchor.penalty().item()
            val = score("val") if epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs else {}
            record.update({f"val_{k}": v for k, v in val.items()})
            if val and primary.better(val[primary.key], best["score"]):
                best = {"score": val[primary.key], "epoch": epoch, "backbone": copy.deepcopy(backbone.state_dict()),
                        "head": copy.deepcopy(head.state_dict())}  # fmt: skip
            run.log(epoch, "epoch", record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{val.get(primary.key, 0):.3f}")
            run.checkpoint(log_step=epoch, epoch=epoch, best=best, augment_shards=plan.augment_shards)
            if on_eval is not None and val:
                on_eval(epoch, val)
        bar.close()
        if epoch < cfg.epochs:
            return FinetuneResult(run.out, epoch, finished=False)
        backbone.load_state_dict(best["backbone"])
        head.load_state_dict(best["head"])
        metrics = {
            **{f"test_{k}": v for k, v in score("test").items()},
            **{f"val_{k}": v for k, v in score("val").items()},
        }
        run.log(epoch, "final", {**metrics, "best_epoch": best["epoch"]})
        run.finish(
            {"epochs": epoch, "best_epoch": best["epoch"], "processes": world(), "metrics": metrics,
             "backbone_init": str(resolve_backbone_file(cfg.backbone)), "compute": compute.as_dict()},
            [lambda out: export_backbone(out / BACKBONE_FILE, backbone, spec),
             lambda out: export_head(out / DOWNSTREAM_HEAD_FILE, head, kind="downstream", name=cfg.downstream.task,
                                     params=run.config_dict["downstream"], plugins=cfg.plugins)],
        )  # fmt: skip
    return FinetuneResult(run.out, epoch, finished=True, best_epoch=best["epoch"], metrics=metrics)


def _probe_first(
    cfg: FinetuneConfig,
    run: Run,
    task: DownstreamTask,
    backbone: nn.Module,
    head: nn.Module,
    splits: dict[str, ImageDataset],
    plan: BatchPlan,
    score: Callable[[str], dict[str, float]],
) -> dict[str, Any]:
    """Linear probe, then fine-tune (LP-FT): the head is first trained on the frozen backbone for
    ``head_warmup_epochs``, and that probe is epoch 0's candidate for model selection, so a fine-tune whose later
    epochs lose what the frozen features held keeps the probe instead (few-shot fine-tuning often does)."""
    ranks = {"rank": plan.rank, "world_size": plan.world_size}
    stream = BatchStream(splits["train"], cfg.batch_size, seed=derive_seed(cfg.seed, "warmup"), **ranks)
    loss = warm_up_head(
        task, backbone, head, stream, steps=cfg.head_warmup_epochs * stream.per_epoch, lr=cfg.head_warmup_lr,
        device=run.device, seed=cfg.seed, plan=plan, precision=run.precision, lr_key="head_warmup_lr",
    )  # fmt: skip
    val = score("val")
    run.log(0, "head_warmup", {"loss": loss, **{f"val_{k}": v for k, v in val.items()}})
    snapshot = {"backbone": copy.deepcopy(backbone.state_dict()), "head": copy.deepcopy(head.state_dict())}
    return {"score": val[task.primary().key], "epoch": 0, **snapshot}
