import json
import math

import pytest
import torch
from PIL import Image

from bissl.cli import main
from bissl.config import EvaluateConfig, PretrainConfig, load_config
from bissl.downstream import DOWNSTREAM_TASKS
from bissl.engine.checkpoint import backbone_spec, export_backbone, load_backbone, resolve_backbone_file
from bissl.engine.logger import read_metrics
from bissl.eval import knn_accuracy
from bissl.eval.frozen import frozen_features
from bissl.models import build_backbone
from bissl.stages.evaluate import evaluate
from bissl.stages.pretrain import pretrain
from bissl.utils.errors import ConfigError

TINY_EVALUATE = ["downstream.data.image_size=8", "linear_probe_epochs=20", "log.progress=false"]


@pytest.fixture
def pretrained(tiny_pretrain_overrides):
    """The folder of a tiny finished pretrain run."""
    return pretrain(load_config(PretrainConfig, "pretrain_digits", tiny_pretrain_overrides)).out_dir


def _cfg(tmp_path, backbone, *extra):
    return load_config(
        EvaluateConfig, "evaluate_digits", [*TINY_EVALUATE, f"backbone={backbone}", f"out_dir={tmp_path}", *extra]
    )


@pytest.mark.e2e
def test_evaluate_reports_knn_probe_and_embedding(tmp_path, pretrained):
    result = evaluate(_cfg(tmp_path / "eval", pretrained, "embedding_max_points=200"))
    keys = {"knn_val", "knn_test", "linear_probe_val", "linear_probe_test"}
    assert set(result.metrics) == keys
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in result.metrics.values())
    summary = json.loads(result.summary_path.read_text())
    assert summary["stage"] == "evaluate" and summary["metrics"] == result.metrics
    assert summary["num_samples"] == {"train": 1079, "val": 359, "test": 359}
    assert read_metrics(result.out_dir / "metrics.jsonl", "evaluate")[0]["knn_test"] == result.metrics["knn_test"]
    assert result.embedding_path == result.out_dir / "embedding.png"
    assert result.embedding_path.read_bytes().startswith(b"\x89PNG") and (result.out_dir / "config.yaml").is_file()

    with pytest.raises(ConfigError, match=r"holds a finished run .* pass --overwrite"):
        evaluate(_cfg(tmp_path / "eval", pretrained / "backbone.pt", "embedding=false"))
    again = evaluate(_cfg(tmp_path / "eval", pretrained / "backbone.pt", "embedding=false"), overwrite=True)
    assert again.metrics == result.metrics  # reproducible from the seed
    assert again.embedding_path is None and not (again.out_dir / "embedding.png").exists()  # no stale plot


@pytest.mark.e2e
def test_cli_evaluate_prints_metrics_and_files(tmp_path, pretrained, capsys):
    out_dir = tmp_path / "cli"
    argv = ["evaluate", "--backbone", str(pretrained), "--out-dir", str(out_dir), *TINY_EVALUATE]
    assert main([*argv, "embedding_max_points=60", "linear_probe_epochs=0"]) == 0
    printed = capsys.readouterr().out
    assert "knn_test: " in printed and "linear_probe" not in printed
    assert f"embedding: {out_dir / 'embedding.png'}" in printed and f"summary: {out_dir / 'summary.json'}" in printed


@pytest.mark.e2e
def test_cli_threads_flag_sets_torch_threads_and_rejects_zero(tmp_path, pretrained, capsys):
    argv = ["evaluate", "--backbone", str(pretrained), "--out-dir", str(tmp_path / "t")]
    try:
        assert main([*argv, "--threads", "2", *TINY_EVALUATE, "embedding=false", "linear_probe_epochs=0"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    with pytest.raises(SystemExit):
        main([*argv, "--threads", "0"])
    assert "--threads: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_missing_backbone_is_one_line_error(tmp_path, capsys):
    out_dir = tmp_path / "eval"
    assert main(["evaluate", "--backbone", str(tmp_path / "nowhere"), "--out-dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("bissl evaluate: error: backbone=")
    assert "no backbone file" in err and "--backbone" in err
    assert not out_dir.exists()  # nothing written for a run that cannot start


def _exported_backbone(tmp_path, in_channels):
    path = tmp_path / f"backbone_{in_channels}ch.pt"
    module = build_backbone("small_cnn", in_channels=in_channels, width=8)
    export_backbone(path, module, backbone_spec("small_cnn", in_channels, True, {"width": 8}))
    return path


@pytest.mark.e2e
def test_channel_mismatch_names_the_fix(tmp_path):
    cfg = _cfg(tmp_path / "eval", _exported_backbone(tmp_path, 3))
    with pytest.raises(ConfigError, match="'digits' has 1 channels but the backbone takes 3; use data with matching"):
        evaluate(cfg)


@pytest.mark.e2e
def test_unlabelled_dataset_is_refused(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), color=i * 100).save(root / split / f"{i}.png")
    cfg = _cfg(
        tmp_path / "eval",
        _exported_backbone(tmp_path, 1),
        "downstream.data.name=unlabelled_folder",
        f"downstream.data.root={root}",
    )
    with pytest.raises(ConfigError, match="has no labels; choose a labelled dataset"):
        evaluate(cfg)


def test_few_shot_knn_uses_k_capped_by_the_class_size_and_says_so(tmp_path, tiny_pretrained, capsys):
    # 10-shot, 2 classes: a bank of 20 images, where k = 20 would make every query vote over the whole bank
    few_shot = ["downstream.classes=[0, 1]", "downstream.few_shot=10", "knn_k=20", "linear_probe_epochs=0"]
    argv = ["evaluate", "--backbone", str(tiny_pretrained), "--out-dir", str(tmp_path), *TINY_EVALUATE, *few_shot]
    assert main([*argv, "embedding=false"]) == 0
    assert "kNN k: 10 (knn_k=20, capped by the training split's mean class size)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["knn_k"] == 10 and summary["num_samples"]["train"] == 20
    cfg = _cfg(tmp_path, tiny_pretrained, *few_shot)
    splits = DOWNSTREAM_TASKS.get("classification").splits(cfg.downstream)
    backbone, _ = load_backbone(resolve_backbone_file(cfg.backbone))
    train, test = (frozen_features(backbone, splits[s], device=torch.device("cpu")) for s in ("train", "test"))
    assert summary["metrics"]["knn_test"] == knn_accuracy(*train, *test, k=10, temperature=cfg.knn_temperature)
