"""Every stage with downstream.task=detection, through the CLI in quick sizes, on the synthetic detection data."""

from __future__ import annotations

import json

import pytest

from bissl.cli import main

pytestmark = pytest.mark.e2e

FAST = ["log.progress=false", "log.tensorboard=false"]
SMALL = ["downstream.data.image_size=32", "downstream.params.min_size=32", "downstream.params.max_size=32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("det_pretrain")
    argv = ["pretrain", "--out-dir", str(out), "epochs=1", "data.name=synthetic_detection", "data.image_size=32",
            "data.batch_size=64", "backbone.kwargs.width=4", "optim.warmup_epochs=0",
            *FAST]  # fmt: skip
    assert main(argv) == 0
    return out


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_cli_finetune_detection(pretrained, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune", "--config", "finetune_detection_synthetic", "--backbone", str(pretrained), "--out-dir",
            str(out), "epochs=1", "eval_every_epochs=1", "optim.warmup_epochs=0", *SMALL, *FAST]  # fmt: skip
    assert main(argv) == 0
    metrics = _summary(out)["metrics"]
    assert {"test_ap50_voc07", "test_map", "test_map_75", "val_ap50_voc07"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in ("test_ap50_voc07", "test_map", "test_map_75"))
    compute = _summary(out)["compute"]  # the detector reads the backbone's feature maps: counted as its passes
    assert compute["forward"] > compute["backward"] > 0 and compute["images"] > 0


def test_cli_align_detection(pretrained, tmp_path):
    out = tmp_path / "align"
    argv = ["align", "--config", "align_detection_synthetic", "--out-dir", str(out), f"pretrained={pretrained}",
            "pretext_data.image_size=32", "bilevel.cycles=1", "bilevel.n_lower=2", "bilevel.n_upper=2",
            "bilevel.head_warmup_epochs=1", "lower.batch_size=16", *SMALL, *FAST]  # fmt: skip
    assert main(argv) == 0
    summary = _summary(out)
    assert {"theta_test_ap50_voc07", "phi_test_map"} <= set(summary["metrics"])
    assert (out / "backbone.pt").is_file() and (out / "downstream_head.pt").is_file()
    compute = summary["compute"]  # 2 lower steps x 2 views, 2 upper steps on phi and theta (feature maps), HVPs
    assert compute["backward"] >= 2 * 2 + 2 * 2 and compute["hvp"] > 0


def test_cli_evaluate_detection_trains_the_task_head_on_the_frozen_backbone(pretrained, tmp_path):
    out = tmp_path / "eval"
    argv = ["evaluate", "--backbone", str(pretrained), "--out-dir", str(out), "downstream.task=detection",
            "downstream.data.name=synthetic_detection", "downstream.data.batch_size=8", "linear_probe_epochs=1",
            "linear_probe_lr=0.02", *SMALL, *FAST]  # fmt: skip
    assert main(argv) == 0
    metrics = _summary(out)["metrics"]
    assert {"head_probe_val_ap50_voc07", "head_probe_test_map"} <= set(metrics)
    assert not any(k.startswith("knn") for k in metrics)


def test_cli_quick_pipeline_reports_a_detection_task_beside_a_classification_task(tmp_path):
    out = tmp_path / "study"
    tasks = (
        "tasks=[{name: digits, downstream: {task: classification, data: {name: digits, image_size: 8}}, "
        "finetune: {batch_size: 32}, align: {upper: {batch_size: 32}}}, "
        "{name: boxes, downstream: {task: detection, data: {name: fake_detection_gray, image_size: 32, batch_size: 8}, "
        "params: {min_size: 32, max_size: 32}}, finetune: {batch_size: 8}, align: {upper: {batch_size: 8}}}]"
    )
    argv = ["pipeline", "--quick", "--out-dir", str(out), tasks, "pretrain.data.name=digits",
            "pretrain.data.image_size=8", "pretrain.data.batch_size=128", "pretrain.backbone.kwargs.width=4",
            "pretrain.pretext.augmentation_params={flip_p: 0.0}", "align.pretext_data.name=digits",
            "align.pretext_data.image_size=8", "align.lower.batch_size=32", "pretrain.log.progress=false",
            "evaluate.linear_probe_epochs=5"]  # fmt: skip
    assert main(["pipeline", "--config", "pipeline_detection_synthetic", *argv[1:]]) == 0
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert "AP50 (VOC07)" in report and "top-1" in report and "head probe AP50 (VOC07)" in report
    runs = {(r["task"], r["arm"]): r for r in results["runs"]}
    arms = ("conventional", "bissl", "pretext_only")
    assert set(runs) == {(t, a) for t in ("digits", "boxes") for a in arms}
    for arm in arms:
        assert "test_ap50_voc07" in runs["boxes", arm]["metrics"]
        assert "head_probe_test_ap50_voc07" in runs["boxes", arm]["frozen"]  # the task's head on the frozen backbone
        assert "test_top1" in runs["digits", arm]["metrics"] and "knn_test" in runs["digits", arm]["frozen"]
