"""The study's plots: headline metric per arm, fine-tuning curves, and the t-SNE of each arm's starting backbone."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bissl.config import PipelineConfig
from bissl.engine.files import BACKBONE_FILE, METRICS_JSONL_FILE
from bissl.engine.logger import read_metrics
from bissl.pipeline.analysis import Run, task_metrics
from bissl.utils.plotting import new_figure, save_png


def plot_headline(cfg: PipelineConfig, runs: list[Run], path: Path) -> Path:
    """Each task's headline test metric per arm (display units): the mean as a bar, every seed as a dot."""
    fig = new_figure((3.2 * len(cfg.tasks) + 1, 3.6))
    for i, task in enumerate(cfg.tasks):
        metric = task_metrics(task)[0]
        ax = fig.add_subplot(1, len(cfg.tasks), i + 1)
        shown = []
        for j, arm in enumerate(cfg.arm_names()):
            values = [metric.scale * r["metrics"][f"test_{metric.key}"] for r in runs
                      if r["task"] == task.name and r["arm"] == arm]  # fmt: skip
            shown += values
            ax.bar(j, np.mean(values), color=f"C{j}", alpha=0.5, yerr=np.std(values, ddof=1) if len(values) > 1 else 0)
            ax.scatter(np.full(len(values), j), values, color=f"C{j}", s=14, zorder=3)
        ax.set_xticks(range(len(cfg.arms)), cfg.arm_names(), rotation=20, fontsize=8)
        ax.set_title(task.name, fontsize=9)
        ax.set_ylabel(f"test {metric.header()}", fontsize=8)
        low, high = min(shown), max(shown)
        pad = max(high - low, 0.05 * abs(high), 1e-6)
        ax.set_ylim(low - pad, high + pad)
    return save_png(fig, path)


def plot_curves(cfg: PipelineConfig, runs: list[Run], path: Path) -> Path:
    """Fine-tuning curves (validation headline metric and training loss per epoch), mean over seeds; ``probe`` arms
    do not fine-tune and have none."""
    fig = new_figure((3.4 * len(cfg.tasks) + 1, 6.0))
    tuned = [arm.name for arm in cfg.arms if arm.kind != "probe"]
    for i, task in enumerate(cfg.tasks):
        keys = (f"val_{task_metrics(task)[0].key}", "train_loss")
        curves: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
        for r in runs:
            if r["task"] == task.name and r["arm"] in tuned:
                records = read_metrics(Path(r["finetune_dir"]) / METRICS_JSONL_FILE, "epoch")
                for key in keys:
                    curves[r["arm"]][key].append([rec[key] for rec in records if key in rec])
        for row, key in enumerate(keys):
            ax = fig.add_subplot(2, len(cfg.tasks), row * len(cfg.tasks) + i + 1)
            for j, arm in enumerate(cfg.arm_names()):
                if arm not in tuned:
                    continue
                series = curves[arm][key]
                length = min(len(s) for s in series)
                ax.plot(np.arange(1, length + 1), np.mean([s[:length] for s in series], axis=0), color=f"C{j}",
                        label=arm)  # fmt: skip
            ax.set_title(f"{task.name}: {key}", fontsize=9)
            ax.set_xlabel("epoch" if row == 1 else "")
            if i == 0 and row == 0:
                ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_alignment(cfg: PipelineConfig, task_index: int, runs: list[Run], path: Path) -> Path:
    """t-SNE of test features of the backbone each arm fine-tunes from (first replicate): the alignment picture."""
    from bissl.distributed import resolve_device
    from bissl.downstream.base import DOWNSTREAM_TASKS
    from bissl.engine.checkpoint import load_backbone
    from bissl.eval.embedding import embed_2d, plot_embeddings_grid
    from bissl.eval.frozen import frozen_features

    task = cfg.tasks[task_index]
    test = DOWNSTREAM_TASKS.get(task.downstream.task).splits(task.downstream)["test"]
    device = resolve_device(cfg.device)
    panels: list[Any] = []
    for arm in cfg.arm_names():
        run = next(r for r in runs if r["task"] == task.name and r["arm"] == arm and r["seed"] == cfg.seeds[0])
        source = Path(run["align_dir"] or run["pretrained"])
        backbone, _ = load_backbone(source / BACKBONE_FILE)
        features, labels = frozen_features(backbone.to(device), test, device=device)
        points, kept = embed_2d(features, labels, seed=cfg.seeds[0], max_points=cfg.embedding_max_points)
        panels.append((f"{arm}: before fine-tuning", points, kept))
    return plot_embeddings_grid(panels, path, class_names=test.info.classes or None, title=f"{task.name} (test split)")
