"""A study's replicates: each pretrains with its own seed unless told to share one run or pinned to one."""

from __future__ import annotations

from pathlib import Path

import pytest

from bissl.config import PipelineConfig
from bissl.pipeline import study
from bissl.pipeline.report import replicate_lines

TASKS = [{"name": "t", "downstream": {"few_shot": 5}}]


@pytest.fixture
def pretrain_calls(monkeypatch) -> list[int]:
    """The seeds the study pretrains with (``run_stage`` recorded, nothing run)."""
    calls: list[int] = []

    def fake_run_stage(cfg, runner, label):
        calls.append(cfg.seed)
        return {"backbone": str(Path(cfg.out_dir) / "backbone.pt"), "wall_time_s": 1.0}

    monkeypatch.setattr(study, "run_stage", fake_run_stage)
    return calls


def test_each_replicate_pretrains_and_draws_with_its_own_seed(tmp_path, pretrain_calls):
    cfg = PipelineConfig(out_dir=str(tmp_path), seeds=[0, 1, 2], tasks=TASKS)
    times: dict[str, float] = {}
    assert study.pretrain_runs(cfg, times) == {s: tmp_path / "pretrain" / f"seed{s}" for s in (0, 1, 2)}
    assert pretrain_calls == [0, 1, 2] and set(times) == {"pretrain/seed0", "pretrain/seed1", "pretrain/seed2"}
    assert [cfg.few_shot_seed(s) for s in cfg.seeds] == [0, 1, 2]
    text = " ".join(replicate_lines(cfg))
    assert "Replicates: 3" in text and "pretraining run" in text and "few-shot training images (t)" in text
    assert "outside the statistics" not in text


def test_replicates_share_one_pretraining_and_draw_when_told(tmp_path, pretrain_calls):
    cfg = PipelineConfig(out_dir=str(tmp_path), seeds=[0, 1, 2], tasks=TASKS, pretrain={"seed": 7},
                         replicate={"pretrain": False, "few_shot": False})  # fmt: skip
    assert study.pretrain_runs(cfg, {}) == dict.fromkeys((0, 1, 2), tmp_path / "pretrain" / "seed7")
    assert pretrain_calls == [7] and cfg.few_shot_seed(1) is None
    text = " ".join(replicate_lines(cfg))
    assert "outside the statistics: pretraining (one run, seed 7" in text and "few-shot training images (one" in text


def test_a_pinned_pretraining_is_used_by_every_replicate_and_said(tmp_path, pretrain_calls):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "backbone.pt").write_bytes(b"")
    cfg = PipelineConfig(out_dir=str(tmp_path / "study"), seeds=[0, 1], tasks=TASKS, pretrained=str(tmp_path / "mine"))
    assert study.pretrain_runs(cfg, {}) == dict.fromkeys((0, 1), tmp_path / "mine") and pretrain_calls == []
    assert "pinned: every replicate starts from" in " ".join(replicate_lines(cfg))
