"""The momentum-pair base of BYOL and MoCo v3: state dicts saved before it existed still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bissl.pretext import MomentumPair, build_pretext

SAVED = json.loads((Path(__file__).parent / "fixtures" / "momentum_state_dicts.json").read_text())


@pytest.mark.parametrize("name", ["byol", "mocov3"])
def test_state_dicts_saved_before_the_base_still_load(name: str) -> None:
    """Every key (and shape) the previous BYOL / MoCoV3 classes saved loads strictly, and nothing else is expected."""
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6))
    method = build_pretext(name, 6, {"projector_dims": [8, 4], "predictor_dims": [5, 4]})
    assert isinstance(method, MomentumPair)
    method.setup(backbone)
    current = method.state_dict()
    gen = torch.Generator().manual_seed(0)
    old = {key: torch.randn(shape, generator=gen).to(current[key].dtype) for key, shape in SAVED[name].items()}
    method.load_state_dict(old)
    assert all(torch.equal(method.state_dict()[key], value) for key, value in old.items())
