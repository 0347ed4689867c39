"""``report.md``: the analysis (:mod:`bissl.pipeline.analysis`) as tables, verdicts, warnings and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bissl.config import PipelineConfig, TaskSpec
from bissl.downstream.base import Metric
from bissl.engine.files import CURVES_PLOT_FILE, HEADLINE_PLOT_FILE, REPORT_FILE, alignment_plot_file
from bissl.pipeline.analysis import ALPHA, COMPUTE, KINDS, analyse, arm_kind, before_metrics, task_metrics
from bissl.pipeline.plots import plot_alignment, plot_curves, plot_headline
from bissl.utils.io import atomic_write


def _mean_std(metric: Metric, summary: dict[str, float] | None) -> str:
    return "n/a" if summary is None else f"{metric.show(summary['mean'])} ± {metric.show(summary['std'])}"


def _diff(metric: Metric, c: dict[str, Any] | None) -> str:
    """Paired difference with its 95 % CI, in display units; beside a non-significant one, the minimum detectable
    effect (80 % power), so that a null says how large a difference it could have missed."""
    if c is None:
        return "n/a"
    ci = "" if c["ci_low"] is None else f" [{c['ci_low'] * metric.scale:+.2f}, {c['ci_high'] * metric.scale:+.2f}]"
    p = c.get("p_holm", c["p_value"])
    mde = f" (MDE ±{c['mde'] * metric.scale:.2f})" if p is not None and p >= ALPHA and c.get("mde") else ""
    return f"{c['mean_diff'] * metric.scale:+.2f}{ci}{mde}"


def _d_z(c: dict[str, Any] | None) -> str:
    """Effect size d_z with its 95 % CI."""
    if c is None or c.get("d_z") is None:
        return "n/a"
    return f"{c['d_z']:+.2f} [{c['d_z_ci'][0]:+.2f}, {c['d_z_ci'][1]:+.2f}]"


def _p(c: dict[str, Any] | None, key: str = "p_value") -> str:
    return "n/a" if c is None or c.get(key) is None else f"{c[key]:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def after_table(cfg: PipelineConfig, task: TaskSpec, result: dict[str, Any]) -> list[str]:
    """Every declared test metric per arm (mean ± std), the fine-tuning lr / weight decay (and a multitask arm's w,
    when the study has one), seeds, time."""
    metrics = task_metrics(task)
    weighted = any("multitask_weight" in s["optim"] for s in result["arms"].values())
    rows = []
    for arm, s in result["arms"].items():
        optim = s["optim"]
        weight = [f"{optim['multitask_weight']:.3g}" if "multitask_weight" in optim else "–"] if weighted else []
        rows.append([arm, f"{optim['lr']:.3g}", f"{optim['weight_decay']:.3g}", *weight,
                     *(_mean_std(m, s["after"][m.key]) for m in metrics),
                     str(s["wall_time_s"]["n"]), f"{s['wall_time_s']['mean']:.0f}"])  # fmt: skip
    header = ["arm", "lr", "weight decay", *(["multitask w"] if weighted else []),
              *(f"test {m.header()}" for m in metrics), "seeds", "time / seed (s)"]  # fmt: skip
    return _table(header, rows)


def before_table(cfg: PipelineConfig, task: TaskSpec, result: dict[str, Any]) -> list[str]:
    """The frozen scores of each arm's starting backbone (:func:`~bissl.pipeline.analysis.before_metrics`), and
    their paired difference to the baseline."""
    metrics = before_metrics(task, result["head_probe"])
    rows = []
    for arm, s in result["arms"].items():
        c = result["comparisons"].get(arm, {}).get("before", {})
        cells = [_mean_std(m, s["before"][m.key]) for m in metrics]
        if arm == cfg.baseline:
            cells += ["baseline"] * (4 * len(metrics))
        else:
            for m in metrics:
                cells += [_diff(m, c.get(m.key)), _p(c.get(m.key)), _p(c.get(m.key), "wilcoxon_p"),
                          _p(c.get(m.key), "p_holm")]  # fmt: skip
        rows.append([arm, *cells])
    header = ["arm", *(m.header() for m in metrics)]
    for m in metrics:
        unit = "points" if m.unit == "%" else m.unit
        header += [
            f"Δ {m.name} vs {cfg.baseline} ({unit + ', ' if unit else ''}95% CI)",
            "p (paired t)",
            "p (Wilcoxon)",
            "p (Holm)",
        ]
    return _table(header, rows)


def before_lines(cfg: PipelineConfig, task: TaskSpec, result: dict[str, Any]) -> list[str]:
    """What the "before fine-tuning" scores are (with the kNN's k), then their table."""
    if result["head_probe"]:
        what = (
            f"the task's own head trained on it ({cfg.evaluate.linear_probe_epochs} epochs at lr "
            f"{cfg.evaluate.linear_probe_lr:g}, the task's training split), its declared metrics"
        )
    elif result["labelled"]:
        k = ", ".join(map(str, result.get("knn_k", []))) or str(cfg.evaluate.knn_k)
        what = (
            f"kNN (k = {k}: `evaluate.knn_k` = {cfg.evaluate.knn_k} capped by the training split's mean class size) "
            "and a linear probe on the task's training split"
        )
    else:
        return ["n/a: no frozen-backbone scores were recorded for this task."]
    return [
        f"**Before fine-tuning**: the frozen backbone each arm starts fine-tuning from, test split: {what} "
        "(mean ± std over seeds).",
        "",
        *before_table(cfg, task, result),
    ]


def comparison_table(cfg: PipelineConfig, task: TaskSpec, result: dict[str, Any]) -> list[str]:
    """Paired differences against the baseline on the headline metric, raw and Holm-adjusted p, verdict."""
    metric = task_metrics(task)[0]
    rows = [
        [arm, _diff(metric, c["after"][metric.key]), _d_z(c["after"][metric.key]), _p(c["after"][metric.key]),
         _p(c["after"][metric.key], "wilcoxon_p"), _p(c["after"][metric.key], "p_holm"),
         c["after"][metric.key]["verdict"]]
        for arm, c in result["comparisons"].items()
    ]  # fmt: skip
    unit = f" ({metric.unit})" if metric.unit else ""
    header = [f"arm − {cfg.baseline}", f"Δ test {metric.name}{unit}, 95% CI", "d_z, 95% CI", "p (paired t)",
              "p (Wilcoxon)", "p (Holm)", "verdict"]  # fmt: skip
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


def compute_lines(result: dict[str, Any]) -> list[str]:
    """Each arm's compute per stage after pretraining (mean per seed): backbone passes, HVPs, images, wall time."""
    rows = [
        [arm, stage, *(f"{c[key]:.0f}" for key in COMPUTE), f"{c['wall_time_s']:.1f}"]
        for arm, s in result["arms"].items()
        for stage, c in s["compute"].items()
    ]
    if not rows:
        return []
    header = ["arm", "stage", "backbone forward", "backbone backward", "HVPs", "images (forward)", "wall (s)"]
    return ["", "**Compute** per seed (mean; each stage's `summary.json` → `compute`; pretraining, the same for every "
            "arm, is not counted: its wall time per run is under Run):", "",
            *_table(header, rows)]  # fmt: skip


def task_section(cfg: PipelineConfig, task: TaskSpec, result: dict[str, Any]) -> list[str]:
    """One task: after / before fine-tuning, comparisons, warnings, coupling."""
    headline = task_metrics(task)[0]
    return [
        f"## {task.name} (headline: test {headline.header()})",
        "",
        *before_lines(cfg, task, result),
        "",
        "**After fine-tuning**: test metrics of the model selected on validation (mean ± std over seeds).",
        "",
        *after_table(cfg, task, result),
        "",
        "**Against the baseline** (paired over seeds):",
        "",
        *comparison_table(cfg, task, result),
        *[f"\n> **WARNING** {w}" for w in result["warnings"]],
        *compute_lines(result),
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
        if any(arm.kind == "multitask" for arm in cfg.arms):
            settings += (
                f" A multitask arm's trials also drew its w (log-uniform in {list(cfg.search.multitask_weight_range)}) "
                "and each aligned the first replicate's pretrained backbone with it at the arm's equal-compute cycles "
                "before fine-tuning; every replicate aligned with the best w (`multitask w` below)."
            )
    else:
        settings = "Every arm fine-tunes with the same fixed lr / weight decay (no search: `search.trials: 0`)."
    matched = [f"`{arm.name}` to `{target.name}`" for arm in cfg.arms if (target := cfg.budget_arm(arm)) is not None]
    budget = (
        [f"Equal compute: each rival's align cycles are sized, per task and seed, to the backbone backward passes + "
         f"Hessian-vector products its BiSSL arm measured ({', '.join(matched)}; `budget` in the arm's config); the "
         "compute tables show what each arm then spent.", ""]
        if matched else []
    )  # fmt: skip
    return [
        *replicate_lines(cfg),
        f"Tasks: {', '.join(t.name for t in cfg.tasks)}. Arms:",
        "",
        *arms,
        "",
        *budget,
        settings,
        f"Verdicts test at the {ALPHA:.0%} level. Each question (one frozen score of an arm's starting backbone before "
        "fine-tuning, or one test metric after, against the baseline's) is one family of tests over every arm "
        "and task; its p-values are Holm-adjusted within the family (p (Holm)), and the verdicts read the adjusted "
        "p. Beside each non-significant difference, MDE is the "
        "minimum detectable effect: the smallest true difference a paired t-test at these seeds and this spread "
        "would find with 80 % power (two-sided 5 %); a null rules out only differences larger than about it. "
        "d_z is the mean paired difference over its standard deviation; the Wilcoxon signed-rank p assumes no "
        f"normality (with {len(cfg.seeds)} seeds it cannot go below {2 / 2 ** len(cfg.seeds):.3g}).",
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
    """Each comparison's verdicts: on its starting backbone's frozen scores before fine-tuning, and on its task's
    headline metric after; then every warning of the study."""
    lines = []
    for t in cfg.tasks:
        result = analysis[t.name]
        for c in result["comparisons"].values():
            before = [c["before"][m.key] for m in before_metrics(t, result["head_probe"])]
            lines += [f"- **{t.name}**, before fine-tuning: {b['verdict']}" for b in before if b is not None]
            after = c["after"][result["headline"]]
            lines += [f"- **{t.name}**, after fine-tuning: {after['verdict']}"] if after is not None else []
    warnings = [f"> **WARNING** {w}" for t in cfg.tasks for w in analysis[t.name]["warnings"]]
    return [*lines, *([""] if warnings else []), *warnings]


def write_plots(cfg: PipelineConfig, results: dict[str, Any]) -> dict[str, Path]:
    out, runs = Path(cfg.out_dir), results["runs"]
    plots = {"headline": plot_headline(cfg, runs, out / HEADLINE_PLOT_FILE)}
    plots["curves"] = plot_curves(cfg, runs, out / CURVES_PLOT_FILE)
    if cfg.embedding:
        for i, task in enumerate(cfg.tasks):
            if results["analysis"][task.name]["labelled"]:
                path = out / alignment_plot_file(task.name)
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
            "## Verdicts (before fine-tuning: frozen scores; after: each task's headline metric)",
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
