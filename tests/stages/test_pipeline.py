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
TASK = "digits_5shot"


ARMS = {"conventional", "bissl", "pretext_only"}


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
    assert {r["arm"] for r in results["runs"]} == ARMS
    assert sorted({r["seed"] for r in results["runs"]}) == [0, 1]
    assert all(r["align_dir"] for r in results["runs"] if r["arm"] == "bissl")
    assert all(math.isfinite(x) for x in _numbers(results["runs"]))
    assert all(math.isfinite(x) for x in _numbers(results["analysis"]))
    assert results["environment"]["torch"] and min(results["stage_wall_time_s"].values()) > 0
    assert set(results["stage_wall_time_s"]) == {"pretrain/seed0", "pretrain/seed1"}
    for r in results["runs"]:  # a replicate: its own pretraining run and few-shot draw
        assert r["pretrained"] == str(quick_study / "pretrain" / f"seed{r['seed']}") and r["few_shot_seed"] == r["seed"]
    analysis = results["analysis"][TASK]
    comparison = analysis["comparisons"]["bissl"]["after"]["top1"]
    assert comparison["ci_low"] <= comparison["mean_diff"] <= comparison["ci_high"]
    assert all(0 <= r["frozen"]["linear_probe_test"] <= 1 and "knn_test" in r["frozen"] for r in results["runs"])
    searched = results["search"][TASK]
    assert set(searched) == ARMS and all(len(s["trials"]) == 2 for s in searched.values())
    candidates = {tuple(sorted(t["params"].items())) for s in searched.values() for t in s["trials"]}
    assert len(candidates) == 2 * len(ARMS)  # each arm's sampler has its own seed
    for r in results["runs"]:  # every seed fine-tunes with its arm's best setting
        assert r["optim"] == pytest.approx(searched[r["arm"]]["best_params"])

    report = (quick_study / "report.md").read_text()
    for heading in ("# BiSSL study report", "Replicates: 2", "## Verdicts", "**Before fine-tuning**", "**After"):
        assert heading in report
    row = re.search(r"\| bissl \| [\d.e-]+ \| [\d.e-]+ \| ([\d.]+) ± ([\d.]+) \|", report)
    assert row and all(math.isfinite(float(x)) for x in row.groups())
    assert "nan" not in report.lower()
    for png in ("headline.png", "curves.png", f"alignment_{TASK}.png"):
        assert (quick_study / png).stat().st_size > 1000, png


def test_rerun_resumes_from_finished_stages(quick_study, capsys):
    before = (quick_study / TASK / "bissl" / "seed0" / "align" / "summary.json").stat().st_mtime_ns
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST]) == 0
    after = (quick_study / TASK / "bissl" / "seed0" / "align" / "summary.json").stat().st_mtime_ns
    assert before == after  # reused, not re-run
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "diff"),
    [("evaluate.knn_k=5", "knn_k: 20 -> 5"), ("finetune.epochs=4", "epochs: 3 -> 4"), ("align.bilevel.lam=0.5", "lam")],
)
def test_changed_config_is_refused_and_leaves_the_study_as_it_was(quick_study, capsys, override, diff):
    files = {name: (quick_study / name).read_bytes() for name in ("config.yaml", "results.json", "report.md")}
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST, override]) == 2
    err = capsys.readouterr().err
    assert "another config" in err and diff in err and err.count("\n") == 1
    assert files == {name: (quick_study / name).read_bytes() for name in files}  # config.yaml still matches them


def test_interrupted_stage_resumes_and_corruption_is_named(quick_study, capsys):
    finetune_dir = quick_study / TASK / "conventional" / "seed1" / "finetune"
    (finetune_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST]) == 0
    assert (finetune_dir / "summary.json").is_file()
    (finetune_dir / "summary.json").unlink()
    (finetune_dir / "checkpoints" / "last.pt").write_bytes(b"\0garbage")
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST]) == 2
    assert "last.pt is corrupted" in capsys.readouterr().err
