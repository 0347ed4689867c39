"""The contract of every registered pretext method (:data:`bissl.pretext.PRETEXT_METHODS`): its config parses
(defaults, a dump that validates back, unknown keys refused), the Hessian-vector product of its loss w.r.t. the
backbone matches float64 central differences of the gradient under every HVP method, and its state survives a
``weights_only`` save and load."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

from bissl.bilevel.hvp import HVP_METHODS
from bissl.pretext import PRETEXT_METHODS, PretextMethod, build_pretext, simsiam_loss
from bissl.utils.errors import ConfigError
from helpers.finite_differences import assert_hvp_matches_finite_differences
from helpers.models import tiny_backbone

FixedTargets = Callable[[PretextMethod, nn.Module, list[Tensor]], Callable[[], Tensor]]


def _image_views() -> list[Tensor]:
    return [torch.randn(6, 3, 2, 2, dtype=torch.float64) for _ in range(2)]


def _tiny_vit() -> nn.Module:
    pytest.importorskip("timm")
    from bissl.models import build_backbone

    vit = build_backbone("vit_tiny", in_channels=1, image_size=8, embed_dim=16, depth=1, num_heads=2, patch_size=2)
    return vit.double()


def _simsiam_targets(method: PretextMethod, backbone: nn.Module, views: list[Tensor]) -> Callable[[], Tensor]:
    """SimSiam's loss with its stop-gradient targets frozen at the current parameters (what its Hessian sees)."""
    with torch.no_grad():
        z1, z2 = (method.projector(backbone(v)).clone() for v in views)

    def loss() -> Tensor:
        p1, p2 = (method.predictor(method.projector(backbone(v))) for v in views)
        return simsiam_loss(p1, p2, z1, z2)

    return loss


@dataclass(frozen=True)
class Probe:
    """How to exercise one method cheaply: small ``params``, a float64 backbone with ``feature_dim``, views, and
    (for stop-gradient targets computed by the online network) the loss whose gradient differences ``H v`` is."""

    params: dict[str, object] = field(default_factory=dict)
    backbone: Callable[[], nn.Module] = tiny_backbone
    views: Callable[[], list[Tensor]] = _image_views
    fixed_targets: FixedTargets | None = None


HEADS = {"projector_dims": [8, 5]}
PROBES = {
    "simclr": Probe(HEADS),
    "vicreg": Probe(HEADS),
    "barlow_twins": Probe(HEADS),
    "byol": Probe({**HEADS, "predictor_dims": [8, 5]}),
    "mocov3": Probe({**HEADS, "predictor_dims": [8, 5]}),
    "simsiam": Probe({**HEADS, "predictor_dims": [3, 5]}, fixed_targets=_simsiam_targets),
    "mae": Probe(
        {"decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2},
        backbone=_tiny_vit,
        views=lambda: [torch.randn(4, 1, 8, 8, dtype=torch.float64)],
    ),
}
"""Built-ins' probes; a method registered by a user is probed with its defaults on :func:`tiny_backbone`."""


def make(name: str, seed: int = 0) -> tuple[PretextMethod, nn.Module, list[Tensor]]:
    """Method ``name`` on a fresh float64 backbone (after ``setup``), in train mode, and its views."""
    probe = PROBES.get(name, Probe())
    torch.manual_seed(seed)
    backbone = probe.backbone()
    method = build_pretext(name, backbone.feature_dim, probe.params)
    method.setup(backbone)
    return method.double().train(), backbone.train(), probe.views()


@pytest.mark.parametrize("name", PRETEXT_METHODS.names())
def test_config_parses_round_trips_and_refuses_unknown_keys(name: str) -> None:
    method_cls = PRETEXT_METHODS.get(name)
    method = build_pretext(name, 16, {})
    assert type(method) is method_cls and type(method.config) is method_cls.Config
    assert method_cls.Config.model_validate(method.config.model_dump()) == method.config
    with pytest.raises(ConfigError, match="unknown key 'not_a_setting'"):
        build_pretext(name, 16, {"not_a_setting": 1})


@pytest.mark.parametrize("hvp_method", HVP_METHODS)
@pytest.mark.parametrize("name", PRETEXT_METHODS.names())
def test_hvp_matches_float64_finite_differences(name: str, hvp_method: str) -> None:
    method, backbone, views = make(name)
    fixed = PROBES.get(name, Probe()).fixed_targets
    fd_loss = fixed(method, backbone, views) if fixed is not None else None
    assert_hvp_matches_finite_differences(method, backbone, views, hvp_method=hvp_method, fd_loss=fd_loss)


@pytest.mark.parametrize("name", PRETEXT_METHODS.names())
def test_state_survives_a_weights_only_round_trip(name: str) -> None:
    """A method's state loads strictly into a freshly built one, which then computes the same loss."""
    method, backbone, views = make(name)
    method.loss(backbone, views).backward()  # a trained state: BatchNorm statistics moved
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh, fresh_backbone, _ = make(name, seed=1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh_backbone.load_state_dict(backbone.state_dict())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in method.state_dict().items())
    for module in (method, backbone, fresh, fresh_backbone):
        module.eval()
    torch.testing.assert_close(fresh.loss(fresh_backbone, views), method.loss(backbone, views), rtol=0, atol=0)
