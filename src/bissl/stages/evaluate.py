"""``bissl evaluate``: how good are a frozen backbone's features for a downstream task?

Features of the task's train/val/test splits are extracted once (eval mode, dataset normalisation). The train
split is the memory bank of a weighted kNN classifier and the training set of a linear probe; both are scored
on val and test. A t-SNE of the TEST features coloured by class is written to ``embedding.png``.

Under ``torchrun`` every rank extracts the features of its strided shard of each split; the shards are put back
together in dataset order (no padded duplicates), and rank 0 scores them: the numbers equal a single process's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bissl.config import EvaluateConfig
from bissl.data.augment import normalize
from bissl.data.base import ImageDataset
from bissl.dist import barrier, gather_shards, init_from_env, main_only, on_main, shard_dataset
from bissl.downstream.base import DOWNSTREAM_TASKS
from bissl.engine.checkpoint import load_backbone, resolve_backbone_file
from bissl.engine.logger import MetricLogger
from bissl.engine.names import validate_names
from bissl.engine.runtime import check_channels, prepare_run_dir, write_summary
from bissl.engine.step import autocast, resolve_precision, use_channels_last
from bissl.eval.embedding import embed_2d, plot_embedding
from bissl.eval.features import extract_features
from bissl.eval.knn import knn_accuracy
from bissl.eval.linear_probe import fit_linear_classifier
from bissl.utils.errors import CheckpointError, ConfigError
from bissl.utils.plotting import require_plotting
from bissl.utils.seed import seed_everything

log = logging.getLogger("bissl.evaluate")

EMBEDDING_FILE = "embedding.png"
Features = tuple[Tensor, Tensor]  # (features [N, D], labels [N]) on the CPU


@dataclass
class EvaluateResult:
    out_dir: Path
    metrics: dict[str, float]  # knn_val, knn_test and, with a probe, linear_probe_val, linear_probe_test
    summary_path: Path
    embedding_path: Path | None


def frozen_features(
    backbone: nn.Module,
    dataset: ImageDataset,
    *,
    device: torch.device,
    batch_size: int = 512,
    num_workers: int = 0,
    precision: str = "fp32",
) -> Features:
    """Features and labels of every item of ``dataset``, in dataset order, on every rank (eval mode, dataset
    normalisation); each rank extracts its own shard."""
    info = dataset.info
    loader = DataLoader(
        shard_dataset(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    with autocast(precision, device):
        x, y = extract_features(
            backbone, loader, normalize_fn=lambda b: normalize(b, info.mean, info.std), device=device
        )
    return gather_shards(x), gather_shards(y)


def frozen_scores(
    train: Features,
    evals: Mapping[str, Features],
    *,
    knn_k: int,
    knn_temperature: float,
    probe_epochs: int,
    seed: int,
    probe_lr: float = 1e-2,
    probe_weight_decay: float = 1e-4,
    num_classes: int | None = None,
) -> dict[str, float]:
    """``knn_<split>`` for every split of ``evals`` and, with ``probe_epochs > 0``, ``linear_probe_<split>`` of
    one probe trained on ``train``; computed on rank 0, returned on every rank."""

    def compute() -> dict[str, float]:
        train_x, train_y = train
        scores = {
            f"knn_{split}": knn_accuracy(train_x, train_y, x, y, k=knn_k, temperature=knn_temperature)
            for split, (x, y) in evals.items()
        }
        if probe_epochs > 0:
            classes = num_classes or int(max(int(y.max()) for _, y in (train, *evals.values()))) + 1
            probe = fit_linear_classifier(
                train_x, train_y, num_classes=classes, epochs=probe_epochs, lr=probe_lr,
                weight_decay=probe_weight_decay, seed=seed,
            )  # fmt: skip
            with torch.no_grad():
                for split, (x, y) in evals.items():
                    scores[f"linear_probe_{split}"] = (probe(x.float()).argmax(dim=1) == y.long()).float().mean().item()
        return scores

    return on_main(compute)


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Score the frozen backbone ``cfg.backbone`` on ``cfg.downstream``; writes ``summary.json``,
    ``metrics.jsonl|csv`` and (with ``cfg.embedding``) ``embedding.png`` under ``cfg.out_dir``."""
    start_time = time.perf_counter()
    validate_names(cfg)
    backbone_file = resolve_backbone_file(cfg.backbone)
    if not backbone_file.is_file():
        raise CheckpointError(
            f"backbone={cfg.backbone!r}: no backbone file at {backbone_file}; pass a run folder of `bissl pretrain`, "
            "`align` or `finetune` (or its backbone.pt) with --backbone"
        )
    if cfg.embedding:
        require_plotting()
    device = init_from_env(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    backbone, spec = load_backbone(backbone_file, cfg.plugins)
    splits = DOWNSTREAM_TASKS.get(cfg.downstream.task).splits(cfg.downstream)
    data = cfg.downstream.data
    info = splits["train"].info
    if info.multi_label:
        raise ConfigError(
            f"downstream.data.name={data.name!r} is multi-label; evaluate needs single-label classes, choose another"
        )
    check_channels(info.channels, spec["in_channels"], data.name)
    out, _ = on_main(lambda: prepare_run_dir(cfg.out_dir, cfg, resume=False))

    backbone.to(device)
    use_channels_last(backbone, cfg.channels_last)
    extract = {"device": device, "batch_size": data.batch_size, "num_workers": data.num_workers, "precision": precision}
    features = {split: frozen_features(backbone, dataset, **extract) for split, dataset in splits.items()}
    train_x, _ = features["train"]
    log.info(
        "features of %s (dim %d): %s",
        data.name,
        train_x.shape[1],
        ", ".join(f"{split} {len(x)}" for split, (x, _) in features.items()),
    )

    metrics = frozen_scores(
        features["train"], {split: features[split] for split in ("val", "test")}, knn_k=cfg.knn_k,
        knn_temperature=cfg.knn_temperature, probe_epochs=cfg.linear_probe_epochs, seed=cfg.seed,
        probe_lr=cfg.linear_probe_lr, probe_weight_decay=cfg.linear_probe_weight_decay, num_classes=info.num_classes,
    )  # fmt: skip
    log.info("kNN (k=%d) top-1: val %.4f, test %.4f", cfg.knn_k, metrics["knn_val"], metrics["knn_test"])
    if cfg.linear_probe_epochs > 0:
        log.info(
            "linear probe (%d epochs) top-1: val %.4f, test %.4f",
            cfg.linear_probe_epochs,
            metrics["linear_probe_val"],
            metrics["linear_probe_test"],
        )

    logger = main_only(lambda: MetricLogger(out, tensorboard=cfg.log.tensorboard))
    logger.log(0, "evaluate", metrics)
    logger.close()

    def plot() -> Path | None:
        (out / EMBEDDING_FILE).unlink(missing_ok=True)  # never leave a plot of an earlier run beside these numbers
        if not cfg.embedding:
            return None
        test_x, test_y = features["test"]
        points, labels = embed_2d(test_x, test_y, seed=cfg.seed, max_points=cfg.embedding_max_points)
        path = plot_embedding(
            points,
            labels,
            out / EMBEDDING_FILE,
            title=f"t-SNE of {data.name} test features ({len(points)} points)\n{backbone_file}",
            class_names=info.classes,
        )
        log.info("embedding of %d test images: %s", len(points), path)
        return path

    embedding_path = on_main(plot)
    summary = {
        "stage": "evaluate",
        "wall_time_s": time.perf_counter() - start_time,
        "metrics": metrics,
        "backbone": str(backbone_file),
        "feature_dim": int(train_x.shape[1]),
        "num_samples": {split: len(x) for split, (x, _) in features.items()},
        "embedding": str(embedding_path) if embedding_path else None,
    }
    summary_path = on_main(lambda: write_summary(out, summary))
    barrier()
    return EvaluateResult(out, metrics, summary_path, embedding_path)
