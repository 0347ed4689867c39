"""MAE: patchify and loss by hand, fixed masks per batch, the backbone contract (HVP vs finite differences: the
pretext contract test)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")

from bissl.models import SmallCNN, build_backbone
from bissl.pretext import build_pretext, mae_loss, patchify
from bissl.utils.errors import ConfigError


def tiny(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", in_channels=1, image_size=8, embed_dim=16, depth=1, num_heads=2, patch_size=2)
    method = build_pretext("mae", vit.feature_dim, {"decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2})
    method.setup(vit)
    return vit.to(dtype), method.to(dtype)


def test_patchify_and_loss_by_hand() -> None:
    image = torch.arange(16.0).view(1, 1, 4, 4)
    patches = patchify(image, 2)
    assert patches.shape == (1, 4, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # top-right patch, rows then columns
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])  # patch 1: mean 2, unbiased var 2; patch 2: constant
    pred, mask = torch.zeros(1, 2, 2), torch.tensor([[1.0, 0.0]])
    assert mae_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(0.5 * 2 / (2 + 1e-6))
    assert mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(5.0)  # (1 + 9) / 2
    assert mae_loss(pred, target, torch.tensor([[0.0, 1.0]]), norm_pix=False).item() == pytest.approx(4.0)


def test_masks_are_fixed_per_batch_and_new_per_step() -> None:
    vit, method = tiny()
    x = torch.randn(6, 1, 8, 8)
    keep, _, mask = method.draw_mask(x, 16)
    assert keep.shape == (6, 4) and mask.sum(1).tolist() == [12.0] * 6  # 75 % of 16 patches masked, per sample
    assert len({tuple(k.sort().values.tolist()) for k in keep}) > 1  # per-sample masks
    assert torch.equal(method.draw_mask(x.clone(), 16)[2], mask)  # same views (even a copy): same mask
    assert torch.equal(method.loss(vit, [x]), method.loss(vit, [x]))
    assert not torch.equal(method.draw_mask(torch.randn(6, 1, 8, 8), 16)[2], mask)  # next step: new masks
    assert not torch.equal(method.draw_mask(x[:3], 16)[2], mask[:3])  # (a slice is a new batch)


def test_rejects_a_backbone_without_the_patch_api() -> None:
    method = build_pretext("mae", 32, {"decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2})
    with pytest.raises(ConfigError, match="patch-level API"):
        method.setup(SmallCNN(1, width=8, depth=3))


def test_loss_trains() -> None:
    vit, method = tiny()
    x = torch.randn(8, 1, 8, 8)
    opt = torch.optim.Adam([*vit.parameters(), *method.parameters()], lr=1e-2)
    first = None
    for _ in range(15):
        loss = method.loss(vit, [x])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
