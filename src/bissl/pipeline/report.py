"""``report.md``: the analysis (:mod:`bissl.pipeline.analysis`) as tables, verdicts, warnings and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bissl.config import PipelineConfig, TaskSpec
from bissl.downstream.base import Metric
from bissl.pipeline.analysis import ALPHA, FROZEN, KINDS, analyse, arm_kind, task_metrics
from bissl.pipeline.plots import plot_alignment, plot_curves, plot_headline
from bissl.utils.io import atomic_write

REPORT_FILE = "report.md"


def _mean_std(metric: Metric, summary: dict[str, float] | None) -> str:
    return "n/a" if summary is None else f"{metric.show(summary['mean'])} ± {metric.show(summary['std'])}"


def _diff(metric: Metric, c: dict[str, Any] | None) -> str:
    """Paired difference with its 95 % CI, in display units."""
    if c is None:
        return "n/a"
    ci = "" if c["ci_low"] is None else f" [{c['ci_low'] * metric.scale:+.2f}, {c['ci_high'] * metric.scale:+.2f}]"
    return f"{c['mean_diff'] * metric.scale:+.2f}{ci}"


def _p(c: dict[str, Any] | None, key: str = "p_value") -> str:
    return "n/a" if c is None or c.get(key) is None else f"{c[key]:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def after_table(cfg: PipelineConfig, task: TaskSpec, result: dict[str, Any]) -> list[str]:
    """Every declared test metric per arm (mean ± std), the fine-tuning lr / weight decay, seeds, time."""
    metrics = task_metrics(task)
    rows = []
    for arm, s in result["arms"].items():
        optim = s["optim"]
        rows.append([arm, f"{optim['lr']:.3g}", f"{optim['weight_decay']:.3g}",
                     *(_mean_std(m, s["after"][m.key]) for m in metrics),
                     str(s["wall_time_s"]["n"]), f"{s['wall_time_s']['mean']:.0f}"])  # fmt: skip
    return _table(["arm", "lr", "weight decay", *(f"test {m.header()}" for m in metrics), "seeds", "time / seed (s)"],
                  rows)  # fmt: skip


def before_table(cfg: PipelineConfig, result: dict[str, Any]) -> list[str]:
    """Frozen kNN and linear probe of each arm's starting backbone, and their paired difference to the baseline."""
    rows = []
    for arm, s in result["arms"].items():
        c = result["comparisons"].get(arm, {}).get("before", {})
        cells = [_mean_std(m, s["before"][m.key]) for m in FROZEN]
        if arm == cfg.baseline:
            cells += ["baseline"] * (2 * len(FROZEN))
        else:
            for m in FROZEN:
                cells += [_diff(m, c.get(m.key)), _p(c.get(m.key))]
        rows.append([arm, *cells])
    header = ["arm", *(m.header() for m in FROZEN)]
    for m in FROZEN:
        header += [f"Δ {m.name} vs {cfg.baseline} (points, 95% CI)", "p"]
    return _table(header, rows)


def comparison_table(cfg: PipelineConfig, task: TaskSpec, result: dict[str, Any]) -> list[str]:
    """Paired differences against the baseline on the headline metric, raw and Holm-adjusted p, verdict."""
    metric = task_metrics(task)[0]
    rows = [
        [arm, _diff(metric, c["after"][metric.key]), _p(c["after"][metric.key]),
         _p(c["after"][metric.key], "p_holm"), c["after"][metric.key]["verdict"]]
        for arm, c in result["comparisons"].items()
    ]  # fmt: skip
    unit = f" ({metric.unit})" if metric.unit else ""
    header = [f"arm − {cfg.baseline}", f"Δ test {metric.name}{unit}, 95% CI", "p (paired t)", "p (Holm)", "verdict"]
    return _table(header, rows)


def coupling_lines(result: dict[str, Any]) -> list[str]:
    """The alignment's coupling diagnostics (mean ± std over seeds) per arm that reported them."""
    rows = [
        [arm, key, f"{v['mean']:.4g} ± {v['std']:.2g}"]
        for arm, s in result["arms"].items()
        for key, v in s["coupling"].items()
    ]
    if not rows:
        return []
    return ["", "Coupling of theta and phi during alignment (`align/summary.json`):", "", *_table(
        ["arm", "diagnostic", "mean ± std"], rows)]  # fmt: skip


def task_section(cfg: PipelineConfig, task: TaskSpec, result: dict[str, Any]) -> list[str]:
    """One task: after / before fine-tuning, comparisons, warnings, coupling."""
    headline = task_metrics(task)[0]
    before = (
        before_table(cfg, result)
        if result["labelled"]
        else ["n/a: the task's data has no class labels, so there is no frozen kNN or linear probe."]
    )
    return [
        f"## {task.name} (headline: test {headline.header()})",
        "",
        "**Before fine-tuning**: the frozen backbone each arm starts fine-tuning from, test split (kNN and a linear "
        "probe on the task's training split; mean ± std over seeds).",
        "",
        *before,
        "",
        "**After fine-tuning**: test metrics of the model selected on validation (mean ± std over seeds).",
        "",
        *after_table(cfg, task, result),
        "",
        "**Against the baseline** (paired over seeds):",
        "",
        *comparison_table(cfg, task, result),
        *[f"\n> **WARNING** {w}" for w in result["warnings"]],
        *coupling_lines(result),
        "",
    ]


