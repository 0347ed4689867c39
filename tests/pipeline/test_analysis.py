"""The study's analysis and report come from the task's declared metrics: a lower-is-better user task, the
frozen-probe warning of a top-1 task, Holm over arms, the control arm's label."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bissl.config import PipelineConfig
from bissl.downstream.base import DOWNSTREAM_TASKS, DownstreamTask, Metric
from bissl.pipeline.analysis import analyse
from bissl.pipeline.report import write_report
from bissl.pipeline.stats import holm, minimum_detectable_effect


@DOWNSTREAM_TASKS.register("toy_mae", overwrite=True)
class ToyRegression(DownstreamTask):
    """A user's regression task: predict the label as a number, scored by its mean absolute error (lower is better)."""

    metrics = (Metric("mae", higher_is_better=False, label="MAE", unit="px"), Metric("r2", label="R²"))

    @classmethod
    def from_config(cls, cfg, splits):
        return cls()

    def build_head(self, feature_dim):
        return nn.Linear(feature_dim, 1)

    def prepare(self, batch, device, generator):
        return batch[0].to(device), batch[1].float().to(device)

    def loss(self, backbone, head, batch):
        return nn.functional.mse_loss(head(backbone(batch[0])).squeeze(1), batch[1])

    def predict(self, backbone, head, dataset, device):
        return torch.zeros(len(dataset)), torch.zeros(len(dataset))

    def score(self, predictions):
        return {"mae": float((predictions[0] - predictions[1]).abs().mean()), "r2": 0.0}


ARMS = [
    {"name": "conventional"},
    {"name": "bissl", "bissl": True},
    {"name": "pretext_only", "bissl": True, "align": {"bilevel": {"n_upper": 0}}},
]
ENVIRONMENT = {"torch": "x", "python": "y", "threads": 1, "cuda": None}


