import pytest
import torch
from pydantic import ValidationError
from torch import nn

from bissl.pretext.heads import MLPHead, ProjectorConfig, prediction_head, projection_head


def _kinds(head: nn.Module) -> list[str]:
    return [type(layer).__name__ for layer in head]


def test_mlp_head_layers() -> None:
    head = MLPHead([4, 8, 8, 3])
    assert _kinds(head) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert head[0].bias is None and head[-1].bias is not None  # BN's shift replaces the bias
    assert head(torch.rand(5, 4)).shape == (5, 3)

    assert _kinds(MLPHead([4, 8, 3], last_bn=True)) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    plain = MLPHead([4, 8, 3], batch_norm=False)
    assert _kinds(plain) == ["Linear", "ReLU", "Linear"] and plain[0].bias is not None
    assert _kinds(MLPHead([4, 3])) == ["Linear"]
    with pytest.raises(ValueError, match="input and output"):
        MLPHead([4])


def test_presets_are_configurations_of_the_mlp() -> None:
    projector = projection_head(16, [32, 8])
    assert isinstance(projector, MLPHead) and projector.dims == (16, 32, 8)
    assert isinstance(projector[-1], nn.BatchNorm1d)  # SimCLR v2: BN on the output too
    assert isinstance(projection_head(16, [32, 8], last_bn=False)[-1], nn.Linear)
    predictor = prediction_head(8, [32, 8])
    assert predictor.dims == (8, 32, 8) and isinstance(predictor[-1], nn.Linear)


def test_projector_config_validates() -> None:
    assert ProjectorConfig().projector_dims == [512, 128]
    assert ProjectorConfig(projector_dims=[256, 256, 256]).projector_dims == [256, 256, 256]
    for bad in ({"projector_dims": []}, {"projector_dims": [0]}, {"projector_dim": [3]}):
        with pytest.raises(ValidationError):
            ProjectorConfig(**bad)
