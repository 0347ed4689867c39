"""`bissl pipeline --quick` end to end: report structure, finite numbers, resume, changed config, corruption."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from bissl.cli import main
from helpers.stages import FAST

# --quick, made smaller still for CI (every number of the preset is kept but the per-cycle step counts).
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


@pytest.mark.e2e
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
    assert all(r["knn_k"] == 5 for r in results["runs"])  # 5-shot: k = 20 capped by the class size
    searched = results["search"][TASK]
    assert set(searched) == ARMS and all(len(s["trials"]) == 2 for s in searched.values())
    candidates = {tuple(sorted(t["params"].items())) for s in searched.values() for t in s["trials"]}
    assert len(candidates) == 2 * len(ARMS)  # each arm's sampler has its own seed
    for r in results["runs"]:  # every seed fine-tunes with its arm's best setting
        assert r["optim"] == pytest.approx(searched[r["arm"]]["best_params"])

    report = (quick_study / "report.md").read_text()
    for heading in ("# BiSSL study report", "Replicates: 2", "## Verdicts", "**Before fine-tuning**", "**After"):
        assert heading in report
    assert "kNN (k = 5: `evaluate.knn_k` = 20 capped by the training split's mean class size)" in report
    row = re.search(r"\| bissl \| [\d.e-]+ \| [\d.e-]+ \| ([\d.]+) ± ([\d.]+) \|", report)
    assert row and all(math.isfinite(float(x)) for x in row.groups())
    assert "nan" not in report.lower()
    for png in ("headline.png", "curves.png", f"alignment_{TASK}.png"):
        assert (quick_study / png).stat().st_size > 1000, png


def _search_times(study):
    searched = json.loads((study / "results.json").read_text())["search"][TASK]
    return {arm: s["wall_time_s"] for arm, s in searched.items()}


def test_rerun_resumes_from_finished_stages(quick_study, capsys):
    before = (quick_study / TASK / "bissl" / "seed0" / "align" / "summary.json").stat().st_mtime_ns
    searched = _search_times(quick_study)
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST]) == 0
    after = (quick_study / TASK / "bissl" / "seed0" / "align" / "summary.json").stat().st_mtime_ns
    assert before == after  # reused, not re-run
    assert "report:" in capsys.readouterr().out
    assert _search_times(quick_study) == searched and min(searched.values()) > 0.1  # #20 item 16: carried over


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


@pytest.mark.e2e
def test_interrupted_stage_resumes_and_corruption_is_named(quick_study, capsys):
    finetune_dir = quick_study / TASK / "conventional" / "seed1" / "finetune"
    (finetune_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST]) == 0
    assert (finetune_dir / "summary.json").is_file()
    (finetune_dir / "summary.json").unlink()
    (finetune_dir / "checkpoints" / "last.pt").write_bytes(b"\0garbage")
    assert main(["pipeline", "--quick", "--out-dir", str(quick_study), *FAST]) == 2
    assert "last.pt is corrupted" in capsys.readouterr().err


def test_a_task_not_scored_on_class_labels_is_scored_before_fine_tuning_by_its_own_head(
    tmp_path, tiny_pretrained, capsys
):
    # parity + magnitude of digits: kNN / probe on the 10 digit classes would not measure it
    parity = str(Path(__file__).resolve().parents[2] / "examples" / "parity_task.py")
    tasks = ("[{name: parity, downstream: {task: example_parity, data: {name: digits, image_size: 8}, few_shot: 5}, "
             "finetune: {batch_size: 10}}]")  # fmt: skip
    args = [
        "pipeline", "--plugin", parity, "--out-dir", str(tmp_path), f"pretrained={tiny_pretrained}", "seeds=[0, 1]",
        "arms=[{name: conventional}, {name: bissl, bissl: true}]", f"tasks={tasks}", "search.trials=0",
        "finetune.epochs=1", "finetune.head_warmup_epochs=1", "evaluate.linear_probe_epochs=2", "embedding=false",
        "align.pretext_data.image_size=8", "align.lower.batch_size=64", "align.upper.batch_size=10",
        "align.bilevel.cycles=1", "align.bilevel.n_lower=1", "align.bilevel.n_upper=1",
        "align.bilevel.head_warmup_epochs=1", *(f"{s}.log.{k}=false" for s in ("align", "finetune")
                                                for k in ("progress", "tensorboard")),
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    keys = {f"head_probe_{split}_{m}" for split in ("val", "test") for m in ("magnitude_mae", "parity_acc")}
    assert all(set(r["frozen"]) == keys and r["knn_k"] is None for r in results["runs"])
    analysis = results["analysis"]["parity"]
    assert analysis["head_probe"] and not analysis["labelled"]
    assert analysis["comparisons"]["bissl"]["before"]["head_probe_test_magnitude_mae"]["n"] == 2
    report = (tmp_path / "report.md").read_text()
    before = report.split("**Before fine-tuning**")[1].split("**After fine-tuning**")[0]
    assert "the task's own head trained on it (2 epochs" in before
    assert "| arm | head probe magnitude MAE ↓ | head probe parity accuracy (%) ↑ |" in before
    assert "kNN" not in report and "linear probe" not in report


@pytest.mark.e2e
def test_until_pretrain_runs_only_the_pretraining(quick_study, tmp_path, capsys):
    """#20 item 13: `--until pretrain` pretrains (or reuses the pretraining of a study) and stops there."""
    out = tmp_path / "premise"
    assert main(["pipeline", "--quick", "--until", "pretrain", "--out-dir", str(out), *FAST]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "pretrain"]
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == ["seed0", "seed1"]  # one per replicate
    assert all((out / "pretrain" / s / "summary.json").is_file() for s in ("seed0", "seed1"))
    assert "without --until" in capsys.readouterr().out
    summaries = [quick_study / "pretrain" / s / "summary.json" for s in ("seed0", "seed1")]
    files = {p: p.read_bytes() for p in (*summaries, quick_study / "results.json", quick_study / "report.md")}
    assert main(["pipeline", "--quick", "--until", "pretrain", "--out-dir", str(quick_study), *FAST]) == 0
    assert files == {p: p.read_bytes() for p in files}  # reused as it was, nothing re-run or rewritten


