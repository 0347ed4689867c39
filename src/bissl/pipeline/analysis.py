"""What a study found, in the terms of each task's declared metrics (the first is the headline).

Per task and arm: mean ± std over seeds of every declared test metric after fine-tuning, and of the frozen scores
of the backbone the arm starts fine-tuning from (before fine-tuning: kNN and linear-probe accuracy where the task is
scored on the data's class labels, else the task's own declared metrics of its head trained on the frozen backbone,
the ``head_probe_test_*`` of ``bissl evaluate``); paired differences against the baseline arm, with a verdict for
each before-fine-tuning score and for the headline after fine-tuning; warnings where an arm fine-tunes below its own
starting backbone's linear probe; the alignment's coupling diagnostics.

Multiplicity: every question a study asks ("does an arm's <metric> <before | after> fine-tuning differ from the
baseline's?") is one family of tests, one per (arm, task); Holm's method adjusts the p-values within each family,
over the arms and the tasks together, and every verdict reads the adjusted p.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from bissl.config import ArmSpec, PipelineConfig, TaskSpec
from bissl.downstream.base import DOWNSTREAM_TASKS, Metric
from bissl.pipeline.stats import holm, paired_comparison, summarize

ALPHA = 0.05
#: frozen-feature accuracies of a run's starting backbone on the test split (``bissl.stages.evaluate``'s keys)
FROZEN = (
    Metric("knn_test", label="kNN top-1", unit="%", scale=100.0),
    Metric("linear_probe_test", label="linear probe top-1", unit="%", scale=100.0),
)
#: headline metrics that measure what the linear probe measures (top-1 accuracy), so the two may be compared
PROBE_COMPARABLE = ("top1",)
KINDS = {
    "pretrained": "fine-tunes the pretrained backbone",
    "bissl": "fine-tunes BiSSL's theta",
    "control": "control: as many pretext steps with the proximal term, no upper level (n_upper = 0)",
    "tapt": "rival: task-adaptive pretraining (more pretext steps on the task's images), then fine-tuning",
    "multitask": "rival: one backbone on pretext loss + w x downstream loss, then fine-tuning",
    "penalty": "rival: first-order bilevel (value-function penalty, no Hessian), then fine-tuning of its theta",
    "probe": "the frozen linear probe of the pretrained backbone (no fine-tuning)",
}
#: what a stage's ``compute`` holds (bissl.utils.compute), in the report's order
COMPUTE = ("forward", "backward", "hvp", "images")

Run = Mapping[str, Any]


def task_metrics(task: TaskSpec) -> tuple[Metric, ...]:
    """The task's declared metrics; the first is the headline (an error names a task that declares none)."""
    cls = DOWNSTREAM_TASKS.get(task.downstream.task)
    cls.primary()
    return cls.metrics


def before_metrics(task: TaskSpec, head_probe: bool) -> tuple[Metric, ...]:
    """What the "before fine-tuning" table reports: :data:`FROZEN`, or with ``head_probe`` the task's declared
    metrics (headline first) of its head trained on the frozen backbone."""
    if not head_probe:
        return FROZEN
    return tuple(replace(m, key=f"head_probe_test_{m.key}", label=f"head probe {m.name}") for m in task_metrics(task))


def arm_kind(cfg: PipelineConfig, arm: ArmSpec) -> str:
    """``pretrained``, ``bissl``, ``control`` (a BiSSL arm without upper level) or a rival's kind."""
    if arm.kind == "conventional":
        return "pretrained"
    if arm.kind == "bissl":
        return "control" if cfg.is_control(arm) else "bissl"
    return arm.kind


def arm_runs(runs: list[Run], task: str, arm: str) -> list[Run]:
    """The runs of one arm on one task, by seed."""
    return sorted((r for r in runs if r["task"] == task and r["arm"] == arm), key=lambda r: r["seed"])


