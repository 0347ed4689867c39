from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from bissl.models import BACKBONE_FORMAT, as_backbone, build_backbone, load_backbone_weights
from bissl.utils.errors import CheckpointError


@pytest.fixture(scope="module")
def torchvision_r18() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()  # with fc.*, as torchvision/timm ship it


def _assert_loaded(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_torchvision_state_dict_loads_from_file(tmp_path: Path, torchvision_r18: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision_r18, path)
    backbone = build_backbone("resnet18", in_channels=3, small_images=False)
    report = load_backbone_weights(backbone, path)
    assert report.missing == [] and report.unexpected == []
    _assert_loaded(backbone, torchvision_r18)


def test_containers_and_prefixes_are_unwrapped(torchvision_r18: dict[str, torch.Tensor]) -> None:
    wrapped = {f"module.backbone.{k}": v for k, v in torchvision_r18.items()}
    wrapped["module.projector.0.weight"] = torch.zeros(3, 512)
    checkpoint = {"epoch": 7, "optimizer": {"lr": 0.1}, "state_dict": wrapped}
    backbone = build_backbone("resnet18", in_channels=3, small_images=False)
    load_backbone_weights(backbone, checkpoint)
    _assert_loaded(backbone, torchvision_r18)

    teacher = {f"backbone.{k}": v for k, v in torchvision_r18.items()}
    student = {f"backbone.{k}": torch.zeros_like(v) for k, v in torchvision_r18.items()}
    backbone = build_backbone("resnet18", in_channels=3, small_images=False)
    load_backbone_weights(backbone, {"student": student, "teacher": teacher, "epoch": 100})
    _assert_loaded(backbone, torchvision_r18)


def test_bissl_backbone_file_is_accepted(tmp_path: Path) -> None:
    source = build_backbone("small_cnn", in_channels=1, width=4)
    payload = {
        "format": BACKBONE_FORMAT,
        "backbone": {"name": "small_cnn", "in_channels": 1, "small_images": True, "kwargs": {"width": 4}},
        "feature_dim": source.feature_dim,
        "state_dict": source.state_dict(),
    }
    torch.save(payload, tmp_path / "backbone.pt")
    target = build_backbone("small_cnn", in_channels=1, width=4)
    load_backbone_weights(target, tmp_path / "backbone.pt")
    _assert_loaded(target, source.state_dict())
    with pytest.raises(CheckpointError, match=r"bissl\.backbone/v9"):
        load_backbone_weights(target, {**payload, "format": "bissl.backbone/v9"})


def _one_line_error(backbone: nn.Module, state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(backbone, state)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shape_mismatch_names_key_shapes_and_cause(torchvision_r18: dict[str, torch.Tensor]) -> None:
    message = _one_line_error(build_backbone("resnet18", in_channels=3, small_images=True), torchvision_r18)
    assert "'conv1.weight'" in message and "[64, 3, 7, 7]" in message and "[64, 3, 3, 3]" in message
    assert "small_images" in message

    message = _one_line_error(build_backbone("resnet18", in_channels=1, small_images=False), torchvision_r18)
    assert "'conv1.weight'" in message and "in_channels" in message

    r50 = build_backbone("resnet50", in_channels=3, small_images=False)
    message = _one_line_error(r50, torchvision_r18)
    assert "another architecture" in message


def test_nothing_is_loaded_on_error_and_strict_lists_missing_keys(torchvision_r18: dict[str, torch.Tensor]) -> None:
    backbone = build_backbone("resnet18", in_channels=3, small_images=False)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    partial = {k: v for k, v in torchvision_r18.items() if not k.startswith("layer4.")}
    message = _one_line_error(backbone, partial)
    assert "missing (layer4.0.conv1.weight" in message and "strict=False" in message
    _assert_loaded(backbone, before)

    report = load_backbone_weights(backbone, {**partial, "extra.weight": torch.zeros(1)}, strict=False)
    assert report.missing[0] == "layer4.0.conv1.weight" and report.unexpected == ["extra.weight"]
    assert torch.equal(backbone.conv1.weight, torchvision_r18["conv1.weight"])


def test_old_checkpoints_without_num_batches_tracked_load(torchvision_r18: dict[str, torch.Tensor]) -> None:
    old = {k: v for k, v in torchvision_r18.items() if not k.endswith("num_batches_tracked")}
    backbone = build_backbone("resnet18", in_channels=3, small_images=False)
    assert load_backbone_weights(backbone, old).missing == []


def test_user_module_keeps_its_own_names() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(4, 3)
            self.head = nn.Linear(3, 3)  # a user's layer called `head` is not dropped as a classifier
            self.feature_dim = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x.flatten(1)))

    source, target = Net(), Net()
    load_backbone_weights(target, {"model": source.state_dict()})
    _assert_loaded(target, source.state_dict())


