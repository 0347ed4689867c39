from pathlib import Path

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
