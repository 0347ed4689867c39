"""``bissl align``: the BiSSL stage. Pretrained backbone -> head warm-up -> bilevel cycles -> theta exported.

Files written under ``out_dir``: ``backbone.pt`` (the lower backbone theta, in the format ``pretrain``
writes, to initialise fine-tuning), ``upper_backbone.pt`` (phi), ``pretext_head.pt``,
``downstream_head.pt``, ``checkpoints/last.pt``, ``metrics.jsonl|csv``, ``tb/`` and ``summary.json``. Every logged
cycle and the summary carry ``coupling/*``: how far theta followed phi from the pretrained backbone (docs/coupling.md).
Every batch and view is drawn from generators seeded by ``(seed, stream, counter)``, so ``--resume``
continues exactly. ``summary.json`` → ``compute``: the backbone forward / backward passes, Hessian-vector products
and images of the run (:class:`~bissl.utils.compute.ComputeCounter`).

The loop is the paper's: each cycle is :meth:`~bissl.bilevel.trainer.BiSSLTrainer.run_cycle` drawing its batches from
the setup (:class:`~bissl.bilevel.trainer.CycleData`), with divergence guards as its step hooks; then log and
checkpoint. A NaN/inf inside a step comes back with its level, cycle and step, and is re-raised naming the config
keys to change.

``bilevel.rule`` picks what a cycle runs: BiSSL (``bissl``), or a rival on the same loop (:mod:`bissl.bilevel.rivals`):
``multitask`` (lower steps on ``L_P + w L_D``, each with a downstream batch; ``w = 0`` with the task's images as
``pretext_data``: task-adaptive pretraining) or ``penalty`` (first-order value-function penalty; ``backbone.pt`` is
its penalised theta).

Under ``torchrun`` every rank runs the bilevel cycles on its rows ``r, r + W, ...`` of each global lower and upper
batch (``lower.batch_size`` and ``upper.batch_size`` stay the global sizes), with views drawn per augmentation
shard as in ``pretrain`` (:mod:`bissl.engine.microbatches`). No module is wrapped in ``DistributedDataParallel``: the
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

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bissl.bilevel.coupling import CouplingMonitor
from bissl.bilevel.rivals import RULES
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer, NonFiniteStepError, RankSync, StepHook
from bissl.config import AlignConfig
from bissl.data import build_dataset
from bissl.data.augment import ViewPipeline
from bissl.data.base import ImageDataset
from bissl.distributed import all_reduce_mean_, broadcast_buffers, convert_sync_batchnorm, require_in_sync, world
from bissl.downstream.base import DownstreamTask, build_task
from bissl.engine.build import (
    add_lora,
    build_pretext_on,
    configured_optimizer,
    configured_schedule,
    data_kwargs,
    view_augmentation,
)
from bissl.engine.checkpoint import (
    export_backbone,
    export_head,
    load_backbone,
    read_head_file,
    resolve_backbone_file,
)
from bissl.engine.data_checks import check_batch_size, check_channels
from bissl.engine.files import BACKBONE_FILE, DOWNSTREAM_HEAD_FILE, PRETEXT_HEAD_FILE, UPPER_BACKBONE_FILE
from bissl.engine.guard import DivergenceGuard
from bissl.engine.head_warmup import warm_up_head
from bissl.engine.microbatches import BatchPlan
from bissl.engine.run import Run
from bissl.engine.sampling import BatchStream
from bissl.eval.task import evaluate_split
from bissl.pretext.base import PretextMethod
from bissl.utils.compute import ComputeCounter
from bissl.utils.errors import CheckpointError, ConfigError, NonFiniteError
from bissl.utils.precision import autocast
from bissl.utils.seed import derive_seed, seed_everything

log = logging.getLogger("bissl.align")


@dataclass
class AlignResult:
    out_dir: Path
    backbone_path: Path | None
    cycle: int
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)


def align(
    cfg: AlignConfig, *, resume: bool = False, overwrite: bool = False, until_cycle: int | None = None
) -> AlignResult:
    """Run (or continue) the BiSSL stage; stop after ``until_cycle`` cycles if given (resumable)."""
    b = cfg.bilevel
    if world() > 1 and b.solver.hvp == "func":
        raise ConfigError(
            "bilevel.solver.hvp=func cannot run the cross-rank collectives of a torchrun run inside torch.func "
            "transforms; remove bilevel.solver.hvp (double_backward) or run align as a single process"
        )
    with Run.start("align", cfg, resume=resume, overwrite=overwrite) as run:
        setup = _set_up(cfg, run)
        trainer, task, splits = setup.trainer, setup.task, setup.splits
        coupling = CouplingMonitor(trainer.theta, lam=cfg.bilevel.lam)  # theta0: pretrained, also when resuming
        saved = run.resume(trainer=trainer, compute=setup.compute)
        cycle = int(saved.get("cycle", 0))
        setup.lower_stream.position = int(saved.get("lower_position", 0))
        setup.upper_stream.position = int(saved.get("upper_position", 0))
        setup.lower_plan.check_resumed(saved.get("augment_shards", setup.lower_plan.augment_shards))
        require_in_sync(
            nn.ModuleList([trainer.lower_backbone, trainer.upper_backbone, trainer.pretext, trainer.head]),
            "theta, phi or the heads",
        )

        def score(model: nn.Module, split: str) -> dict[str, float]:
            return evaluate_split(task, model, trainer.head, splits[split], run.device, run.precision)

        if not run.has_state:
            with run.interruptible("the head warm-up"):
                warm_loss = setup.warm_up_head()
                val = score(trainer.lower_backbone, "val")
            run.log(0, "head_warmup", {"loss": warm_loss, **{f"val_{k}": v for k, v in val.items()}})
            run.checkpoint(log_step=0, **setup.counters(0))
        guards = _divergence_guards(trainer)
        bar = run.progress(b.cycles, cycle, "cycle")
        while cycle < min(b.cycles, until_cycle or b.cycles):
            with _naming_the_settings(b.rule):
                means = trainer.run_cycle(cycle, setup, b.cycles * b.n_lower, **guards)
            cycle += 1
            bar.update(1)
            bar.set_postfix(lower=f"{means['lower/pretext_loss']:.3f}", upper=f"{means.get('upper/loss_theta', 0):.3f}")
            if cycle % cfg.log.every_steps == 0 or cycle == b.cycles:
                run.log(cycle, "cycle", _cycle_record(trainer, coupling, means))
            due = cycle % cfg.checkpoint_every_cycles == 0 or cycle == b.cycles or cycle == until_cycle
            run.checkpoint(due=due, log_step=cycle, **setup.counters(cycle))
        bar.close()
        if cycle < b.cycles:
            return AlignResult(run.out, None, cycle, finished=False)
        metrics = {
            f"{name}_{split}_{k}": v
            for name, model in (("theta", trainer.exported_backbone), ("phi", trainer.upper_backbone))
            for split in ("val", "test")
            for k, v in score(model, split).items()
        }
        run.log(cycle, "final", metrics)
        final_coupling = coupling.stats(trainer)
        log.info("coupling of theta and phi: %s", ", ".join(f"{k}={v:.4g}" for k, v in final_coupling.items()))
        run.finish(
            {
                "cycles": cycle,
                "processes": world(),
                "metrics": metrics,
                "coupling": final_coupling,
                "compute": setup.compute.as_dict(),
                "backbone": str(run.out / BACKBONE_FILE),
                "pretrained": str(setup.backbone_path),
            },
            setup.exports(cfg),
        )
    return AlignResult(run.out, run.out / BACKBONE_FILE, cycle, finished=True, metrics=metrics)


#: what to change in the config when a step of a level (of a rule) produces NaN/inf
_SETTINGS = {
    "lower": "lower lower.optim.lr",
    "upper": "lower upper.optim.lr or lower.optim.lr, or raise bilevel.damping",
    "penalty/upper": "lower upper.optim.lr or bilevel.penalty_rho",
}


@contextlib.contextmanager
def _naming_the_settings(rule: str) -> Iterator[None]:
    """A NaN/inf inside a step of a cycle names the cycle, the step and the settings of ``bilevel.rule`` to change."""
    try:
        yield
    except NonFiniteStepError as exc:
        settings = _SETTINGS.get(f"{rule}/{exc.level}", _SETTINGS[exc.level])
        raise NonFiniteError(f"{exc.cause} (BiSSL cycle {exc.cycle}, {exc.level} step {exc.step}); {settings}") from exc


def _divergence_guards(trainer: BiSSLTrainer) -> dict[str, StepHook]:
    """The hooks that stop a diverging run after each step of a level, naming its learning rate."""
    lower = DivergenceGuard("lower-level loss", "lower.optim.lr", "lower-level weights (theta)")
    upper = DivergenceGuard("upper-level loss", "upper.optim.lr", "upper-level weights (phi)")
    return {
        "after_lower": lambda step, stats: lower.check(step, stats["pretext_loss"], trainer.theta),
        "after_upper": lambda step, stats: upper.check(step, stats["loss_theta"] + stats["loss_phi"], trainer.phi),
    }


def _cycle_record(trainer: BiSSLTrainer, coupling: CouplingMonitor, means: dict[str, float]) -> dict[str, float]:
    """What a logged cycle holds: the cycle's mean statistics, both levels' learning rates and the coupling."""
    lrs = {
        "lower/lr": trainer.lower_optimizer.param_groups[0]["lr"],
        "upper/lr": trainer.upper_optimizer.param_groups[0]["lr"],
    }
    stats = coupling.stats(trainer, lower_grad_norm=means["lower/grad_norm"])
    return {**means, **lrs, **{f"coupling/{k}": v for k, v in stats.items()}}


@dataclass
class AlignSetup:
    """Everything the BiSSL loop runs on, built from the config: the trainer (theta, phi, psi, omega and their
    optimizers), the task and its splits, the seeded lower/upper batch streams and how their views are drawn."""

    cfg: AlignConfig
    run: Run
    trainer: BiSSLTrainer
    task: DownstreamTask
    splits: dict[str, ImageDataset]
    lower_stream: BatchStream
    upper_stream: BatchStream
    lower_plan: BatchPlan
    upper_plan: BatchPlan
    augment: ViewPipeline
    backbone_path: Path
    spec: dict[str, Any]
    pretext_file: dict[str, Any]
    compute: ComputeCounter

    def lower_views(self, step: int) -> list[torch.Tensor]:
        """The views of lower step ``step``: the next pretext batch (:class:`~bissl.bilevel.trainer.CycleData`)."""
        return self._pretext_views("lower_views", step)

    def hessian_views(self, cycle: int) -> list[torch.Tensor]:
        """The views that fix cycle ``cycle``'s Hessian: the next pretext batch."""
        return self._pretext_views("hessian_views", cycle)

    def upper_batch(self, step: int) -> Any:
        """The next prepared downstream batch (the task's seeded training augmentation)."""
        return self.upper_plan.augment(
            self._prepare, next(self.upper_stream), self.upper_plan.rank, self.cfg.seed, "upper_views", step
        )

    def lower_batch(self, step: int) -> Any:
        """The downstream batch of lower step ``step`` (rule ``multitask``): the next one of the upper stream."""
        return self.upper_batch(step)

    def _pretext_views(self, tag: str, counter: int) -> list[torch.Tensor]:
        """The views of the next lower (pretext) batch, drawn by ``(seed, tag, counter)``."""
        images = next(self.lower_stream)[0].to(self.run.device)
        return self.lower_plan.augment(self.augment, images, self.lower_plan.rank, self.cfg.seed, tag, counter)

    def _prepare(self, rows: Any, generator: torch.Generator) -> Any:
        return self.task.prepare(rows, self.run.device, generator)

    def warm_up_head(self) -> float:
        """BiSSL's first step: the downstream head trained on the frozen pretrained backbone."""
        b, ranks = self.cfg.bilevel, {"rank": self.upper_plan.rank, "world_size": self.upper_plan.world_size}
        stream = BatchStream(
            self.splits["train"], self.cfg.upper.batch_size, seed=derive_seed(self.cfg.seed, "warmup"), **ranks
        )
        return warm_up_head(
            self.task,
            self.trainer.lower_backbone,
            self.trainer.head,
            stream,
            steps=b.head_warmup_epochs * stream.per_epoch,
            lr=b.head_warmup_lr,
            device=self.run.device,
            seed=self.cfg.seed,
            plan=self.upper_plan,
            precision=self.run.precision,
        )

    def counters(self, cycle: int) -> dict[str, int]:
        """What a checkpoint holds besides the trainer: the cycle and the streams' positions."""
        return {
            "cycle": cycle,
            "lower_position": self.lower_stream.position,
            "upper_position": self.upper_stream.position,
            "augment_shards": self.lower_plan.augment_shards,
        }

    def exports(self, cfg: AlignConfig) -> list[Callable[[Path], None]]:
        """theta as ``backbone.pt`` (what fine-tuning starts from), phi, and both heads."""
        t, f = self.trainer, self.pretext_file
        return [
            lambda out: export_backbone(out / BACKBONE_FILE, t.exported_backbone, self.spec),
            lambda out: export_backbone(out / UPPER_BACKBONE_FILE, t.upper_backbone, self.spec),
            lambda out: export_head(
                out / PRETEXT_HEAD_FILE,
                t.pretext,
                kind="pretext",
                name=f["name"],
                params=f["params"],
                plugins=[*f.get("plugins", []), *cfg.plugins],
            ),
            lambda out: export_head(
                out / DOWNSTREAM_HEAD_FILE,
                t.head,
                kind="downstream",
                name=cfg.downstream.task,
                params=cfg.downstream.model_dump(mode="json"),
                plugins=cfg.plugins,
            ),
        ]