def test_foreign_or_broken_checkpoints_are_refused(tmp_path: Path) -> None:
    backbone = as_backbone(nn.Linear(2, 2), feature_dim=2)
    with pytest.raises(CheckpointError, match="found no state dict"):
        load_backbone_weights(backbone, {"epoch": 3, "args": {"lr": 1}})
    with pytest.raises(CheckpointError, match="no weight name"):
        load_backbone_weights(backbone, {"conv.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone_weights(backbone, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_backbone_weights(backbone, tmp_path / "junk.pt")


def _zeros(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": torch.zeros_like(v) for k, v in state.items()}


def _prefixed(state: dict[str, torch.Tensor], prefix: str, *, fc: bool = True) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items() if fc or not k.startswith("fc.")}


def _lightly(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``nn.Sequential(*list(resnet.children())[:-1])``: children by index (0 conv1, 1 bn1, 4-7 layer1-4)."""
    index = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in index:
            out[f"{prefix}{index[head]}.{rest}"] = value
    return out


def _layouts(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Checkpoints as each library saves them, around the torchvision ResNet-18 ``sd`` (with its ``fc``)."""
    projector = {"0.weight": torch.ones(4, 512), "0.bias": torch.ones(4)}
    return {
        "torchvision / timm (plain, fc.* dropped)": sd,
        "Barlow Twins / VICReg release resnet50.pth (plain, no fc)": _prefixed(sd, "", fc=False),
        "MoCo v3 (state_dict, module.base_encoder.; momentum encoder ignored)": {
            "epoch": 100, "arch": "resnet18", "optimizer": {"state": {}},
            "state_dict": {**_prefixed(sd, "module.base_encoder.", fc=False),
                           **{f"module.base_encoder.fc.{k}": v for k, v in projector.items()},
                           **_zeros(sd, "module.momentum_encoder."),
                           **{f"module.predictor.{k}": v for k, v in projector.items()}},
        },
        "MoCo v1/v2 (state_dict, module.encoder_q.)": {
            "state_dict": {**_prefixed(sd, "module.encoder_q."), **_zeros(sd, "module.encoder_k."),
                           "module.queue": torch.zeros(128, 16), "module.queue_ptr": torch.zeros(1)},
        },
        "SimSiam (state_dict, module.encoder., projector in fc)": {
            "state_dict": {**_prefixed(sd, "module.encoder.", fc=False),
                           **{f"module.encoder.fc.{k}": v for k, v in projector.items()},
                           **{f"module.predictor.{k}": v for k, v in projector.items()}},
        },
        "Barlow Twins / VICReg checkpoint.pth (model, module.backbone.)": {
            "epoch": 3, "model": {**_prefixed(sd, "module.backbone.", fc=False),
                                  **{f"module.projector.{k}": v for k, v in projector.items()},
                                  "module.bn.running_mean": torch.zeros(4)},
        },
        "solo-learn (Lightning state_dict, backbone.)": {
            "pytorch-lightning_version": "2.1", "global_step": 5,
            "state_dict": {**_prefixed(sd, "backbone.", fc=False), **_zeros(sd, "momentum_backbone."),
                           **{f"projector.{k}": v for k, v in projector.items()},
                           "classifier.weight": torch.ones(10, 512)},
        },
        "lightly (Lightning, backbone = Sequential of children)": {
            "state_dict": {**_lightly(sd, "backbone."),
                           **{f"projection_head.layers.{k}": v for k, v in projector.items()}},
        },
        "lightly (torch.save(backbone.state_dict()))": _lightly(sd, ""),
        "VISSL (classy_state_dict.base_model.model.trunk._feature_blocks.)": {
            "phase_idx": 10, "iteration": 1000, "type": "checkpoint",
            "classy_state_dict": {"base_model": {
                "model": {"trunk": _prefixed(sd, "_feature_blocks.", fc=False),
                          "heads": {f"0.clf.{k}": v for k, v in projector.items()}},
                "meta": {}}},
        },
        "VISSL converted (trunk._feature_blocks.)": _prefixed(sd, "trunk._feature_blocks.", fc=False),
        "DINO (teacher, backbone.)": {"teacher": _prefixed(sd, "backbone."), "student": _zeros(sd, "backbone.")},
        "torch.compile + DDP (module._orig_mod.)": {"model": _prefixed(sd, "module._orig_mod.")},
    }  # fmt: skip


def test_every_foreign_ssl_layout_loads_a_resnet_exactly(tmp_path: Path, torchvision_r18) -> None:
    for name, checkpoint in _layouts(torchvision_r18).items():
        path = tmp_path / "ckpt.pth"
        torch.save(checkpoint, path)
        backbone = build_backbone("resnet18", in_channels=3, small_images=False)
        report = load_backbone_weights(backbone, path)  # strict: every backbone key found, nothing unexpected
        assert report.missing == [] and report.unexpected == [], name
        assert report.loaded == len(backbone.state_dict()), name
        _assert_loaded(backbone, torchvision_r18)
    moco_v3 = next(ckpt for name, ckpt in _layouts(torchvision_r18).items() if name.startswith("MoCo v3"))
    moco = load_backbone_weights(build_backbone("resnet18", in_channels=3, small_images=False), moco_v3)
    assert "strip 'module.base_encoder.'" in moco.describe()


def test_a_real_timm_resnet_loads() -> None:
    timm = pytest.importorskip("timm")
    source = timm.create_model("resnet18", pretrained=False)
    backbone = build_backbone("resnet18", in_channels=3, small_images=False)
    report = load_backbone_weights(backbone, source.state_dict())
    assert report.missing == [] and report.unexpected == []
    _assert_loaded(backbone, source.state_dict())


def test_partial_checkpoint_reports_missing_and_unexpected_keys(torchvision_r18) -> None:
    state = _prefixed(torchvision_r18, "backbone.", fc=False)
    state = {k: v for k, v in state.items() if not k.startswith("backbone.layer4.")}
    state["backbone.extra.weight"] = torch.ones(2)
    backbone = build_backbone("resnet18", in_channels=3, small_images=False)
    with pytest.raises(CheckpointError, match=r"missing \(layer4.*unexpected \(extra.weight\)"):
        load_backbone_weights(backbone, {"state_dict": state})
    report = load_backbone_weights(backbone, {"state_dict": state}, strict=False)
    assert report.unexpected == ["extra.weight"] and all(k.startswith("layer4.") for k in report.missing)
    assert "strip 'backbone.'" in report.describe() and f"{len(report.missing)} missing" in report.describe()


def test_nothing_matching_is_one_line(torchvision_r18) -> None:
    vit = {"state_dict": {"module.blocks.0.attn.qkv.weight": torch.zeros(3, 3), "module.cls_token": torch.zeros(3)}}
    backbone = build_backbone("resnet18", in_channels=3, small_images=False)
    with pytest.raises(CheckpointError, match="no weight name") as info:
        load_backbone_weights(backbone, vit)
    assert "\n" not in str(info.value)
