"""``bissl evaluate``: how good are a frozen backbone's features for a downstream task?

Features of the task's train/val/test splits are extracted once (eval mode, dataset normalisation). The train
split is the memory bank of a weighted kNN classifier and the training set of a linear probe; both are scored
on val and test, with ``knn_k`` capped by the train split's mean class size (:func:`~bissl.eval.knn.knn_k_used`;
the k used is in the summary). A t-SNE of the TEST features coloured by class is written to ``embedding.png``.

A task that is not scored on the data's single class labels (``class_label_probe`` False: a user's task by default;
also any data whose ``info.kind`` is not ``classification``, e.g. detection boxes) gets no kNN or linear probe: the
task's own head is trained on the frozen backbone instead
(the BiSSL head warm-up, :func:`~bissl.engine.head_warmup.warm_up_head`, ``linear_probe_epochs`` epochs at
``linear_probe_lr``, batches of ``downstream.data.batch_size``) and the task's declared metrics are reported on val
and test as ``head_probe_<split>_<metric>``. Nothing in this path knows which task it is.

Under ``torchrun`` every rank extracts the features of its strided shard of each split; the shards are put back
together in dataset order (no padded duplicates), and rank 0 scores them: the numbers equal a single process's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bissl.config import EvaluateConfig
from bissl.distributed import on_main
from bissl.downstream.base import DOWNSTREAM_TASKS, build_task
from bissl.engine.checkpoint import load_backbone, resolve_backbone_file
from bissl.engine.data_checks import check_channels
from bissl.engine.files import EMBEDDING_FILE
from bissl.engine.head_warmup import warm_up_head
from bissl.engine.microbatches import use_channels_last
from bissl.engine.run import Run
from bissl.engine.sampling import BatchStream
from bissl.eval.embedding import embed_2d, plot_embedding
from bissl.eval.frozen import Features, frozen_features, frozen_scores
from bissl.eval.knn import knn_k_used
from bissl.eval.task import evaluate_split
from bissl.utils.compute import ComputeCounter
from bissl.utils.errors import CheckpointError, ConfigError
from bissl.utils.plotting import require_plotting
from bissl.utils.seed import derive_seed, seed_everything

log = logging.getLogger("bissl.evaluate")


@dataclass
class EvaluateResult:
    out_dir: Path
    metrics: dict[str, float]  # knn_val, knn_test and, with a probe, linear_probe_val, linear_probe_test
    summary_path: Path
    embedding_path: Path | None
    knn_k: int | None = None  # the k the kNN used (None: the task's head was probed instead)


def evaluate(cfg: EvaluateConfig, *, overwrite: bool = False) -> EvaluateResult:
    """Score the frozen backbone ``cfg.backbone`` on ``cfg.downstream``; writes ``summary.json``,
    ``metrics.jsonl|csv`` and (with ``cfg.embedding``) ``embedding.png`` under ``cfg.out_dir``."""
    backbone_file = resolve_backbone_file(cfg.backbone)
    if not backbone_file.is_file():
        raise CheckpointError(
            f"backbone={cfg.backbone!r}: no backbone file at {backbone_file}; pass a run folder of `bissl pretrain`, "
            "`align` or `finetune` (or its backbone.pt) with --backbone"
        )
    if cfg.embedding:
        require_plotting()
    with Run.start("evaluate", cfg, overwrite=overwrite) as run, run.interruptible("the evaluation"):
        seed_everything(cfg.seed)
        backbone, spec = load_backbone(backbone_file, cfg.plugins)
        task_cls = DOWNSTREAM_TASKS.get(cfg.downstream.task)
        splits = task_cls.splits(cfg.downstream)
        compute = ComputeCounter()
        compute.watch(backbone)
        data, info = cfg.downstream.data, splits["train"].info
        if info.num_classes == 0:
            raise ConfigError(f"downstream.data.name={data.name!r} has no labels; choose a labelled dataset")
        check_channels(info.channels, spec["in_channels"], data.name)
        use_channels_last(backbone.to(run.device), cfg.channels_last)
        if not task_cls.class_label_probe or getattr(info, "kind", "classification") != "classification":
            metrics = _head_probe(cfg, run, backbone, splits)
            log.info("head probe of the frozen backbone on %s: %s", data.name, metrics)
            run.log(0, "evaluate", metrics)
            summary_path = run.finish(
                {"metrics": metrics, "backbone": str(backbone_file), "embedding": None, "compute": compute.as_dict()}
            )
            return EvaluateResult(run.out, metrics, summary_path, None)
        if info.multi_label:
            raise ConfigError(
                f"downstream.data.name={data.name!r} is multi-label;"
                " evaluate needs single-label classes: choose another"
            )
        features = {
            split: frozen_features(backbone, dataset, device=run.device, batch_size=data.batch_size,
                                   num_workers=data.num_workers, precision=run.precision)
            for split, dataset in splits.items()
        }  # fmt: skip
        metrics = frozen_scores(
            features["train"], {split: features[split] for split in ("val", "test")}, knn_k=cfg.knn_k,
            knn_temperature=cfg.knn_temperature, probe_epochs=cfg.linear_probe_epochs, seed=cfg.seed,
            probe_lr=cfg.linear_probe_lr, probe_weight_decay=cfg.linear_probe_weight_decay,
            num_classes=info.num_classes,
        )  # fmt: skip
        knn_k = knn_k_used(cfg.knn_k, features["train"][1])
        dim = features["train"][0].shape[1]
        log.info("frozen %s features (dim %d, kNN k = %d): %s", data.name, dim, knn_k, metrics)
        run.log(0, "evaluate", metrics)
        embedding_path = on_main(lambda: _plot(cfg, run.out, features["test"], backbone_file, info.classes))
        summary_path = run.finish(
            {"metrics": metrics, "backbone": str(backbone_file), "feature_dim": int(dim),
             "knn_k": knn_k,
             "num_samples": {split: len(x) for split, (x, _) in features.items()},
             "embedding": str(embedding_path) if embedding_path else None, "compute": compute.as_dict()}
        )  # fmt: skip
    return EvaluateResult(run.out, metrics, summary_path, embedding_path, knn_k)


def _head_probe(cfg: EvaluateConfig, run: Run, backbone: nn.Module, splits: dict[str, Any]) -> dict[str, float]:
    """The task's head trained on the frozen backbone; the task's metrics on val and test (module docstring)."""
    task, _ = build_task(cfg.downstream, splits)
    seed_everything(derive_seed(cfg.seed, "head"))
    head = task.build_head_for(backbone).to(run.device)
    stream = BatchStream(splits["train"], cfg.downstream.data.batch_size, seed=derive_seed(cfg.seed, "head_probe"))
    warm_up_head(
        task, backbone, head, stream, steps=cfg.linear_probe_epochs * stream.per_epoch, lr=cfg.linear_probe_lr,
        device=run.device, seed=cfg.seed, precision=run.precision, lr_key="linear_probe_lr",
    )  # fmt: skip
    return {
        f"head_probe_{split}_{key}": value
        for split in ("val", "test")
        for key, value in evaluate_split(task, backbone, head, splits[split], run.device, run.precision).items()
    }


def _plot(cfg: EvaluateConfig, out: Path, test: Features, backbone_file: Path, classes: Any) -> Path | None:
    """``embedding.png``: a t-SNE of the test features coloured by class (with ``cfg.embedding``)."""
    if not cfg.embedding:
        return None
    points, labels = embed_2d(*test, seed=cfg.seed, max_points=cfg.embedding_max_points)
    title = f"t-SNE of {cfg.downstream.data.name} test features ({len(points)} points)\n{backbone_file}"
    path = plot_embedding(points, labels, out / EMBEDDING_FILE, title=title, class_names=classes)
    log.info("embedding of %d test images: %s", len(points), path)
    return path
