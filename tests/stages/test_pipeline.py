"""`bissl pipeline --quick` end to end: report structure, finite numbers, resume, changed config, corruption."""

from __future__ import annotations

import json
import math
import re

import pytest

from bissl.cli import main

# --quick, made smaller still for CI (every number of the preset is kept but the per-cycle step counts).
FAST = [
    "pretrain.data.batch_size=128",
    "pretrain.backbone.kwargs.width=8",
    "align.bilevel.n_lower=4",
    "align.bilevel.n_upper=2",
    "pretrain.log.progress=false",
    "align.log.progress=false",
    "finetune.log.progress=false",
    "pretrain.log.tensorboard=false",
    "align.log.tensorboard=false",
    "finetune.log.tensorboard=false",
]


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, int | float):
        yield float(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _numbers(value)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert main(["pipeline", "--quick", "--out-dir", str(out), *FAST]) == 0
    return out


def test_quick_pipeline_writes_a_complete_report(quick_study, capsys):
    results = json.loads((quick_study / "results.json").read_text())
    assert {r["arm"] for r in results["runs"]} == {"conventional", "bissl"}
    assert sorted({r["seed"] for r in results["runs"]}) == [0, 1]
    assert all(r["align_dir"] for r in results["runs"] if r["arm"] == "bissl")
    assert all(math.isfinite(x) for x in _numbers(results["runs"]))
    assert all(math.isfinite(x) for x in _numbers(results["analysis"]))
    assert results["environment"]["torch"] and results["stage_wall_time_s"]["pretrain"] > 0
    comparison = results["analysis"]["digits"]["comparisons"]["bissl"]["test_top1"]
    assert comparison["ci_low"] <= comparison["mean_diff"] <= comparison["ci_high"]

    report = (quick_study / "report.md").read_text()
    for heading in ("# BiSSL study report", "## Test accuracy", "## Paired differences", "## Did BiSSL help"):
        assert heading in report
    row = re.search(r"\| digits \| bissl \| ([\d.]+) ± ([\d.]+) \|", report)
    assert row and all(math.isfinite(float(x)) for x in row.groups())
    assert "nan" not in report.lower()
    for png in ("accuracy.png", "curves.png", "alignment_digits.png"):
        assert (quick_study / png).stat().st_size > 1000, png


def test_rerun_resumes_from_finished_stages(quick_study, capsys):
    before = (quick_study / "digits" / "bissl" / "seed0" / "align" / "summary.json").stat().st_mtime_ns
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST]) == 0
    after = (quick_study / "digits" / "bissl" / "seed0" / "align" / "summary.json").stat().st_mtime_ns
    assert before == after  # reused, not re-run
    assert "report:" in capsys.readouterr().out


def test_changed_config_is_not_mixed_with_old_results(quick_study, capsys):
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST, "finetune.optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "another config (optim.lr: 0.02 -> 0.5)" in err and err.count("\n") == 1


def test_interrupted_stage_resumes_and_corruption_is_named(quick_study, capsys):
    finetune_dir = quick_study / "digits" / "conventional" / "seed1" / "finetune"
    (finetune_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST]) == 0
    assert (finetune_dir / "summary.json").is_file()
    (finetune_dir / "summary.json").unlink()
    (finetune_dir / "checkpoints" / "last.pt").write_bytes(b"\0garbage")
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST]) == 2
    assert "last.pt is corrupted" in capsys.readouterr().err
