import pytest
import torch

from bissl.config import PretrainConfig, load_config
from bissl.engine.checkpoint import load_backbone
from bissl.engine.logger import read_metrics
from bissl.stages.pretrain import pretrain
from bissl.utils.errors import ConfigError, NonFiniteError
from bissl.utils.io import load_torch


def _cfg(overrides, *extra):
    return load_config(PretrainConfig, "pretrain_digits", [*overrides, *extra])


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_resume_is_bit_exact(tmp_path, tiny_pretrain_overrides, method):
    extra = [f"pretext.name={method}", "pretext.params={}"]
    full = pretrain(_cfg(tiny_pretrain_overrides, *extra, f"out_dir={tmp_path / 'full'}"))
    half_cfg = _cfg(tiny_pretrain_overrides, *extra, f"out_dir={tmp_path / 'half'}")
    first = pretrain(half_cfg, until_step=3)  # stops mid-epoch (8 steps in all, 4 per epoch)
    assert not first.finished and first.step == 3
    second = pretrain(half_cfg, resume=True)
    assert second.finished and second.step == full.step == 16
    a, b = load_torch(full.backbone_path), load_torch(second.backbone_path)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    heads_a, heads_b = load_torch(full.pretext_head_path), load_torch(second.pretext_head_path)
    for key, value in heads_a["state_dict"].items():
        assert torch.equal(value, heads_b["state_dict"][key]), key
    losses = lambda run: [r["loss"] for r in read_metrics(run.out_dir / "metrics.jsonl", "train")]  # noqa: E731
    assert losses(full) == losses(second)


@pytest.mark.e2e
def test_exported_files_load_weights_only_and_rebuild(tiny_pretrain_overrides):
    result = pretrain(_cfg(tiny_pretrain_overrides))
    backbone, spec = load_backbone(result.backbone_path)
    assert spec["name"] == "small_cnn" and backbone(torch.rand(2, 1, 8, 8)).shape == (2, backbone.feature_dim)
    heads = torch.load(result.pretext_head_path, weights_only=True)
    assert heads["name"] == "simclr" and heads["kind"] == "pretext"
    assert (result.out_dir / "summary.json").is_file() and (result.out_dir / "config.yaml").is_file()


@pytest.mark.e2e
def test_existing_run_is_not_overwritten_without_resume(tiny_pretrain_overrides):
    cfg = _cfg(tiny_pretrain_overrides)
    pretrain(cfg, until_step=1)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        pretrain(cfg)


@pytest.mark.e2e
def test_resume_refuses_a_changed_config(tmp_path, tiny_pretrain_overrides):
    pretrain(_cfg(tiny_pretrain_overrides), until_step=1)
    with pytest.raises(ConfigError, match=r"another config \(optim.lr: 0.3 -> 0.1\); restore the config"):
        pretrain(_cfg(tiny_pretrain_overrides, "optim.lr=0.1"), resume=True)


@pytest.mark.e2e
def test_nan_loss_is_one_clear_error_and_keeps_checkpoint(tiny_pretrain_overrides):
    cfg = _cfg(tiny_pretrain_overrides)
    pretrain(cfg, until_step=2)
    state_path = cfg.out_dir + "/checkpoints/last.pt"
    before = load_torch(state_path)["step"]
    nan_cfg = _cfg(tiny_pretrain_overrides, "optim.lr=1e30", "optim.grad_clip=null", f"out_dir={cfg.out_dir}_nan")
    with pytest.raises(NonFiniteError, match=r"pretext loss at step \d+ became (nan|inf|-inf); lower optim.lr"):
        pretrain(nan_cfg)
    assert load_torch(state_path)["step"] == before
