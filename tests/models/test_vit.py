"""timm ViT backbones: registry, features, foreign weights (timm and MAE layouts), qkv split, LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("peft")

from bissl.models import BACKBONES, build_backbone, load_backbone_weights
from bissl.models.lora import apply_lora, has_lora, set_trainable
from bissl.models.timm_vit import SplitQKVAttention, split_qkv
from bissl.utils.errors import ConfigError


def tiny_vit(**kw):
    torch.manual_seed(0)
    kw = {"embed_dim": 32, "depth": 2, "num_heads": 2, **kw}
    return build_backbone("vit_tiny", in_channels=kw.pop("in_channels", 3), small_images=True,
                          image_size=kw.pop("image_size", 16), **kw)  # fmt: skip


def test_registered_and_shapes() -> None:
    assert {"vit_tiny", "vit_small", "vit_base"} <= set(BACKBONES)
    model = tiny_vit(in_channels=1)
    assert model.feature_dim == 32 and model.patch_size == 4 and model.grid_size == (4, 4)
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 32)
    tokens = model.forward_tokens(torch.randn(3, 1, 16, 16), torch.tensor([[0, 5], [1, 2], [15, 3]]))
    assert tokens.shape == (3, 3, 32)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        tiny_vit(image_size=18)


def test_forward_tokens_without_mask_matches_timm_features() -> None:
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model.forward_tokens(x), model.forward_features(x), atol=1e-6)


def test_split_qkv_keeps_outputs() -> None:
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    split = copy.deepcopy(model)
    assert split_qkv(split) == 2 and isinstance(split.blocks[0].attn, SplitQKVAttention)
    assert torch.allclose(split(x), model(x), atol=1e-6)
    for module in split.modules():  # the explicit softmax path too
        if isinstance(module, SplitQKVAttention):
            module.fused_attn = False
    assert torch.allclose(split(x), model(x), atol=1e-5)


def test_timm_and_mae_checkpoints_load() -> None:
    source = tiny_vit(image_size=32)  # pos_embed for a 8x8 grid: resampled to 4x4
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    extra = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32)}  # MAE's decoder
    mae = {"model": {**source.state_dict(), **extra}}
    for ckpt in (state, mae):
        target = tiny_vit()
        load_backbone_weights(target, ckpt)
        assert torch.equal(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
        assert target.pos_embed.shape == (1, 17, 32)
    lora = apply_lora(tiny_vit(), {"r": 2})  # fused qkv split into q/k/v base layers
    load_backbone_weights(lora, mae, strict=False)
    _, k, v = source.blocks[0].attn.qkv.weight.chunk(3)
    assert torch.equal(lora.blocks[0].attn.k.weight, k) and torch.equal(lora.blocks[0].attn.v.base_layer.weight, v)


def test_lora_trains_adapters_only_and_starts_at_the_base() -> None:
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    adapted = apply_lora(copy.deepcopy(model), {"r": 4, "alpha": 4})
    assert has_lora(adapted) and torch.allclose(adapted(x), model(x), atol=1e-6)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and (".q." in n or ".v." in n) for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B, q and v, 2 blocks
    set_trainable(adapted, "all")
    assert all(p.requires_grad for p in adapted.parameters())
    with pytest.raises(ConfigError, match="no LoRA"):
        set_trainable(model, "lora")
    with pytest.raises(ConfigError, match="unknown keys"):
        apply_lora(tiny_vit(), {"rank": 4})
