import importlib
import math

import pytest
import torch

from bissl.cli import main
from bissl.config import FinetuneConfig, PretrainConfig, load_config
from bissl.engine.checkpoint import backbone_spec, export_backbone, load_backbone, read_head_file
from bissl.engine.logger import read_metrics
from bissl.models import build_backbone
from bissl.stages.finetune import finetune
from bissl.stages.pretrain import pretrain
from bissl.utils.errors import CheckpointError, ConfigError
from bissl.utils.io import load_torch

TINY_FINETUNE = [
    "epochs=3",
    "batch_size=128",
    "downstream.data.image_size=8",
    "log.progress=false",
    "log.tensorboard=false",
]


@pytest.fixture
def pretrained(tiny_pretrain_overrides):
    return pretrain(load_config(PretrainConfig, "pretrain_digits", tiny_pretrain_overrides)).out_dir


def _cfg(backbone, out, *extra):
    return load_config(
        FinetuneConfig, "finetune_digits", [*TINY_FINETUNE, f"backbone={backbone}", f"out_dir={out}", *extra]
    )


@pytest.mark.e2e
def test_finetune_selects_on_validation_and_exports(pretrained, tmp_path):
    result = finetune(_cfg(pretrained, tmp_path / "ft"))
    assert result.finished and result.epoch == 3
    for key in ("test_top1", "test_mean_per_class"):
        assert math.isfinite(result.metrics[key]) and 0 <= result.metrics[key] <= 1
    val = [r["val_top1"] for r in read_metrics(result.out_dir / "metrics.jsonl", "epoch")]
    assert len(val) == 3 and result.best_epoch == val.index(max(val)) + 1
    assert result.metrics["val_top1"] == pytest.approx(max(val))  # the kept weights are the best epoch's

    backbone, spec = load_backbone(result.out_dir / "backbone.pt")
    assert spec["in_channels"] == 1 and backbone(torch.rand(2, 1, 8, 8)).shape == (2, backbone.feature_dim)
    head = read_head_file(result.out_dir / "downstream_head.pt", "downstream")
    assert head["state_dict"]["weight"].shape == (10, backbone.feature_dim)


@pytest.mark.e2e
def test_resume_gives_bit_identical_weights(pretrained, tmp_path):
    full = finetune(_cfg(pretrained, tmp_path / "full"))
    half_cfg = _cfg(pretrained, tmp_path / "half")
    first = finetune(half_cfg, until_epoch=1)
    assert not first.finished and first.epoch == 1
    second = finetune(half_cfg, resume=True)
    assert second.finished and second.metrics == full.metrics and second.best_epoch == full.best_epoch
    for name in ("backbone.pt", "downstream_head.pt"):
        a, b = load_torch(full.out_dir / name)["state_dict"], load_torch(second.out_dir / name)["state_dict"]
        assert all(torch.equal(value, b[key]) for key, value in a.items()), name


@pytest.mark.e2e
def test_channel_mismatch_and_missing_backbone_are_one_line_errors(tmp_path):
    rgb = tmp_path / "rgb.pt"
    export_backbone(
        rgb, build_backbone("small_cnn", in_channels=3, width=8), backbone_spec("small_cnn", 3, True, {"width": 8})
    )
    with pytest.raises(ConfigError, match="has 1 channels but the backbone takes 3") as err:
        finetune(_cfg(rgb, tmp_path / "a"))
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"checkpoint \S*nope does not exist; check the path") as err:
        finetune(_cfg(tmp_path / "nope", tmp_path / "b"))
    assert "\n" not in str(err.value)