def _set_up(cfg: AlignConfig, run: Run) -> AlignSetup:
    """Load the pretrained backbone and pretext heads, build the task, the streams and the trainer."""
    backbone_path = resolve_backbone_file(cfg.pretrained)
    seed_everything(cfg.seed)
    backbone, spec = add_lora(*load_backbone(backbone_path, cfg.plugins), cfg.lora)
    head_path = backbone_path.parent / PRETEXT_HEAD_FILE
    pretext_file = read_head_file(head_path, "pretext")
    pretext = build_pretext_on(pretext_file["name"], _pretext_params(cfg, pretext_file, backbone_path), backbone)
    try:
        pretext.load_state_dict(pretext_file["state_dict"])
    except RuntimeError as exc:  # a head of another width or method
        mismatch = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise CheckpointError(
            f"{head_path} does not fit the backbone in {backbone_path} ({mismatch.rstrip('.')}): they come from "
            "different runs; point pretrained= at one pretrain run folder"
        ) from None
    backbone.to(run.device)
    pretext.to(run.device)
    pretext_set = build_dataset(
        cfg.pretext_data.name, "train", seed=cfg.pretext_data.seed, **data_kwargs(cfg.pretext_data)
    )
    check_batch_size(len(pretext_set), cfg.lower.batch_size, cfg.pretext_data.name, "lower.batch_size")
    check_channels(pretext_set.info.channels, spec["in_channels"], cfg.pretext_data.name)
    task, splits = build_task(cfg.downstream)
    check_batch_size(len(splits["train"]), cfg.upper.batch_size, cfg.downstream.data.name, "upper.batch_size")
    check_channels(splits["train"].info.channels, spec["in_channels"], cfg.downstream.data.name)
    plans = [
        BatchPlan.create(
            level.batch_size,
            accumulation=1,
            augment_shards=cfg.distributed.augment_shards,
            batch_key=f"{name}.batch_size",
        )
        for name, level in (("lower", cfg.lower), ("upper", cfg.upper))
    ]
    seed_everything(derive_seed(cfg.seed, "head"))
    head = task.build_head_for(backbone).to(run.device)
    compute = ComputeCounter()
    trainer = _trainer(cfg, run, backbone, pretext, task, head, compute)
    for module in trainer.backbones():
        compute.watch(module)
    pin, ranks = run.device.type == "cuda", {"rank": plans[0].rank, "world_size": plans[0].world_size}
    streams = [
        BatchStream(
            data, level.batch_size, seed=derive_seed(cfg.seed, name), pin_memory=pin, num_workers=workers, **ranks
        )
        for name, data, level, workers in (
            ("lower", pretext_set, cfg.lower, cfg.pretext_data.num_workers),
            ("upper", splits["train"], cfg.upper, cfg.downstream.data.num_workers),
        )
    ]
    augment = view_augmentation(cfg.pretext, pretext, cfg.pretext_data, pretext_set.info)
    return AlignSetup(
        cfg, run, trainer, task, splits, *streams, *plans, augment, backbone_path, spec, pretext_file, compute
    )


