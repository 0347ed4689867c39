"""Every built-in pretext method on two gloo processes (each on half of the batch) against one process on the whole.

Float64, a tiny backbone with BatchNorm (synchronised: GlobalBatchNorm) and the methods' own heads (their BatchNorms
synchronised too), ``gather_distributed`` on. Rank ``r`` holds rows ``r::2`` of each view. The loss, the gradient
(backbone and heads) and the Hessian-vector product over the backbone, each averaged over the ranks (what DDP and
BiSSL's rank sync do), must equal the single-process values: cross-rank terms (VICReg's global statistics, Barlow
Twins' summed cross-correlation, MoCo v3's gathered keys, SimCLR's negatives) are differentiated twice exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bissl.distributed import process as D
from bissl.engine.build import distributed_pretext_params
from bissl.pretext import build_pretext
from helpers.ranks import spawn_ranks

WORLD = 2
TOL = 1e-9  # measured: loss <= 9e-16, gradient <= 2.4e-14, HVP <= 3e-12 on entries up to 1.7e3 (float64)
HEADS = {"projector_dims": [8, 4]}
METHODS: dict[str, dict[str, Any]] = {
    "vicreg": HEADS,
    "barlow_twins": {**HEADS, "lambd": 0.1},
    "mocov3": {**HEADS, "predictor_dims": [8, 4], "temperature": 0.5},
    "simclr": HEADS,
    "byol": {**HEADS, "predictor_dims": [8, 4]},
    "simsiam": {**HEADS, "predictor_dims": [2, 4]},
}
CROSS_RANK = ("vicreg", "barlow_twins", "mocov3", "simclr")  # methods whose loss couples the ranks' samples


def _backbone() -> nn.Module:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Tanh()).double()
    backbone.feature_dim = 6
    return backbone


def _views() -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2)]


def _run(name: str, views: list[Tensor], rank: int, world: int, *, gather: bool = True) -> dict[str, Any]:
    torch.manual_seed(0)
    backbone = _backbone()
    params = {**METHODS[name], "gather_distributed": gather} if name in CROSS_RANK else METHODS[name]
    method = build_pretext(name, 6, params).double()
    method.setup(backbone)  # MoCo v3 / BYOL: the momentum encoder, before its BatchNorms are synchronised
    if world > 1:
        D.convert_sync_batchnorm(nn.ModuleList([backbone, method]), torch.device("cpu"))
    theta = list(backbone.parameters())
    params = [*theta, *method.head_parameters()]
    loss = method.loss(backbone, [v[rank::world] for v in views])
    grads = torch.autograd.grad(loss, params, create_graph=True)
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) for i, p in
                 enumerate(theta)]  # fmt: skip
    dot = sum((g * v).sum() for g, v in zip(grads[: len(theta)], direction, strict=True))
    hvp = list(torch.autograd.grad(dot, theta))
    out = [loss.detach().clone(), *(g.detach().clone() for g in grads), *hvp]
    D.all_reduce_mean_(out)  # the mean over ranks, as DDP does for gradients and BiSSL's RankSync for HVPs
    return {"loss": out[0], "grads": out[1 : 1 + len(params)], "hvp": out[1 + len(params) :]}


def _rank(rank: int, world: int, out: str, views: list[Tensor]) -> None:
    D.init_from_env("cpu")
    results: dict[str, Any] = {name: _run(name, views, rank, world) for name in METHODS}
    results["local"] = {name: _run(name, views, rank, world, gather=False) for name in CROSS_RANK}
    results["switched_on"] = {name: distributed_pretext_params(name, {}).get("gather_distributed") for name in METHODS}
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    root = tmp_path_factory.mktemp("distributed_pretext")
    views = _views()
    spawn_ranks(_rank, WORLD, str(root), views)
    ranks = [torch.load(Path(root) / f"rank{r}.pt") for r in range(WORLD)]
    # the single process sees rank 0's rows, then rank 1's (every loss here is invariant to the order of samples)
    order = torch.cat([torch.arange(8)[r::WORLD] for r in range(WORLD)])
    single = {name: _run(name, [v[order] for v in views], 0, 1) for name in METHODS}
    return ranks, single


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(METHODS))
def test_two_processes_equal_one_process_on_the_concatenated_batch(results, name):
    ranks, single = results
    expected = single[name]
    for rank in ranks:
        got = rank[name]
        assert float(got["loss"]) == pytest.approx(float(expected["loss"]), abs=TOL)
        assert _max_diff(got["grads"], expected["grads"]) < TOL  # backbone, then heads
        assert _max_diff(got["hvp"], expected["hvp"]) < TOL  # not divided by the number of processes
    assert max(float(h.abs().max()) for h in expected["hvp"]) > 1e-3  # the comparison is not of zeros


@pytest.mark.parametrize("name", CROSS_RANK)
def test_without_gathering_the_cross_rank_methods_differ(results, name):
    """The parity above is sharp: each rank's local-batch loss is another loss (and another Hessian)."""
    ranks, single = results
    local = ranks[0]["local"][name]
    assert _max_diff(local["hvp"], single[name]["hvp"]) > 1e3 * TOL


def test_ddp_switches_gathering_on_for_every_method_that_has_it(results):
    ranks, _ = results
    expected = {name: (True if name in CROSS_RANK else None) for name in METHODS}
    assert ranks[0]["switched_on"] == expected
