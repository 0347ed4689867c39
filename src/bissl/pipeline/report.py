"""The study's analysis (mean +- std per arm, paired comparisons), its plots and ``report.md``."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bissl.config import PipelineConfig
from bissl.engine.logger import read_metrics
from bissl.pipeline.stats import paired_comparison, summarize
from bissl.utils.io import atomic_write
from bissl.utils.plotting import new_figure, save_png

HEADLINE_METRICS = ("test_top1", "test_mean_per_class")
REPORT_FILE = "report.md"


def analyse(cfg: PipelineConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: each arm's mean/std of the headline metrics and wall time, and each arm vs the baseline."""
    analysis: dict[str, Any] = {}
    for task in cfg.tasks:
        by_arm = {arm: sorted((r for r in runs if r["task"] == task.name and r["arm"] == arm), key=lambda r: r["seed"])
                  for arm in cfg.arm_names()}  # fmt: skip
        arms = {}
        for arm, arm_runs in by_arm.items():
            arms[arm] = {m: vars(summarize([r["metrics"][m] for r in arm_runs])) for m in HEADLINE_METRICS}
            arms[arm]["wall_time_s"] = vars(summarize([sum(r["wall_time_s"].values()) for r in arm_runs]))
        comparisons = {}
        for arm in cfg.arm_names():
            if arm == cfg.baseline:
                continue
            comparisons[arm] = {}
            for metric in HEADLINE_METRICS:
                values = [r["metrics"][metric] for r in by_arm[arm]]
                base = [r["metrics"][metric] for r in by_arm[cfg.baseline]]
                result = paired_comparison(values, base)
                comparisons[arm][metric] = {**result.as_dict(), "verdict": result.verdict(arm, cfg.baseline, metric)}
        analysis[task.name] = {"arms": arms, "comparisons": comparisons}
    return analysis


def _fmt(summary: dict[str, float]) -> str:
    return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}"


def _ci(c: dict[str, Any]) -> str:
    if c["ci_low"] is None:
        return "n/a"
    return f"[{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}]"


def headline_table(cfg: PipelineConfig, analysis: dict[str, Any]) -> str:
    """Markdown table: task, arm, test top-1 and mean per-class accuracy (mean ± std, %), seeds, time."""
    lines = [
        "| task | arm | test top-1 (%) | test mean per-class (%) | seeds | wall time / seed (s) |",
        "|---|---|---|---|---|---|",
    ]
    for task in cfg.tasks:
        for arm, s in analysis[task.name]["arms"].items():
            lines.append(
                f"| {task.name} | {arm} | {_fmt(s['test_top1'])} | {_fmt(s['test_mean_per_class'])} | "
                f"{s['test_top1']['n']} | {s['wall_time_s']['mean']:.0f} |"
            )
    return "\n".join(lines)


def comparison_table(cfg: PipelineConfig, analysis: dict[str, Any]) -> str:
    lines = [
        f"| task | arm − {cfg.baseline} | Δ top-1 (points) | 95% CI | p (paired t) |",
        "|---|---|---|---|---|",
    ]
    for task in cfg.tasks:
        for arm, metrics in analysis[task.name]["comparisons"].items():
            c = metrics["test_top1"]
            p = "n/a" if c["p_value"] is None else f"{c['p_value']:.3g}"
            lines.append(f"| {task.name} | {arm} | {100 * c['mean_diff']:+.2f} | {_ci(c)} | {p} |")
    return "\n".join(lines)


def plot_accuracy(cfg: PipelineConfig, runs: list[dict[str, Any]], path: Path) -> Path:
    """Test top-1 per arm and task: the mean as a bar, every seed as a dot."""
    fig = new_figure((3.2 * len(cfg.tasks) + 1, 3.6))
    for i, task in enumerate(cfg.tasks):
        ax = fig.add_subplot(1, len(cfg.tasks), i + 1)
        for j, arm in enumerate(cfg.arm_names()):
            values = [100 * r["metrics"]["test_top1"] for r in runs if r["task"] == task.name and r["arm"] == arm]
            ax.bar(j, np.mean(values), color=f"C{j}", alpha=0.5, yerr=np.std(values, ddof=1) if len(values) > 1 else 0)
            ax.scatter(np.full(len(values), j), values, color=f"C{j}", s=14, zorder=3)
        ax.set_xticks(range(len(cfg.arms)), cfg.arm_names(), rotation=20, fontsize=8)
        ax.set_title(task.name, fontsize=9)
        ax.set_ylabel("test top-1 (%)" if i == 0 else "")
        ax.margins(y=0.3)
        low = min(100 * r["metrics"]["test_top1"] for r in runs if r["task"] == task.name)
        ax.set_ylim(bottom=max(0.0, low - 10))
    return save_png(fig, path)