@pytest.mark.e2e
def test_cli_runs_plain_finetuning_and_search_with_final_seeds(pretrained, tmp_path, capsys):
    args = ["finetune", "--backbone", str(pretrained), *TINY_FINETUNE, "epochs=2"]
    assert main([*args, "--out-dir", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert "test_top1: " in out and "best epoch (validation): " in out

    hpo = ["hpo.trials=2", "hpo.final_seeds=[0, 1]", "hpo.lr_range=[0.01, 0.3]"]
    assert main([*args, *hpo, "--out-dir", str(tmp_path / "hpo")]) == 0
    out = capsys.readouterr().out
    assert "best trial: " in out and " lr=" in out and " weight_decay=" in out
    assert "test_top1: " in out and "(mean ± std over 2 seeds)" in out
    assert (tmp_path / "hpo" / "hpo_summary.json").is_file()
    assert main([*args, *hpo, "hpo.final_seeds=[]", "--out-dir", str(tmp_path / "hpo")]) == 0  # a search-only worker
    out = capsys.readouterr().out
    assert "best trial: " in out and "no final runs" in out and "0 of 2 trials finished" not in out
    assert main([*args, "--backbone", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "x")]) == 2
    assert "bissl finetune: error: checkpoint" in capsys.readouterr().err


@pytest.mark.e2e
def test_probe_first_makes_the_probe_a_candidate(pretrained, tmp_path):
    """LP-FT: the head is trained on the frozen backbone first and that probe is epoch 0's candidate, so the selected
    model is never worse on validation than the probe; the run resumes exactly after it."""
    extra = ("head_warmup_epochs=5", "optim.lr=2.0", "optim.weight_decay=0", "epochs=2")
    result = finetune(_cfg(pretrained, tmp_path / "ft", *extra))
    probe = read_metrics(result.out_dir / "metrics.jsonl", "head_warmup")[0]
    epochs = read_metrics(result.out_dir / "metrics.jsonl", "epoch")
    assert result.metrics["val_top1"] >= probe["val_top1"]
    assert (result.best_epoch == 0) == all(e["val_top1"] <= probe["val_top1"] for e in epochs)
    half = _cfg(pretrained, tmp_path / "half", *extra)
    finetune(half, until_epoch=1)
    assert finetune(half, resume=True).metrics == result.metrics


def _parameters(path):
    backbone, _ = load_backbone(path)
    return {name: p.detach() for name, p in backbone.named_parameters()}


@pytest.mark.e2e
def test_l2sp_and_backbone_lr_factor(pretrained, tmp_path, monkeypatch):
    """Defaults: exactly the single-group optimizer of before; factor 0: the backbone's weights never step (its
    BatchNorm statistics still follow the data); L2-SP: the weights end nearer the start, the penalty is logged."""
    start = _parameters(pretrained / "backbone.pt")
    default = finetune(_cfg(pretrained, tmp_path / "default"))
    module = importlib.import_module("bissl.stages.finetune")
    flat = module.build_optimization
    monkeypatch.setattr(
        module,
        "build_optimization",
        lambda optim, groups, *a: flat(optim, [p for g in groups for p in g["params"]], *a),
    )
    before = finetune(_cfg(pretrained, tmp_path / "one_group"))
    monkeypatch.undo()
    assert before.metrics == default.metrics
    ends = _parameters(default.out_dir / "backbone.pt")
    assert all(torch.equal(p, _parameters(before.out_dir / "backbone.pt")[k]) for k, p in ends.items())

    frozen = finetune(_cfg(pretrained, tmp_path / "frozen", "backbone_lr_factor=0"))
    assert all(torch.equal(p, start[k]) for k, p in _parameters(frozen.out_dir / "backbone.pt").items())

    anchored = finetune(_cfg(pretrained, tmp_path / "l2sp", "l2sp=5.0"))
    distance = lambda weights: sum(((p - start[k]) ** 2).sum() for k, p in weights.items())  # noqa: E731
    assert distance(_parameters(anchored.out_dir / "backbone.pt")) < 0.5 * distance(ends)
    logged = read_metrics(anchored.out_dir / "metrics.jsonl", "epoch")
    assert all(e["l2sp_penalty"] > 0 for e in logged)
    assert "l2sp_penalty" not in read_metrics(default.out_dir / "metrics.jsonl", "epoch")[0]
