import pytest
import torch

from bissl.engine.checkpoint import config_diff, load_state, save_state
from bissl.utils.errors import CheckpointError, ConfigError


def test_config_diff_names_first_changed_key():
    old = {"optim": {"lr": 0.1, "name": "sgd"}, "log": {"every": 1}}
    assert config_diff(old, old) == ""
    assert config_diff(old, {"optim": {"lr": 0.2, "name": "sgd"}, "log": {"every": 1}}) == "optim.lr: 0.1 -> 0.2"
    assert config_diff(old, {"optim": {"lr": 0.1, "name": "sgd"}, "log": {"every": 2}}, ignore=("log",)) == ""


def test_state_refuses_changed_config_and_foreign_files(tmp_path):
    path = tmp_path / "last.pt"
    save_state(path, {"step": 3, "w": torch.ones(2)}, {"optim": {"lr": 0.1}})
    assert load_state(path, {"optim": {"lr": 0.1}})["step"] == 3
    with pytest.raises(ConfigError, match=r"config changed \(optim.lr: 0.1 -> 0.5\)"):
        load_state(path, {"optim": {"lr": 0.5}})
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a bissl training state"):
        load_state(tmp_path / "other.pt", {})


def test_nan_weights_in_a_backbone_file_are_blamed_on_the_file(tmp_path):
    from bissl.engine.checkpoint import backbone_spec, export_backbone, load_backbone
    from bissl.models import build_backbone

    net = build_backbone("small_cnn", in_channels=1, width=8)
    with torch.no_grad():
        next(net.parameters())[0] = float("nan")
    path = tmp_path / "backbone.pt"
    export_backbone(path, net, backbone_spec("small_cnn", 1, True, {"width": 8}))
    with pytest.raises(CheckpointError, match=rf"backbone file {path} holds NaN/inf weights \(.*\): it is corrupt"):
        load_backbone(path)
