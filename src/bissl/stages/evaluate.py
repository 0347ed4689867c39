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
from dataclasses import dataclass
from pathlib import Path

from bissl.config import EvaluateConfig
from bissl.dist import barrier, init_from_env, main_only, on_main
from bissl.downstream.base import DOWNSTREAM_TASKS
from bissl.engine.checkpoint import load_backbone, resolve_backbone_file
from bissl.engine.frozen import frozen_features, frozen_scores
from bissl.engine.logger import MetricLogger
from bissl.engine.names import validate_names
from bissl.engine.runtime import check_channels, prepare_run_dir, write_summary
from bissl.engine.step import resolve_precision, use_channels_last
from bissl.eval.embedding import embed_2d, plot_embedding
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
    backbone, spec = load_backbone(backbone_file)
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
