"""The rival arms (tapt, multitask, penalty, probe) in one `bissl pipeline --quick` study, with compute columns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from bissl.cli import main
from helpers.stages import FAST

RIVALS = ["tapt", "multitask", "penalty", "probe"]
TINY = [*FAST, "arms=[{name: conventional}, {name: bissl, kind: bissl}, {name: tapt, kind: tapt}, "
        "{name: multitask, kind: multitask}, {name: penalty, kind: penalty}, {name: probe, kind: probe}]",
        "search.trials=0", "embedding=false"]  # fmt: skip


@pytest.mark.e2e
def test_rival_arms_run_at_equal_compute_and_report_it(tmp_path):
    assert main(["pipeline", "--config", "pipeline_rivals_digits", "--quick", "--out-dir", str(tmp_path), *TINY]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in results["runs"]}
    assert {arm for arm, _ in runs} == {"conventional", "bissl", *RIVALS}
    for seed in (0, 1):
        bissl = runs["bissl", seed]["compute"]["align"]
        assert bissl["hvp"] > 0 and bissl["backward"] > 0
        spent = bissl["backward"] + bissl["hvp"]
        for arm in ("tapt", "multitask", "penalty"):
            rival = runs[arm, seed]["compute"]["align"]
            assert rival["hvp"] == 0 and abs(rival["backward"] - spent) <= 0.5 * spent, (arm, rival, spent)
            assert runs[arm, seed]["compute"]["finetune"]["backward"] > 0
        probe = runs["probe", seed]
        assert probe["metrics"]["test_top1"] == probe["frozen"]["linear_probe_test"]
        assert probe["compute"]["probe"]["backward"] == 0 and "finetune" not in probe["compute"]
    assert all(math.isfinite(r["metrics"]["test_top1"]) for r in results["runs"])
    report = (tmp_path / "report.md").read_text()
    assert "**Compute** per seed" in report and "| penalty | align |" in report and "| probe | probe |" in report
    assert "Equal compute" in report and "nan" not in report.lower()


@pytest.mark.e2e
def test_a_multitask_arms_w_is_searched_and_every_replicate_aligns_with_the_best(tmp_path):
    arms = "arms=[{name: bissl, kind: bissl}, {name: multitask, kind: multitask}]"
    overrides = [*FAST, arms, "baseline=bissl", "search.trials=2", "search.multitask_weight_range=[0.2, 5]"]
    assert main(["pipeline", "--config", "pipeline_rivals_digits", "--quick", "--out-dir", str(tmp_path), *overrides,
                 "embedding=false", "finetune.epochs=2"]) == 0  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    (task,) = results["search"]
    searched = results["search"][task]["multitask"]
    weights = [t["params"]["multitask_weight"] for t in searched["trials"]]
    assert len(set(weights)) == 2 and all(0.2 <= w <= 5 for w in weights)
    best = searched["best_start"]["multitask_weight"]
    assert best in weights and "multitask_weight" not in searched["best_params"]
    assert "multitask_weight" not in results["search"][task]["bissl"]["best_params"]  # only the multitask arm's
    replicate = yaml.safe_load((tmp_path / task / "multitask" / "seed0" / "align" / "config.yaml").read_text())
    for trial, weight in zip(
        sorted((tmp_path / task / "multitask" / "search" / "trials").iterdir()), weights, strict=True
    ):
        record = yaml.safe_load((trial / "align" / "config.yaml").read_text())
        assert record["bilevel"]["multitask_weight"] == weight and record["seed"] == 0  # the first replicate's
        assert record["bilevel"]["cycles"] == replicate["bilevel"]["cycles"]  # at the arm's equal compute
        assert yaml.safe_load((trial / "finetune" / "config.yaml").read_text())["backbone"] == str(trial / "align")
    for run in (r for r in results["runs"] if r["arm"] == "multitask"):
        record = yaml.safe_load((Path(run["align_dir"]) / "config.yaml").read_text())
        assert record["bilevel"]["multitask_weight"] == best == run["optim"]["multitask_weight"]
        assert {k: run["optim"][k] for k in ("lr", "weight_decay")} == pytest.approx(searched["best_params"])
    report = (tmp_path / "report.md").read_text()
    assert "| multitask w |" in report and f"| {best:.3g} |" in report and "[0.2, 5.0]" in report