def plot_curves(cfg: PipelineConfig, runs: list[dict[str, Any]], path: Path) -> Path:
    """Fine-tuning curves (validation top-1 and training loss per epoch), mean over seeds, per task and arm."""
    fig = new_figure((3.4 * len(cfg.tasks) + 1, 6.0))
    for i, task in enumerate(cfg.tasks):
        curves: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
        for r in runs:
            if r["task"] != task.name:
                continue
            records = read_metrics(Path(r["finetune_dir"]) / "metrics.jsonl", "epoch")
            for key in ("val_top1", "train_loss"):
                curves[r["arm"]][key].append([rec[key] for rec in records if key in rec])
        for row, key in enumerate(("val_top1", "train_loss")):
            ax = fig.add_subplot(2, len(cfg.tasks), row * len(cfg.tasks) + i + 1)
            for j, arm in enumerate(cfg.arm_names()):
                series = curves[arm][key]
                length = min(len(s) for s in series)
                mean = np.mean([s[:length] for s in series], axis=0)
                ax.plot(np.arange(1, length + 1), mean, color=f"C{j}", label=arm)
            ax.set_title(f"{task.name}: {key}", fontsize=9)
            ax.set_xlabel("epoch" if row == 1 else "")
            if i == 0 and row == 0:
                ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_alignment(
    cfg: PipelineConfig, task_index: int, runs: list[dict[str, Any]], pretrained: Path, path: Path
) -> Path:
    """t-SNE of test features of the backbone each arm fine-tunes from (first seed): the alignment picture."""
    from bissl.dist import resolve_device
    from bissl.downstream.base import DOWNSTREAM_TASKS
    from bissl.engine.checkpoint import load_backbone
    from bissl.eval.embedding import embed_2d, plot_embeddings_grid
    from bissl.eval.frozen import dataset_features

    task = cfg.tasks[task_index]
    test = DOWNSTREAM_TASKS.get(task.downstream.task).splits(task.downstream)["test"]
    device = resolve_device(cfg.device)
    panels = []
    for arm in cfg.arm_names():
        run = next(r for r in runs if r["task"] == task.name and r["arm"] == arm and r["seed"] == cfg.seeds[0])
        source = Path(run["align_dir"]) if run["align_dir"] else pretrained
        backbone, _ = load_backbone(source / "backbone.pt")
        features, labels = dataset_features(backbone.to(device), test, device=device)
        points, kept = embed_2d(features, labels, seed=cfg.seeds[0], max_points=cfg.embedding_max_points)
        panels.append((f"{arm}: before fine-tuning", points, kept))
    return plot_embeddings_grid(panels, path, class_names=test.info.classes or None, title=f"{task.name} (test split)")


def write_report(cfg: PipelineConfig, results: dict[str, Any], pretrained: Path) -> Path:
    """Add the analysis to ``results`` and write the plots and ``report.md``; returns the report's path."""
    out = Path(cfg.out_dir)
    runs = results["runs"]
    analysis = analyse(cfg, runs)
    results["analysis"] = analysis
    plots = {
        "accuracy": plot_accuracy(cfg, runs, out / "accuracy.png"),
        "curves": plot_curves(cfg, runs, out / "curves.png"),
    }
    if cfg.embedding:
        for i, task in enumerate(cfg.tasks):
            plots[f"alignment_{task.name}"] = plot_alignment(
                cfg, i, runs, pretrained, out / f"alignment_{task.name}.png"
            )
    results["plots"] = {k: str(v) for k, v in plots.items()}
    verdicts = [
        f"- **{task.name}**: {c['test_top1']['verdict']}"
        for task in cfg.tasks
        for c in analysis[task.name]["comparisons"].values()
    ]
    pre_time = results["stage_wall_time_s"].get("pretrain")
    text = "\n".join(
        [
            "# BiSSL study report",
            "",
            f"Arms: {', '.join(cfg.arm_names())} (baseline: {cfg.baseline}); seeds: {cfg.seeds}; "
            f"tasks: {', '.join(t.name for t in cfg.tasks)}. Every arm fine-tunes with the same settings and budget; "
            "BiSSL arms fine-tune the lower backbone theta of the alignment stage.",
            "",
            "## Test accuracy (mean ± std over seeds, model selected on validation)",
            "",
            headline_table(cfg, analysis),
            "",
            "## Paired differences against the baseline (same seeds)",
            "",
            comparison_table(cfg, analysis),
            "",
            "## Did BiSSL help on this data?",
            "",
            *verdicts,
            "",
            "## Plots",
            "",
            *[f"- {name}: ![{name}]({Path(p).name})" for name, p in plots.items()],
            "",
            "## Run",
            "",
            f"- pretrained backbone: `{pretrained}`" + (f" (pretraining took {pre_time:.0f} s)" if pre_time else ""),
            f"- every number, config, version and wall time: `{out / 'results.json'}`",
            f"- torch {results['environment']['torch']}, python {results['environment']['python']}, "
            f"{results['environment']['threads']} threads, CUDA: {results['environment']['cuda']}",
            "",
        ]
    )
    atomic_write(out / REPORT_FILE, lambda f: f.write(text), mode="w")
    return out / REPORT_FILE
