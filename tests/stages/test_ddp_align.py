"""``bissl align`` on two gloo processes (CPU, loopback) against one process on the whole batches.

Both sides use ``distributed.sync_batchnorm`` and ``distributed.augment_shards=2``, so the two ranks together see
the views, BatchNorm statistics and SimCLR negatives of the single process; the bilevel cycles (lower steps,
Hessian-vector products, CG / M-FAC solves, upper steps), the head warm-up and the final evaluation must then give
the same weights and metrics up to float rounding. The two-process runs are spawned once per module (fresh
processes); one more run goes through ``torchrun ... -m bissl.cli align`` as users do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bissl.config import AlignConfig, load_config
from bissl.engine.logger import read_metrics
from bissl.utils.io import load_torch
from helpers.ranks import read_results, run_torchrun, spawn_ranks_json
from helpers.stages import TINY_ALIGN

WORLD = 2
SHARDED = ["distributed.sync_batchnorm=true", "distributed.augment_shards=2"]
RUNS = {"cg": [], "mfac": ["bilevel.solver.name=mfac", "bilevel.solver.mfac_window=3"]}
WEIGHTS = ("backbone.pt", "upper_backbone.pt", "pretext_head.pt", "downstream_head.pt")
TOL = 1e-5


def _cfg(out: Path, pretrained: Path, extra: list[str]) -> AlignConfig:
    overrides = [*TINY_ALIGN, *SHARDED, *extra, f"pretrained={pretrained}", f"out_dir={out}"]
    return load_config(AlignConfig, "align_digits", overrides)


def _run_all(root: Path, pretrained: Path, resumed: bool) -> dict[str, Any]:
    """The runs of ``RUNS`` (and an interrupted + resumed CG run) in ``root``; returns their metrics."""
    from bissl.stages.align import align

    results: dict[str, Any] = {}
    for name, extra in RUNS.items():
        results[name] = align(_cfg(root / name, pretrained, extra)).metrics
    if resumed:
        cfg = _cfg(root / "resumed", pretrained, RUNS["cg"])
        results["interrupted_cycle"] = align(cfg, until_cycle=1).cycle
        results["resumed"] = align(cfg, resume=True).metrics
    return results


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_pretrained) -> Path:
    root = tmp_path_factory.mktemp("ddp_align")
    spawn_ranks_json(_run_all, WORLD, root, tiny_pretrained, True)
    return root


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_pretrained) -> Path:
    root = tmp_path_factory.mktemp("single_align")
    (root / "results.json").write_text(json.dumps(_run_all(root, tiny_pretrained, resumed=False)))
    return root


def _max_weight_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' exported weights (every file of ``WEIGHTS``)."""
    worst = 0.0
    for name in WEIGHTS:
        first, second = load_torch(a / name)["state_dict"], load_torch(b / name)["state_dict"]
        assert first.keys() == second.keys(), name
        for key, value in first.items():
            worst = max(worst, float((value.double() - second[key].double()).abs().max()))
    return worst


def _cycle_records(run: Path) -> list[dict[str, Any]]:
    return read_metrics(run / "metrics.jsonl", "cycle")


@pytest.mark.parametrize("name", list(RUNS))
def test_align_on_two_processes_equals_one_process(ddp, single, name):
    diff = _max_weight_diff(ddp / name, single / name)
    print(f"{name}: max |theta, phi, heads (2 processes) - (1 process)| = {diff:.2e}")
    assert diff < TOL
    assert read_results(ddp, WORLD)[name] == pytest.approx(
        read_results(single, WORLD)[name], abs=TOL
    )  # val/test of theta and phi
    records = [_cycle_records(root / name) for root in (ddp, single)]
    assert [r["step"] for r in records[0]] == [1, 2]
    for got, expected in zip(*records, strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, float) and value == value:  # NaN (mfac's residual) compares unequal
                assert got[key] == pytest.approx(value, abs=TOL), key
    warmups = [read_metrics(root / name / "metrics.jsonl", "head_warmup")[0] for root in (ddp, single)]
    assert warmups[0]["loss"] == pytest.approx(warmups[1]["loss"], abs=TOL)


def test_rank_zero_alone_writes_logs_checkpoints_and_exports(ddp):
    run = ddp / "cg"
    tags = [r["tag"] for r in read_metrics(run / "metrics.jsonl")]
    assert tags == ["head_warmup", "cycle", "cycle", "final"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert not list(run.rglob("*.tmp"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == WORLD and summary["cycles"] == 2


def test_resume_under_ddp_equals_the_uninterrupted_run(ddp):
    assert read_results(ddp, WORLD)["interrupted_cycle"] == 1
    assert _max_weight_diff(ddp / "resumed", ddp / "cg") == 0.0
    assert _cycle_records(ddp / "resumed") == _cycle_records(ddp / "cg")
    assert read_results(ddp, WORLD)["resumed"] == read_results(ddp, WORLD)["cg"]


def test_torchrun_cli_align_equals_one_process(tmp_path, single, tiny_pretrained):
    out = tmp_path / "cli"
    args = ["-m", "bissl.cli", "align", *TINY_ALIGN, *SHARDED, f"pretrained={tiny_pretrained}", "--out-dir", str(out)]
    done = run_torchrun(WORLD, args)
    # the result lines come from rank 0 only, though torchrun shows every rank's console here
    assert done.stdout.count(f"aligned backbone (theta): {out / 'backbone.pt'}") == 1
    assert _max_weight_diff(out, single / "cg") < TOL


def test_pipeline_under_torchrun_refuses_with_the_fix(monkeypatch, capsys):
    from bissl.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pipeline", "--quick"]) == 2
    error = capsys.readouterr().err
    assert "bissl pipeline runs as a single process" in error and "separately under torchrun" in error
    assert error.count("\n") == 1
