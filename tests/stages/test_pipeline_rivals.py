"""The rival arms (tapt, multitask, penalty, probe) in one `bissl pipeline --quick` study, with compute columns."""

from __future__ import annotations

import json
import math

import pytest

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