def verdict(comparison: Mapping[str, Any], arm: str, baseline: str, metric: Metric) -> str:
    """One sentence: is ``arm`` better or worse than ``baseline`` on ``metric`` at the 5 % level (the Holm-adjusted
    p where its family holds several tests), in the metric's own direction?"""
    diff = f"{comparison['mean_diff'] * metric.scale:+.2f}{' ' + metric.unit if metric.unit else ''} {metric.name}"
    p = comparison.get("p_holm", comparison["p_value"])
    if p is None:
        return f"{arm} vs {baseline}: {diff} from {comparison['n']} seed(s); too few seeds to test"
    which = "Holm-adjusted p" if "p_holm" in comparison else "p"
    if p >= ALPHA:
        mde = comparison.get("mde")
        could = "" if not mde else f"; the study would detect ±{mde * metric.scale:.2f} with 80 % power"
        return f"{arm} and {baseline} do not differ significantly: {diff} ({which} = {p:.3g}{could})."
    better = metric.better(comparison["mean_diff"], 0.0)
    return f"{arm} is {'better' if better else 'worse'} than {baseline}: {diff} ({which} = {p:.3g})."


def _summary(runs: list[Run], field: str, key: str) -> dict[str, float] | None:
    values = [r[field][key] for r in runs if key in r[field]]
    return vars(summarize(values)) if len(values) == len(runs) and runs else None


def _compare(runs: list[Run], base: list[Run], field: str, key: str) -> dict[str, Any] | None:
    if not all(key in r[field] for r in (*runs, *base)):
        return None
    return paired_comparison([r[field][key] for r in runs], [r[field][key] for r in base]).as_dict()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numeric leaves of a nested dict, with dotted keys."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


