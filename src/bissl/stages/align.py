"""``bissl align``: the BiSSL stage. Pretrained backbone -> head warm-up -> bilevel cycles -> theta exported.

Files written under ``out_dir``: ``backbone.pt`` (the lower backbone theta, in the format ``pretrain``
writes, to initialise fine-tuning), ``upper_backbone.pt`` (phi), ``pretext_head.pt``,
``downstream_head.pt``, ``checkpoints/last.pt``, ``metrics.jsonl|csv``, ``tb/`` and ``summary.json``. Every logged
cycle and the summary carry ``coupling/*``: how far theta followed phi from the pretrained backbone (docs/coupling.md).
Every batch and view is drawn from generators seeded by ``(seed, stream, counter)``, so ``--resume``
continues exactly.

Under ``torchrun`` every rank runs the bilevel cycles on its rows ``r, r + W, ...`` of each global lower and upper
batch (``lower.batch_size`` and ``upper.batch_size`` stay the global sizes), with views drawn per augmentation
shard as in ``pretrain`` (:mod:`bissl.engine.step`). No module is wrapped in ``DistributedDataParallel``: the
trainer averages gradients, hypergradient terms and Hessian-vector products over ranks explicitly
(:class:`~bissl.bilevel.trainer.RankSync`), SimCLR contrasts with every rank's embeddings through a gather that
differentiates twice, and with ``distributed.sync_batchnorm`` BatchNorm uses the statistics of the global batch
(otherwise rank 0's running statistics are copied to every rank after each step, as DDP does). The head warm-up
averages the head's gradients over ranks; validation and test metrics are computed on sharded splits. Rank 0
alone writes files. With ``distributed.sync_batchnorm=true`` and the same ``distributed.augment_shards``, W
processes equal one process on the whole batches up to float rounding (docs/distributed.md).

``precision=bf16`` (CUDA; fp32 with a warning elsewhere) runs every forward pass (lower steps, downstream losses,
the Hessian operator's forward, head warm-up, evaluation) under bf16 autocast; backward passes, Hessian-vector
products and the solver stay fp32 (:class:`~bissl.bilevel.trainer.BiSSLTrainer`'s ``forward_context``).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bissl.bilevel.coupling import CouplingMonitor
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer, RankSync
from bissl.config import AlignConfig, OptimConfig
from bissl.data import build_dataset
from bissl.data.augment import build_view_augmentation
from bissl.dist import (
    all_reduce_mean_,
    barrier,
    broadcast_buffers,
    convert_sync_batchnorm,
    init_from_env,
    is_main,
    main_only,
    on_main,
    require_in_sync,
    world,
)
from bissl.downstream.base import build_task
from bissl.engine.checkpoint import (
    BACKBONE_FILE,
    DOWNSTREAM_HEAD_FILE,
    PRETEXT_HEAD_FILE,
    export_backbone,
    export_head,
    load_backbone,
    load_state,
    read_head_file,
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
from bissl.engine.sampling import BatchStream
from bissl.engine.step import BatchPlan, autocast, resolve_precision
from bissl.pretext import build_pretext
from bissl.stages.head_warmup import warm_up_head
from bissl.stages.pretrain import distributed_pretext_params
from bissl.utils.errors import ConfigError
from bissl.utils.seed import derive_seed, seed_everything

log = logging.getLogger("bissl.align")

UPPER_BACKBONE_FILE = "upper_backbone.pt"


@dataclass
class AlignResult:
    out_dir: Path
    backbone_path: Path | None
    cycle: int
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)


def _optimizer_factory(cfg: OptimConfig) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    return lambda params: build_optimizer(
        cfg.name, params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )


def align(cfg: AlignConfig, *, resume: bool = False, until_cycle: int | None = None) -> AlignResult:
    """Run (or continue) the BiSSL stage; stop after ``until_cycle`` cycles if given (resumable)."""
    start_time = time.perf_counter()
    validate_names(cfg)
    device = init_from_env(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    b = cfg.bilevel
    if world() > 1 and b.solver.hvp == "func":
        raise ConfigError(
            "bilevel.solver.hvp=func cannot run the cross-rank collectives of a torchrun run inside torch.func "
            "transforms; remove bilevel.solver.hvp (double_backward) or run align as a single process"
        )
    out, has_state = on_main(lambda: prepare_run_dir(cfg.out_dir, cfg, resume=resume))

    backbone_path = resolve_backbone_file(cfg.pretrained)
    head_path = backbone_path.parent / PRETEXT_HEAD_FILE
    seed_everything(cfg.seed)
    backbone, spec = load_backbone(backbone_path)
    head_file = read_head_file(head_path, "pretext")
    if cfg.pretext is not None and cfg.pretext.name.lower() != str(head_file["name"]).lower():
        raise ConfigError(
            f"pretext.name={cfg.pretext.name!r} but {head_path} holds {head_file['name']!r} heads; "
            "remove pretext.name or point pretrained at a matching run"
        )
    params = distributed_pretext_params(head_file["name"], head_file["params"])
    if cfg.pretext is not None and cfg.pretext.params:
        if _without_gather(cfg.pretext.params) != _without_gather(head_file["params"]):
            raise ConfigError(
                f"pretext.params={cfg.pretext.params} differ from those the pretrained heads were trained with "
                f"({head_file['params']}); remove pretext.params (they are read from {head_path}; only "
                "gather_distributed may be set here)"
            )
        params.update(cfg.pretext.params)
    pretext = build_pretext(head_file["name"], backbone.feature_dim, params)
    pretext.setup(backbone)
    pretext.load_state_dict(head_file["state_dict"])
    backbone.to(device)
    pretext.to(device)

    pretext_set = build_dataset(
        cfg.pretext_data.name, "train", root=cfg.pretext_data.root, image_size=cfg.pretext_data.image_size,
        download=cfg.pretext_data.download, seed=cfg.pretext_data.seed,
    )  # fmt: skip
    check_batch_size(len(pretext_set), cfg.lower.batch_size, cfg.pretext_data.name, "lower.batch_size")
    check_channels(pretext_set.info.channels, spec["in_channels"], cfg.pretext_data.name)
    task, splits = build_task(cfg.downstream)
    check_batch_size(len(splits["train"]), cfg.upper.batch_size, cfg.downstream.data.name, "upper.batch_size")
    shards = cfg.distributed.augment_shards
    lower_plan = BatchPlan.create(
        cfg.lower.batch_size, accumulation=1, augment_shards=shards, batch_key="lower.batch_size"
    )
    upper_plan = BatchPlan.create(
        cfg.upper.batch_size, accumulation=1, augment_shards=shards, batch_key="upper.batch_size"
    )
    check_channels(splits["train"].info.channels, spec["in_channels"], cfg.downstream.data.name)
    info = pretext_set.info
    augmentation = cfg.pretext.augmentation if cfg.pretext is not None else None
    augment = build_view_augmentation(
        augmentation or pretext.augmentation, image_size=cfg.pretext_data.image_size, channels=info.channels,
        mean=info.mean, std=info.std, **(cfg.pretext.augmentation_params if cfg.pretext is not None else {}),
    )  # fmt: skip

    seed_everything(derive_seed(cfg.seed, "head"))
    head = task.build_head(backbone.feature_dim).to(device)
    sync = None
    if world() > 1:
        if cfg.distributed.sync_batchnorm:  # before the trainer copies theta into phi
            convert_sync_batchnorm(nn.ModuleList([backbone, pretext, head]), device)
        sync = RankSync(all_reduce_mean_, None if cfg.distributed.sync_batchnorm else broadcast_buffers)
    settings = BilevelSettings(
        n_lower=b.n_lower, n_upper=b.n_upper, lam=b.lam, damping=b.damping, gamma=b.gamma, solver=b.solver.name,
        solver_iters=b.solver.iters, solver_tol=b.solver.tol, hvp=b.solver.hvp, warm_start=b.solver.warm_start,
        hessian_fraction=b.solver.hessian_fraction, mfac_window=b.solver.mfac_window,
        mfac_block_size=b.solver.mfac_block_size, recycle_vectors=b.solver.recycle_vectors,
        lower_grad_clip=b.lower_grad_clip, upper_grad_clip=b.upper_grad_clip,
    )  # fmt: skip
    trainer = BiSSLTrainer(
        backbone=backbone, pretext=pretext, task=task, head=head, settings=settings,
        make_lower_optimizer=_optimizer_factory(cfg.lower.optim),
        make_upper_optimizer=_optimizer_factory(cfg.upper.optim), sync=sync,
        forward_context=lambda: autocast(precision, device),
    )  # fmt: skip
    coupling = CouplingMonitor(trainer.theta, lam=b.lam)  # theta0: the pretrained backbone, also when resuming
    total_lower, total_upper = b.cycles * b.n_lower, b.cycles * b.n_upper
    trainer.lower_scheduler = cosine_with_warmup(
        trainer.lower_optimizer, 0, total_lower, min_lr_ratio=cfg.lower.optim.min_lr_ratio
    )
    trainer.upper_scheduler = cosine_with_warmup(
        trainer.upper_optimizer, 0, total_upper, min_lr_ratio=cfg.upper.optim.min_lr_ratio
    )

    pin = device.type == "cuda"
    ranks = {"rank": lower_plan.rank, "world_size": lower_plan.world_size}
    lower_stream = BatchStream(
        pretext_set, cfg.lower.batch_size, seed=derive_seed(cfg.seed, "lower"), pin_memory=pin,
        num_workers=cfg.pretext_data.num_workers, **ranks,
    )  # fmt: skip
    upper_stream = BatchStream(
        splits["train"], cfg.upper.batch_size, seed=derive_seed(cfg.seed, "upper"), pin_memory=pin,
        num_workers=cfg.downstream.data.num_workers, **ranks,
    )  # fmt: skip
    config_dict = cfg.model_dump(mode="json")
    cycle = 0
    if has_state:
        state = load_state(out / STATE_FILE, config_dict, ignore=RESUMABLE_KEYS)
        trainer.load_state_dict(state["trainer"])
        lower_stream.position, upper_stream.position = state["lower_position"], state["upper_position"]
        cycle = int(state["cycle"])
        lower_plan.check_resumed(state.get("augment_shards", 1))
        log.info("resumed %s at cycle %d/%d", out, cycle, b.cycles)
    require_in_sync(nn.ModuleList([backbone, trainer.upper_backbone, pretext, head]), "theta, phi or the heads")
    logger = main_only(
        lambda: MetricLogger(out, tensorboard=cfg.log.tensorboard, resume_step=cycle if has_state else None)
    )

    def checkpoint() -> None:
        if not is_main():
            return
        save_state(
            out / STATE_FILE,
            {
                "cycle": cycle,
                "trainer": trainer.state_dict(),
                "lower_position": lower_stream.position,
                "upper_position": upper_stream.position,
                "augment_shards": lower_plan.augment_shards,
            },
            config_dict,
        )

    def prepare(rows: Any, generator: torch.Generator) -> Any:
        return task.prepare(rows, device, generator)

    def pretext_views(tag: str, counter: int) -> list[torch.Tensor]:
        images, _ = next(lower_stream)
        return lower_plan.augment(augment, images.to(device), lower_plan.rank, cfg.seed, tag, counter)

    if not has_state:
        warm_stream = BatchStream(splits["train"], cfg.upper.batch_size, seed=derive_seed(cfg.seed, "warmup"), **ranks)
        warm_loss = warm_up_head(
            task, backbone, head, warm_stream, steps=b.head_warmup_epochs * warm_stream.per_epoch,
            lr=b.head_warmup_lr, device=device, seed=cfg.seed, plan=upper_plan, precision=precision,
        )  # fmt: skip
        val = evaluate_split(task, backbone, head, splits["val"], device, precision)
        logger.log(0, "head_warmup", {"loss": warm_loss, **{f"val_{k}": v for k, v in val.items()}})
        checkpoint()

    stop = b.cycles if until_cycle is None else min(b.cycles, until_cycle)
    show = cfg.log.progress and is_main()
    bar = tqdm(total=b.cycles, initial=cycle, desc="align", unit="cycle", disable=not show)
    while cycle < stop:
        sums: dict[str, float] = defaultdict(float)
        for _ in range(b.n_lower):
            views = pretext_views("lower_views", trainer.lower_steps)
            for key, value in trainer.lower_step(views, total_lower).items():
                sums[f"lower/{key}"] += value / b.n_lower
        trainer.begin_cycle(pretext_views("hessian_views", cycle))  # one pretext batch fixes H for the cycle
        for _ in range(b.n_upper):
            rows = next(upper_stream)
            batch = upper_plan.augment(prepare, rows, upper_plan.rank, cfg.seed, "upper_views", trainer.upper_steps)
            for key, value in trainer.upper_step(batch).items():
                sums[f"upper/{key}"] += value / b.n_upper
        trainer.end_cycle()
        cycle += 1
        bar.update(1)
        bar.set_postfix(lower=f"{sums['lower/pretext_loss']:.3f}", upper=f"{sums['upper/loss_theta']:.3f}")
        if cycle % cfg.log.every_steps == 0 or cycle == stop:
            sums["lower/lr"] = trainer.lower_optimizer.param_groups[0]["lr"]
            sums["upper/lr"] = trainer.upper_optimizer.param_groups[0]["lr"]
            stats = coupling.stats(trainer, lower_grad_norm=sums["lower/grad_norm"])
            sums.update({f"coupling/{key}": value for key, value in stats.items()})
            logger.log(cycle, "cycle", dict(sums))
        if cycle % cfg.checkpoint_every_cycles == 0 or cycle == stop:
            checkpoint()
    bar.close()
    if cycle < b.cycles:
        logger.close()
        barrier()
        return AlignResult(out, None, cycle, finished=False)

    if is_main():
        export_backbone(out / BACKBONE_FILE, backbone, spec)
        export_backbone(out / UPPER_BACKBONE_FILE, trainer.upper_backbone, spec)
        export_head(
            out / PRETEXT_HEAD_FILE, pretext, kind="pretext", name=head_file["name"], params=head_file["params"]
        )
        export_head(
            out / DOWNSTREAM_HEAD_FILE, head, kind="downstream", name=cfg.downstream.task,
            params=cfg.downstream.model_dump(mode="json"),
        )  # fmt: skip
    metrics: dict[str, float] = {}
    for name, model in (("theta", backbone), ("phi", trainer.upper_backbone)):
        for split in ("val", "test"):
            for key, value in evaluate_split(task, model, head, splits[split], device, precision).items():
                metrics[f"{name}_{split}_{key}"] = value
    final_coupling = coupling.stats(trainer)
    log.info("coupling of theta and phi: %s", ", ".join(f"{k}={v:.4g}" for k, v in final_coupling.items()))
    logger.log(cycle, "final", metrics)
    logger.close()
    summary = {
        "stage": "align",
        "cycles": cycle,
        "processes": world(),
        "wall_time_s": time.perf_counter() - start_time,
        "metrics": metrics,
        "coupling": final_coupling,
        "backbone": str(out / BACKBONE_FILE),
        "pretrained": str(backbone_path),
    }
    on_main(lambda: write_summary(out, summary))
    barrier()
    return AlignResult(out, out / BACKBONE_FILE, cycle, finished=True, metrics=metrics)


def _without_gather(params: dict[str, Any]) -> dict[str, Any]:
    """Pretext parameters less ``gather_distributed``, which only says how a run spreads over processes."""
    return {key: value for key, value in params.items() if key != "gather_distributed"}