def _study(
    tmp_path, task: str, values: dict[str, list[dict[str, float]]], frozen=None, names=("t",)
) -> tuple[PipelineConfig, dict]:
    """A finished study of 3 seeds with the given per-arm test metrics (and frozen scores), and its metric logs; with
    several task ``names``, every task has the same values."""
    cfg = PipelineConfig(
        out_dir=str(tmp_path), seeds=[0, 1, 2], arms=ARMS, embedding=False,
        tasks=[{"name": name, "downstream": {"task": task}} for name in names],
    )  # fmt: skip
    runs = []
    for name, (arm, per_seed) in ((n, item) for n in names for item in values.items()):
        for seed, metrics in enumerate(per_seed):
            folder = tmp_path / name / arm / f"seed{seed}"
            folder.mkdir(parents=True)
            key = next(iter(metrics))
            lines = [{"tag": "epoch", "step": e, f"val_{key}": metrics[key], "train_loss": 1.0 / e} for e in (1, 2)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
            runs.append({
                "task": name, "arm": arm, "seed": seed, "finetune_dir": str(folder), "align_dir": None,
                "optim": {"lr": 0.01, "weight_decay": 1e-4}, "metrics": {f"test_{k}": v for k, v in metrics.items()},
                "frozen": (frozen or {}).get(arm, [{}] * 3)[seed], "coupling": {}, "wall_time_s": {"finetune": 1.0},
            })  # fmt: skip
    pretrained = {str(seed): str(tmp_path / "pretrain" / f"seed{seed}") for seed in cfg.seeds}
    results = {"runs": runs, "environment": ENVIRONMENT, "stage_wall_time_s": {}, "pretrained": pretrained}
    return cfg, results


def test_lower_is_better_task_gets_a_correct_report(tmp_path):
    mae = {
        "conventional": [{"mae": 2.0, "r2": 0.5}, {"mae": 2.2, "r2": 0.5}, {"mae": 2.1, "r2": 0.5}],
        "bissl": [{"mae": 1.5, "r2": 0.6}, {"mae": 1.6, "r2": 0.6}, {"mae": 1.55, "r2": 0.6}],  # lower: better
        "pretext_only": [{"mae": 3.0, "r2": 0.4}, {"mae": 3.3, "r2": 0.4}, {"mae": 3.1, "r2": 0.4}],  # worse
    }
    cfg, results = _study(tmp_path, "toy_mae", mae)
    report = write_report(cfg, results).read_text()
    analysis = results["analysis"]["t"]
    assert analysis["headline"] == "mae" and not analysis["labelled"] and analysis["warnings"] == []
    bissl, control = (analysis["comparisons"][a]["after"]["mae"] for a in ("bissl", "pretext_only"))
    assert bissl["mean_diff"] == pytest.approx(-0.55) and "bissl is better than conventional" in bissl["verdict"]
    assert "pretext_only is worse than conventional" in control["verdict"]
    assert bissl["p_holm"] >= bissl["p_value"] and "Holm-adjusted p" in bissl["verdict"]
    assert "test MAE (px) ↓" in report and "test R² ↑" in report and "| bissl | 0.01 | 0.0001 | 1.55 ± 0.05" in report
    assert "n/a: no frozen-backbone scores were recorded" in report
    assert "`pretext_only`: control:" in report and "top-1" not in report
    assert (tmp_path / "headline.png").stat().st_size > 1000 and (tmp_path / "curves.png").is_file()


def test_finetuning_below_the_linear_probe_is_flagged(tmp_path):
    top1 = {a["name"]: [{"top1": v, "mean_per_class": v, "loss": 0.3} for v in (0.90, 0.91, 0.92)] for a in ARMS}
    frozen = {a: [{"knn_test": 0.9, "linear_probe_test": p} for p in probes]
              for a, probes in (("conventional", (0.95, 0.95, 0.95)), ("bissl", (0.80, 0.81, 0.79)),
                                ("pretext_only", (0.85, 0.85, 0.86)))}  # fmt: skip
    cfg, results = _study(tmp_path, "classification", top1, frozen)
    analysis = analyse(cfg, results["runs"])["t"]
    assert [w.split(":")[0] for w in analysis["warnings"]] == ["t/conventional"]
    before = analysis["comparisons"]["bissl"]["before"]["linear_probe_test"]
    assert before["mean_diff"] == pytest.approx(-0.15) and before["p_value"] < 0.05
    assert analysis["arms"]["pretext_only"]["kind"] == "control" and analysis["arms"]["bissl"]["kind"] == "bissl"


def test_a_null_prints_its_minimum_detectable_effect_and_wilcoxon(tmp_path):
    top1 = {
        "conventional": [0.90, 0.92, 0.91],
        "bissl": [0.92, 0.91, 0.93],  # differences +.02, -.01, +.02: sd sqrt(3e-4), not significant
        "pretext_only": [0.91, 0.93, 0.92],  # +0.01 on every seed: sd 0, no MDE
    }
    values = {a: [{"top1": v, "mean_per_class": v, "loss": 0.3} for v in vs] for a, vs in top1.items()}
    cfg, results = _study(tmp_path, "classification", values)
    report = write_report(cfg, results).read_text()
    bissl = results["analysis"]["t"]["comparisons"]["bissl"]["after"]["top1"]
    mde = minimum_detectable_effect(math.sqrt(3e-4), 3) * 100  # in points
    assert bissl["p_holm"] >= 0.05 and bissl["mde"] * 100 == pytest.approx(mde)
    assert f"(MDE ±{mde:.2f})" in report and f"would detect ±{mde:.2f} with 80 % power" in bissl["verdict"]
    assert "p (Wilcoxon)" in report and f"| {bissl['wilcoxon_p']:.3g} |" in report
    assert f"{bissl['d_z']:+.2f} [{bissl['d_z_ci'][0]:+.2f}, {bissl['d_z_ci'][1]:+.2f}]" in report


def test_holm_runs_over_arms_and_tasks_before_and_after_finetuning(tmp_path):
    """Each question (a frozen score before fine-tuning, or the headline after) is one family over every arm and
    task: its p-values are Holm-adjusted together, and every verdict, before fine-tuning too, reads the adjusted p."""
    top1 = {
        "conventional": [0.90, 0.92, 0.91],
        "bissl": [0.93, 0.94, 0.95],
        "pretext_only": [0.90, 0.93, 0.91],
    }
    probes = {"conventional": (0.80, 0.82, 0.81), "bissl": (0.86, 0.87, 0.89), "pretext_only": (0.81, 0.82, 0.82)}
    values = {a: [{"top1": v, "mean_per_class": v, "loss": 0.3} for v in vs] for a, vs in top1.items()}
    frozen = {a: [{"knn_test": p - 0.01, "linear_probe_test": p} for p in ps] for a, ps in probes.items()}
    cfg, results = _study(tmp_path, "classification", values, frozen, names=("t", "u"))
    report = write_report(cfg, results).read_text()
    analysis = results["analysis"]
    for stage, key in (("before", "linear_probe_test"), ("before", "knn_test"), ("after", "top1")):
        family = [analysis[t]["comparisons"][a][stage][key] for t in ("t", "u") for a in ("bissl", "pretext_only")]
        assert [c["p_holm"] for c in family] == pytest.approx(holm([c["p_value"] for c in family]))
        assert all("Holm-adjusted p" in c["verdict"] for c in family)
    probe = analysis["t"]["comparisons"]["bissl"]["before"]["linear_probe_test"]
    assert probe["p_holm"] > probe["p_value"]  # four tests in the family, not the two arms of one task
    assert report.count("before fine-tuning: bissl") == 4 and report.count("after fine-tuning: bissl") == 2
    assert f"| {probe['p_holm']:.3g} |" in report and "p (Holm)" in report.split("**After fine-tuning**")[0]


def test_a_finetune_below_its_probe_within_selection_noise_says_so_with_the_measurements(tmp_path):
    """Selected on validation above its probe, below it on test by a non-significant gap: the warning says it is
    selection noise and gives the numbers, instead of calling the baseline broken."""
    top1 = {a["name"]: [{"top1": v, "mean_per_class": v, "loss": 0.3} for v in (0.90, 0.93, 0.91)] for a in ARMS}
    probes = (0.92, 0.91, 0.92)  # test gap -0.01 +0.02 -0.01: mean -0.0033, not significant
    frozen = {a["name"]: [{"knn_test": 0.9, "linear_probe_test": p, "linear_probe_val": 0.92} for p in probes]
              for a in ARMS}  # fmt: skip
    cfg, results = _study(tmp_path, "classification", top1, frozen)
    for run in results["runs"]:
        run["metrics"]["val_top1"] = 0.94  # the selected checkpoint, above the probe's 0.92 on validation
    warnings = analyse(cfg, results["runs"])["t"]["warnings"]
    assert [w.split(":")[0] for w in warnings] == ["t/conventional", "t/bissl", "t/pretext_only"]  # same numbers
    assert warnings[0].startswith("t/conventional: fine-tuned test top-1 91.33 % is below")
    assert "paired over seeds -0.33, p = " in warnings[0] and "(94.00 vs 92.00 %)" in warnings[0]
    assert "selection on this validation split cannot resolve" in warnings[0] and "suspect" not in warnings[0]


def test_a_comparison_with_nothing_to_test_does_not_count_in_its_holm_family(tmp_path):
    """The probe arm starts from the baseline's backbone: its frozen scores equal the baseline's on every seed, no
    test is made, and Holm counts only the real tests of the family."""
    arms = [*ARMS, {"name": "probe", "kind": "probe"}]
    probes = {"conventional": (0.80, 0.82, 0.81), "bissl": (0.86, 0.87, 0.89), "pretext_only": (0.81, 0.82, 0.82)}
    probes["probe"] = probes["conventional"]
    values = {a: [{"top1": v, "mean_per_class": v, "loss": 0.3} for v in (0.9, 0.91, 0.92)] for a in probes}
    frozen = {a: [{"knn_test": p - 0.01, "linear_probe_test": p} for p in ps] for a, ps in probes.items()}
    cfg, results = _study(tmp_path, "classification", values, frozen)
    cfg = cfg.model_copy(update={"arms": PipelineConfig(arms=arms).arms})
    comparisons = analyse(cfg, results["runs"])["t"]["comparisons"]
    family = [comparisons[a]["before"]["linear_probe_test"] for a in ("bissl", "pretext_only")]
    assert [c["p_holm"] for c in family] == pytest.approx(holm([c["p_value"] for c in family]))  # 2 tests, not 3
    assert "p_holm" not in comparisons["probe"]["before"]["linear_probe_test"]
    assert "do not differ significantly: +0.00" in comparisons["probe"]["before"]["linear_probe_test"]["verdict"]
