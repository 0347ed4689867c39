"""End to end on a tiny ViT: MAE pretraining -> BiSSL with LoRA (CG and M-FAC) -> LoRA fine-tuning (the shipped
digits ViT configs, shrunk; ~5-7 s each)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("peft")

from bissl.config import AlignConfig, FinetuneConfig, PretrainConfig, load_config
from bissl.engine.checkpoint import load_backbone
from bissl.stages.align import align
from bissl.stages.finetune import finetune
from bissl.stages.pretrain import pretrain

QUIET = ["log.progress=false", "log.tensorboard=false"]
TINY_VIT = "backbone.kwargs={patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2}"


@pytest.mark.e2e
@pytest.mark.parametrize("solver", ["mfac", "cg"])
def test_mae_pretrain_lora_align_and_lora_finetune(tmp_path, solver: str) -> None:
    pre = tmp_path / "pre"
    pretrain(load_config(PretrainConfig, "pretrain_digits_vit_mae", [
        *QUIET, "epochs=1", "data.batch_size=128", TINY_VIT, "pretext.params.decoder_dim=8",
        "monitor.every_epochs=0", "monitor.linear_probe_epochs=0", "optim.warmup_epochs=0", f"out_dir={pre}",
    ]))  # fmt: skip
    aligned = tmp_path / "align"
    align(load_config(AlignConfig, "align_digits_vit_lora", [
        *QUIET, f"pretrained={pre}", f"out_dir={aligned}", "lora.r=2", "bilevel.cycles=2", "bilevel.n_lower=2",
        "bilevel.n_upper=2", "bilevel.head_warmup_epochs=1", "lower.batch_size=32", "upper.batch_size=16",
        f"bilevel.solver.name={solver}", "bilevel.solver.iters=2",
    ]))  # fmt: skip
    backbone, spec = load_backbone(aligned / "backbone.pt")
    assert spec["lora"]["r"] == 2 and sum(p.numel() for p in backbone.parameters() if p.requires_grad) > 0
    pretrained, _ = load_backbone(pre / "backbone.pt")
    base = {k: v for k, v in backbone.state_dict().items() if "lora_" not in k}
    lora_b = [v for k, v in backbone.state_dict().items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # the adapters moved away from B = 0
    w = pretrained.blocks[0].attn.qkv.weight.chunk(3)[0]
    assert torch.equal(base["blocks.0.attn.q.base_layer.weight"], w)  # the frozen base did not
    out = tmp_path / "ft"
    result = finetune(load_config(FinetuneConfig, "finetune_digits_vit_lora", [
        *QUIET, f"backbone={aligned}", f"out_dir={out}", "epochs=1",
    ]))  # fmt: skip
    tuned, _ = load_backbone(out / "backbone.pt")
    assert torch.equal(tuned.state_dict()["blocks.0.attn.q.base_layer.weight"], w)
    assert result is not None
