"""``bissl evaluate``: how good are a frozen backbone's features for a downstream task?

Features of the task's train/val/test splits are extracted once (eval mode, dataset normalisation). The train
split is the memory bank of a weighted kNN classifier and the training set of a linear probe; both are scored
on val and test. A t-SNE of the TEST features coloured by class is written to ``embedding.png``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bissl.config import EvaluateConfig
from bissl.downstream.build import build_splits
from bissl.eval.embedding import embed_2d, plot_embedding
from bissl.eval.frozen import dataset_features
from bissl.eval.knn import knn_accuracy
from bissl.eval.linear_probe import fit_linear_classifier
from bissl.train.checkpoint import load_backbone, resolve_backbone_file
from bissl.train.logger import MetricLogger
from bissl.train.runtime import check_channels, prepare_run_dir, resolve_device, write_summary
from bissl.utils.errors import CheckpointError, ConfigError
from bissl.utils.plotting import require_plotting
from bissl.utils.seed import seed_everything

log = logging.getLogger("bissl.evaluate")

EMBEDDING_FILE = "embedding.png"


@dataclass
class EvaluateResult:
    out_dir: Path
    metrics: dict[str, float]  # knn_val, knn_test and, with a probe, linear_probe_val, linear_probe_test
    summary_path: Path
    embedding_path: Path | None


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Score the frozen backbone ``cfg.backbone`` on ``cfg.downstream``; writes ``summary.json``,
    ``metrics.jsonl|csv`` and (with ``cfg.embedding``) ``embedding.png`` under ``cfg.out_dir``."""
    start_time = time.perf_counter()
    backbone_file = resolve_backbone_file(cfg.backbone)
    if not backbone_file.is_file():
        raise CheckpointError(
            f"backbone={cfg.backbone!r}: no backbone file at {backbone_file}; pass a run folder of `bissl pretrain`, "
            "`align` or `finetune` (or its backbone.pt) with --backbone"
        )
    if cfg.embedding:
        require_plotting()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    backbone, spec = load_backbone(backbone_file)
    splits = build_splits(cfg.downstream)
    data = cfg.downstream.data
    info = splits["train"].info
    if info.multi_label:
        raise ConfigError(
            f"downstream.data.name={data.name!r} is multi-label; evaluate needs single-label classes, choose another"
        )
    check_channels(info.channels, spec["in_channels"], data.name)
    out, _ = prepare_run_dir(cfg.out_dir, cfg, resume=False)

    backbone.to(device)
    features = {
        split: dataset_features(backbone, dataset, device=device, batch_size=data.batch_size)
        for split, dataset in splits.items()
    }
    train_x, train_y = features["train"]
    log.info(
        "features of %s (dim %d): %s",
        data.name,
        train_x.shape[1],
        ", ".join(f"{split} {len(x)}" for split, (x, _) in features.items()),
    )

    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        x, y = features[split]
        metrics[f"knn_{split}"] = knn_accuracy(train_x, train_y, x, y, k=cfg.knn_k, temperature=cfg.knn_temperature)
    log.info("kNN (k=%d) top-1: val %.4f, test %.4f", cfg.knn_k, metrics["knn_val"], metrics["knn_test"])
    if cfg.linear_probe_epochs > 0:
        probe = fit_linear_classifier(
            train_x,
            train_y,
            num_classes=info.num_classes,
            epochs=cfg.linear_probe_epochs,
            lr=cfg.linear_probe_lr,
            weight_decay=cfg.linear_probe_weight_decay,
            seed=cfg.seed,
        )
        with torch.no_grad():
            for split in ("val", "test"):
                x, y = features[split]
                metrics[f"linear_probe_{split}"] = (probe(x).argmax(dim=1) == y).float().mean().item()
        log.info(
            "linear probe (%d epochs) top-1: val %.4f, test %.4f",
            cfg.linear_probe_epochs,
            metrics["linear_probe_val"],
            metrics["linear_probe_test"],
        )

    logger = MetricLogger(out, tensorboard=cfg.log.tensorboard)
    logger.log(0, "evaluate", metrics)
    logger.close()

    embedding_path = None
    (out / EMBEDDING_FILE).unlink(missing_ok=True)  # never leave a plot of an earlier run beside these numbers
    if cfg.embedding:
        test_x, test_y = features["test"]
        points, labels = embed_2d(test_x, test_y, seed=cfg.seed, max_points=cfg.embedding_max_points)
        embedding_path = plot_embedding(
            points,
            labels,
            out / EMBEDDING_FILE,
            title=f"t-SNE of {data.name} test features ({len(points)} points)\n{backbone_file}",
            class_names=info.classes,
        )
        log.info("embedding of %d test images: %s", len(points), embedding_path)

    summary_path = write_summary(
        out,
        {
            "stage": "evaluate",
            "wall_time_s": time.perf_counter() - start_time,
            "metrics": metrics,
            "backbone": str(backbone_file),
            "feature_dim": int(train_x.shape[1]),
            "num_samples": {split: len(x) for split, (x, _) in features.items()},
            "embedding": str(embedding_path) if embedding_path else None,
        },
    )
    return EvaluateResult(out, metrics, summary_path, embedding_path)