def protocol_lines(cfg: PipelineConfig) -> list[str]:
    """Arms (with their kind), seeds and how fine-tuning settings were chosen."""
    arms = [f"- `{arm.name}`: {KINDS[arm_kind(cfg, arm)]}" + (" (baseline)" if arm.name == cfg.baseline else "")
            for arm in cfg.arms]  # fmt: skip
    if cfg.search.trials:
        settings = (
            f"Each arm's fine-tuning lr / weight decay was searched per task on validation ({cfg.search.trials} "
            f"{cfg.search.sampler} trials, lr in {list(cfg.search.lr_range)}, weight decay in "
            f"{list(cfg.search.weight_decay_range)}, first replicate's starting backbone; same budget for every arm, "
            "each arm's own sampler seed); "
            "every replicate then fine-tuned with its arm's best setting (tables below, `results.json` → `search`)."
        )
    else:
        settings = "Every arm fine-tunes with the same fixed lr / weight decay (no search: `search.trials: 0`)."
    return [
        *replicate_lines(cfg),
        f"Tasks: {', '.join(t.name for t in cfg.tasks)}. Arms:",
        "",
        *arms,
        "",
        settings,
        f"Verdicts test at the {ALPHA:.0%} level; with several arms the headline p-values are Holm-adjusted over "
        "the arms' comparisons with the baseline, per task.",
    ]


def replicate_lines(cfg: PipelineConfig) -> list[str]:
    """How many replicates, and what varied between them (what the paired tests' spread includes)."""
    few_shot = [t.name for t in cfg.tasks if t.downstream.few_shot]
    varied = ["alignment / fine-tuning seed (batches, augmentations, heads)"]
    if cfg.pretrained is not None:
        fixed = [f"pretraining (pinned: every replicate starts from `{cfg.pretrained}`)"]
    elif cfg.replicate.pretrain:
        varied.insert(0, "pretraining run (seeded by it, `pretrain/seed<k>`)")
        fixed = []
    else:
        fixed = [f"pretraining (one run, seed {cfg.pretrain.seed}: `replicate.pretrain: false`)"]
    if few_shot and cfg.replicate.few_shot:
        varied.append(f"draw of the few-shot training images ({', '.join(few_shot)})")
    elif few_shot:
        fixed.append("the few-shot training images (one draw, `data.seed`: `replicate.few_shot: false`)")
    lines = [f"Replicates: {len(cfg.seeds)} (seeds {cfg.seeds}); each replicate has its own " + "; ".join(varied) + "."]
    if fixed:
        lines.append("Shared by every replicate, so outside the statistics: " + "; ".join(fixed) + ".")
    return lines


def pretrain_lines(results: dict[str, Any]) -> list[str]:
    """The pretraining run(s) the replicates start from, with the time each took here."""
    lines = []
    for folder in dict.fromkeys(results["pretrained"].values()):
        took = results["stage_wall_time_s"].get(f"pretrain/{Path(folder).name}")
        lines.append(f"- pretrained backbone: `{folder}`" + (f" (took {took:.0f} s)" if took else ""))
    return lines


def verdict_lines(cfg: PipelineConfig, analysis: dict[str, Any]) -> list[str]:
    """Each comparison's verdict on its task's headline metric, then every warning of the study."""
    lines = [
        f"- **{t.name}**: {c['after'][analysis[t.name]['headline']]['verdict']}"
        for t in cfg.tasks
        for c in analysis[t.name]["comparisons"].values()
    ]
    warnings = [f"> **WARNING** {w}" for t in cfg.tasks for w in analysis[t.name]["warnings"]]
    return [*lines, *([""] if warnings else []), *warnings]


def write_plots(cfg: PipelineConfig, results: dict[str, Any]) -> dict[str, Path]:
    out, runs = Path(cfg.out_dir), results["runs"]
    plots = {"headline": plot_headline(cfg, runs, out / "headline.png")}
    plots["curves"] = plot_curves(cfg, runs, out / "curves.png")
    if cfg.embedding:
        for i, task in enumerate(cfg.tasks):
            if results["analysis"][task.name]["labelled"]:
                path = out / f"alignment_{task.name}.png"
                plots[f"alignment_{task.name}"] = plot_alignment(cfg, i, runs, path)
    return plots


def write_report(cfg: PipelineConfig, results: dict[str, Any]) -> Path:
    """Add the analysis to ``results`` and write the plots and ``report.md``; returns the report's path."""
    out = Path(cfg.out_dir)
    results["analysis"] = analysis = analyse(cfg, results["runs"])
    plots = write_plots(cfg, results)
    results["plots"] = {k: str(v) for k, v in plots.items()}
    env = results["environment"]
    text = "\n".join(
        [
            "# BiSSL study report",
            "",
            *protocol_lines(cfg),
            "",
            "## Verdicts (headline metric of each task)",
            "",
            *verdict_lines(cfg, analysis),
            "",
            *[line for t in cfg.tasks for line in task_section(cfg, t, analysis[t.name])],
            "## Plots",
            "",
            *[f"- {name}: ![{name}]({Path(p).name})" for name, p in plots.items()],
            "",
            "## Run",
            "",
            *pretrain_lines(results),
            f"- every number, config, version and wall time: `{out / 'results.json'}`",
            f"- torch {env['torch']}, python {env['python']}, {env['threads']} threads, CUDA: {env['cuda']}",
            "",
        ]
    )
    atomic_write(out / REPORT_FILE, lambda f: f.write(text), mode="w")
    return out / REPORT_FILE