def _trainer(
    cfg: AlignConfig,
    run: Run,
    backbone: nn.Module,
    pretext: PretextMethod,
    task: DownstreamTask,
    head: nn.Module,
    compute: ComputeCounter,
) -> BiSSLTrainer:
    """The trainer of ``bilevel.rule`` (BiSSL or a rival, :mod:`bissl.bilevel.rivals`) with its optimizers and
    cosine schedules; under torchrun, averaging over ranks."""
    b, sync = cfg.bilevel, None
    if world() > 1:
        if cfg.distributed.sync_batchnorm:  # before the trainer copies theta into phi
            convert_sync_batchnorm(nn.ModuleList([backbone, pretext, head]), run.device)
        sync = RankSync(all_reduce_mean_, None if cfg.distributed.sync_batchnorm else broadcast_buffers)
    lower, upper = cfg.lower.optim, cfg.upper.optim
    return RULES[b.rule](
        backbone=backbone,
        pretext=pretext,
        task=task,
        head=head,
        settings=BilevelSettings.from_config(b),
        make_lower_optimizer=lambda params: configured_optimizer(lower, params),
        make_upper_optimizer=lambda params: configured_optimizer(upper, params),
        make_lower_scheduler=lambda optimizer: configured_schedule(lower, optimizer, b.cycles * b.n_lower),
        make_upper_scheduler=lambda optimizer: configured_schedule(upper, optimizer, b.cycles * b.n_upper),
        sync=sync,
        forward_context=lambda: autocast(run.precision, run.device),
        compute=compute,
    )


