"""Every built-in pretext method through the stages: its shipped digits config pretrains (tiny settings), and BiSSL
aligns from its run (heads, momentum encoder and views restored from the pretrained files) for two cycles."""

from __future__ import annotations

import math

import pytest
import torch

from bissl.config import AlignConfig, PretrainConfig, load_config
from bissl.engine.logger import read_metrics
from bissl.pretext import PRETEXT_METHODS
from bissl.stages.align import align
from bissl.stages.pretrain import pretrain
from helpers.stages import TINY_ALIGN, TINY_PRETRAIN

METHODS = ("simclr", "byol", "vicreg", "barlow_twins", "mocov3", "simsiam")
# MAE needs a patch-token backbone (a ViT): its digits config and stages are tested in test_vit_lora_stages.py
TOKEN_METHODS = {"mae": "pretrain_digits_vit_mae"}


def _pretrain_config(method: str) -> str:
    return "pretrain_digits" if method == "simclr" else f"pretrain_digits_{method}"


def test_every_built_in_method_has_a_shipped_digits_config():
    built_in = {name for name in PRETEXT_METHODS.names() if PRETEXT_METHODS.get(name).__module__.startswith("bissl.")}
    assert set(METHODS) | set(TOKEN_METHODS) == built_in  # (plug-ins registered by other tests are not built-ins)
    for method, name in TOKEN_METHODS.items():
        cfg = load_config(PretrainConfig, name)
        assert cfg.pretext.name == method and cfg.data.name == "digits"
    for method in METHODS:
        cfg = load_config(PretrainConfig, _pretrain_config(method))
        assert cfg.pretext.name == method and cfg.data.name == "digits" and cfg.pretext.augmentation_params


@pytest.mark.e2e
@pytest.mark.parametrize("method", METHODS)
def test_method_pretrains_and_aligns_on_digits(method, tmp_path):
    pre = pretrain(load_config(PretrainConfig, _pretrain_config(method), [*TINY_PRETRAIN, f"out_dir={tmp_path / 'p'}"]))
    losses = [r["loss"] for r in read_metrics(pre.out_dir / "metrics.jsonl", "train")]
    assert losses and all(math.isfinite(x) for x in losses)
    overrides = [*TINY_ALIGN, f"pretrained={pre.out_dir}", f"out_dir={tmp_path / 'a'}", f"pretext.name={method}"]
    result = align(load_config(AlignConfig, "align_digits", overrides))
    assert result.finished and result.cycle == 2
    cycles = read_metrics(result.out_dir / "metrics.jsonl", "cycle")
    for key in ("lower/pretext_loss", "upper/loss_theta", "upper/hypergrad_norm", "upper/solver_residual"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in cycles), key
    assert 0.0 <= result.metrics["theta_test_top1"] <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_the_pretext_comparison_study_takes_each_method_from_its_pretraining_run(method):
    """pipeline_pretext_digits: one study per method, as its header's command line runs it."""
    from bissl.config import PipelineConfig

    run = f"runs/{_pretrain_config(method)}"
    overrides = [f"pretrained={run}", f"align.pretext.name={method}", f"out_dir=runs/pipeline_pretext_digits/{method}"]
    cfg = load_config(PipelineConfig, "pipeline_pretext_digits", overrides)
    assert cfg.pretrained == run and cfg.align.pretext is not None and cfg.align.pretext.name == method
    assert cfg.align.pretext.augmentation_params == {"flip_p": 0.0}  # digits are never mirrored
    assert [arm.name for arm in cfg.arms] == ["conventional", "bissl"]