@pytest.mark.e2e
def test_positive_control_study_runs_quick(tmp_path):
    """The positive control (digits, half mirrored, label "mirrored?"; pretext views flipped at random) runs its
    --quick preset with the measured settings (25 shots; upper lr 0.05, lam 1: phi learns the factor and theta follows);
    its report gives every arm's frozen scores and the Wilcoxon p of its comparisons."""
    out = tmp_path / "pc"
    assert main(["pipeline", "--config", "pipeline_positive_control", "--quick", "--out-dir", str(out), *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    for side in ("pretrain", "align"):
        assert results["config"][side]["pretext"]["augmentation_params"]["flip_p"] == 0.5
    align = results["config"]["align"]
    assert align["upper"]["optim"]["lr"] == 0.05 and align["bilevel"]["lam"] == 1
    runs = results["runs"]
    assert {r["arm"] for r in runs} == ARMS and all(r["task"] == "mirror_25shot" for r in runs)
    assert all(0 <= r["frozen"]["knn_test"] <= 1 for r in runs)
    report = (out / "report.md").read_text()
    assert "## mirror_25shot" in report and "p (Wilcoxon)" in report and "nan" not in report.lower()


@pytest.mark.e2e
def test_overwrite_runs_a_finished_study_afresh_and_keeps_other_files(quick_study, capsys):
    """``--overwrite`` is honoured on a finished (here also changed and corrupted) study: every stage runs again."""
    align_summary = quick_study / TASK / "bissl" / "seed0" / "align" / "summary.json"
    before = align_summary.stat().st_mtime_ns
    (quick_study / TASK / "conventional" / "seed1" / "finetune" / "checkpoints" / "last.pt").write_bytes(b"\0garbage")
    (quick_study / "notes.txt").write_text("the user's own file")
    assert main(["pipeline", "--quick", "--overwrite", "--out-dir", str(quick_study), *FAST, "finetune.epochs=4"]) == 0
    assert align_summary.stat().st_mtime_ns != before
    runs = json.loads((quick_study / "results.json").read_text())["runs"]
    assert all(json.loads((quick_study / TASK / r["arm"] / f"seed{r['seed']}" / "finetune" / "summary.json")
               .read_text())["epochs"] == 4 for r in runs)  # fmt: skip
    assert (quick_study / "notes.txt").read_text() == "the user's own file"
    capsys.readouterr()


def test_task_settings_are_checked_before_pretraining(tmp_path, capsys):
    task = "tasks=[{name: t, downstream: {data: {name: digits}, few_shot: 1}, finetune: {batch_size: 64}}]"
    assert main(["pipeline", "--quick", "--out-dir", str(tmp_path), *FAST, task]) == 2
    err = capsys.readouterr().err
    assert "fewer than one batch of 64; lower task t: finetune.batch_size" in err and err.count("\n") == 1
    assert not (tmp_path / "pretrain").exists()


def test_a_rerun_removes_the_temporary_files_a_kill_left_in_the_study_folder(tmp_path, capsys):
    torn = tmp_path / ".headline.png.ab12cd34.tmp"  # a kill while the report was written
    torn.write_bytes(b"half a png")
    os.utime(torn, (0, 0))
    task = "tasks=[{name: t, downstream: {data: {name: digits}, few_shot: 1}, finetune: {batch_size: 64}}]"
    assert main(["pipeline", "--quick", "--out-dir", str(tmp_path), *FAST, task]) == 2  # stops before any stage
    assert not torn.exists()
    capsys.readouterr()


def test_a_changed_search_is_named_in_study_terms(monkeypatch):
    """The search's own fix names hpo.study_name, which a study has not: name the study's fix instead."""
    import importlib

    from bissl.config import PipelineConfig, load_config
    from bissl.stages.hpo import SearchChanged
    from bissl.utils.errors import ConfigError

    study = importlib.import_module("bissl.pipeline.study")

    def changed(*args, **kwargs):
        raise SearchChanged("study 'finetune' in sqlite:///x was run with another config (epochs: 3 -> 4)", "epochs")

    monkeypatch.setattr(study, "search", changed)
    cfg = load_config(PipelineConfig, "pipeline_digits", ["search.trials=2"])
    message = r"search in .*search was run with another config \(epochs\); restore it, or pass --overwrite to run"
    with pytest.raises(ConfigError, match=message):
        study.search_settings(cfg, cfg.tasks[0], cfg.arms[0], Path("backbone.pt"))