def coupling(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Mean ± std over seeds of every numeric coupling diagnostic of the arm's alignments (empty without any)."""
    per_key: dict[str, list[float]] = {}
    for r in runs:
        for key, value in flatten(r.get("coupling") or {}):
            per_key.setdefault(key, []).append(value)
    return {key: vars(summarize(values)) for key, values in per_key.items()}


def compute(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Per stage of the arm's runs (align, finetune, probe): the mean over seeds of each count and of wall time."""
    stages = [
        stage for stage in ("align", "probe", "finetune") if runs and all(stage in r.get("compute", {}) for r in runs)
    ]
    return {
        stage: {
            **{key: sum(r["compute"][stage][key] for r in runs) / len(runs) for key in COMPUTE},
            "wall_time_s": sum(r["wall_time_s"][stage] for r in runs) / len(runs),
        }
        for stage in stages
    }


def probe_warnings(
    task: TaskSpec, arms: Mapping[str, Any], by_arm: Mapping[str, list[Run]], headline: Metric, head_probe: bool
) -> list[str]:
    """Arms whose fine-tuned headline is worse than their own starting backbone's probe of the same metric (the
    task's head probe with ``head_probe``, else the linear probe; top-1 tasks only), each with what the runs
    measured about why: the paired test of fine-tune against probe on test, and the same two on validation, where
    fine-tuning's checkpoint was selected (the best of its validation checks, while the probe is scored once)."""
    if not head_probe and headline.key not in PROBE_COMPARABLE:
        return []
    key, probe_name = (
        (f"head_probe_test_{headline.key}", "head probe") if head_probe else ("linear_probe_test", "linear probe")
    )
    val_key = key.replace("_test", "_val")
    warnings = []
    for arm, s in arms.items():
        after, probe = s["after"][headline.key], s["before"].get(key)
        if after is None or probe is None or not headline.better(probe["mean"], after["mean"]):
            continue
        runs, unit = by_arm[arm], headline.unit
        gap = paired_comparison([r["metrics"][f"test_{headline.key}"] for r in runs], [r["frozen"][key] for r in runs])
        where = (
            f"{task.name}/{arm}: fine-tuned test {headline.name} {headline.show(after['mean'])} {unit} is "
            f"{'below' if headline.higher_is_better else 'above'} the {probe_name} of its own starting backbone "
            f"({headline.show(probe['mean'])} {unit}; paired over seeds {gap.mean_diff * headline.scale:+.2f}"
            + ("" if gap.p_value is None else f", p = {gap.p_value:.3g}")
            + ")"
        )
        val_after = _summary(runs, "metrics", f"val_{headline.key}")
        val_probe = _summary(runs, "frozen", val_key)
        selection_noise = (
            val_after is not None
            and val_probe is not None
            and not headline.better(val_probe["mean"], val_after["mean"])
            and (gap.p_value is None or gap.p_value >= ALPHA)
        )
        if selection_noise:
            warnings.append(
                f"{where}. On validation, where the fine-tuned checkpoint was selected, it is at or above that probe "
                f"({headline.show(val_after['mean'])} vs {headline.show(val_probe['mean'])} {unit}), and the test gap "
                "is not significant: the selected checkpoint is the best of several noisy validation scores while the "
                "probe is scored once, so selection on this validation split cannot resolve a difference this small. "
                "Read the comparison after fine-tuning with that in mind; the frozen comparison before it is exact."
            )
        else:
            warnings.append(
                f"{where}: fine-tuning lost what the frozen features held; "
                "its lr, augmentation or epochs are suspect, and so is any comparison with this arm."
            )
    return warnings


def analyse_task(cfg: PipelineConfig, task: TaskSpec, runs: list[Run]) -> dict[str, Any]:
    """Summaries, comparisons, Holm adjustment, verdicts, warnings and coupling of one task."""
    metrics = task_metrics(task)
    headline = metrics[0]
    by_arm = {arm.name: arm_runs(runs, task.name, arm.name) for arm in cfg.arms}
    mine = [r for r in runs if r["task"] == task.name]
    head_probe = any(key.startswith("head_probe_test_") for r in mine for key in r["frozen"])
    before = before_metrics(task, head_probe)
    arms = {
        arm.name: {
            "kind": arm_kind(cfg, arm),
            "after": {m.key: _summary(by_arm[arm.name], "metrics", f"test_{m.key}") for m in metrics},
            "before": {m.key: _summary(by_arm[arm.name], "frozen", m.key) for m in before},
            "wall_time_s": vars(summarize([sum(r["wall_time_s"].values()) for r in by_arm[arm.name]])),
            "optim": by_arm[arm.name][0]["optim"],
            "coupling": coupling(by_arm[arm.name]),
            "compute": compute(by_arm[arm.name]),
        }
        for arm in cfg.arms
    }
    base = by_arm[cfg.baseline]
    others = [a for a in cfg.arm_names() if a != cfg.baseline]
    comparisons = {
        arm: {
            "after": {m.key: _compare(by_arm[arm], base, "metrics", f"test_{m.key}") for m in metrics},
            "before": {m.key: _compare(by_arm[arm], base, "frozen", m.key) for m in before},
        }
        for arm in others
    }
    return {
        "headline": headline.key,
        "labelled": any("knn_test" in r["frozen"] for r in mine),  # frozen kNN / linear probe on class labels
        "head_probe": head_probe,  # else: the task's own head on the frozen backbone
        "knn_k": sorted({r["knn_k"] for r in mine if r.get("knn_k") is not None}),
        "arms": arms,
        "comparisons": comparisons,
        "warnings": probe_warnings(task, arms, by_arm, headline, head_probe),
    }


def families(cfg: PipelineConfig, analysis: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The study's comparisons grouped by question, ``(before | after, metric key)``, over every arm and task."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for task in cfg.tasks:
        for by_stage in analysis[task.name]["comparisons"].values():
            for stage, by_metric in by_stage.items():
                for key, c in by_metric.items():
                    if c is not None:
                        grouped.setdefault((stage, key), []).append(c)
    return grouped


def identical(comparison: Mapping[str, Any]) -> bool:
    """Whether every paired difference is exactly zero (e.g. the ``probe`` arm's starting backbone is the
    baseline's): no test was made, so it does not count in its family."""
    return comparison["mean_diff"] == 0.0 and comparison["ci_low"] == comparison["ci_high"] == 0.0


def analyse(cfg: PipelineConfig, runs: list[Run]) -> dict[str, Any]:
    """:func:`analyse_task` of every task of the study, then Holm within each family of comparisons
    (:func:`families`, when it holds several tests; :func:`identical` ones are none) and the verdicts: every
    before-fine-tuning score, and the headline after fine-tuning."""
    analysis = {task.name: analyse_task(cfg, task, runs) for task in cfg.tasks}
    for family in families(cfg, analysis).values():
        tests = [c for c in family if c["p_value"] is not None and not identical(c)]
        if len(tests) > 1:
            for c, p in zip(tests, holm([c["p_value"] for c in tests]), strict=True):
                c["p_holm"] = p
    for task in cfg.tasks:
        result = analysis[task.name]
        headline = task_metrics(task)[0]
        for arm, c in result["comparisons"].items():
            for metric in before_metrics(task, result["head_probe"]):
                if c["before"][metric.key] is not None:
                    c["before"][metric.key]["verdict"] = verdict(c["before"][metric.key], arm, cfg.baseline, metric)
            if c["after"][headline.key] is not None:
                c["after"][headline.key]["verdict"] = verdict(c["after"][headline.key], arm, cfg.baseline, headline)
    return analysis