def _pretext_params(cfg: AlignConfig, head_file: dict[str, Any], backbone_path: Path) -> dict[str, Any]:
    """The pretext parameters the pretrained heads were trained with (``pretext`` in the config may only repeat
    them, or set ``gather_distributed``)."""
    head_path = backbone_path.parent / PRETEXT_HEAD_FILE
    name = cfg.pretext.name if cfg.pretext is not None else None
    if name is not None and name.lower() != str(head_file["name"]).lower():
        raise ConfigError(
            f"pretext.name={name!r} but {head_path} holds {head_file['name']!r} heads; "
            "remove pretext.name or point pretrained at a matching run"
        )
    params = dict(head_file["params"])
    if cfg.pretext is not None and cfg.pretext.params:
        if _without_gather(cfg.pretext.params) != _without_gather(head_file["params"]):
            raise ConfigError(
                f"pretext.params={cfg.pretext.params} differ from those the pretrained heads were trained with "
                f"({head_file['params']}); remove pretext.params (they are read from {head_path}; only "
                "gather_distributed may be set here)"
            )
        params.update(cfg.pretext.params)
    return params


def _without_gather(params: dict[str, Any]) -> dict[str, Any]:
    """Pretext parameters less ``gather_distributed``, which only says how a run spreads over processes."""
    return {key: value for key, value in params.items() if key != "gather_distributed"}
