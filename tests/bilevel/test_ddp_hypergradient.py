"""BiSSLTrainer on two gloo processes (each on half of every batch) against one process on the whole batch.

A tiny conv net with BatchNorm (synchronised: GlobalBatchNorm) and SimCLR contrasting with both ranks' embeddings,
in float64: two lower steps, then the Hessian-vector product of the cycle's operator and the hypergradient (phi
and head parts) of CG, M-FAC and the identity must equal the single-process values on the concatenated batches.
Rank ``r`` holds rows ``r::2`` of every batch; the losses are means over anchors / samples, so the mean of the
ranks' losses is the single-process loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bissl.bilevel.implicit import SolverSpec
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer, RankSync
from bissl.distributed import process as D
from bissl.downstream.classification import ClassificationTask
from bissl.pretext import build_pretext
from helpers.models import ConvNet
from helpers.ranks import spawn_ranks

WORLD = 2
SOLVERS = ("cg", "mfac", "identity")
TOL = 1e-5  # what the tests demand; the measured differences are ~1e-15 (float64)


def _data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    views = [[torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)] for _ in range(3)]
    images = torch.randn(12, 3, 8, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 5, (12,), generator=g)
    return {"lower": views[:2], "hessian": views[2], "batch": (images, targets)}


def _rows(batch: Any, rank: int, world: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[rank::world]
    return type(batch)(_rows(item, rank, world) for item in batch)


def _trainer(solver: str, *, sync_batchnorm: bool) -> BiSSLTrainer:
    torch.manual_seed(0)
    backbone = ConvNet().backbone.double()
    pretext = build_pretext("simclr", 6, {"projector_dims": [8, 4], "gather_distributed": True}).double()
    task = ClassificationTask(5, mean=(0.0,) * 3, std=(1.0,) * 3)
    head = task.build_head(6).double()
    sync = None
    if D.world() > 1:
        if sync_batchnorm:
            D.convert_sync_batchnorm(nn.ModuleList([backbone, pretext]), torch.device("cpu"))
        sync = RankSync(mean=D.all_reduce_mean_, buffers=None if sync_batchnorm else D.broadcast_buffers)
    spec = SolverSpec(solver, maxiter=8, rtol=None)
    settings = BilevelSettings(lam=1e-3, damping=200.0, solver=spec, mfac_window=4)
    sgd = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)  # noqa: E731
    return BiSSLTrainer(
        backbone=backbone, pretext=pretext, task=task, head=head, settings=settings,
        make_lower_optimizer=sgd, make_upper_optimizer=sgd, sync=sync,
    )  # fmt: skip


def _direction(trainer: BiSSLTrainer) -> Tensor:
    numel = sum(p.numel() for p in trainer.theta)
    return torch.randn(numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _run(data: dict[str, Any], rank: int, world: int, *, sync_batchnorm: bool = True) -> dict[str, Any]:
    """Per solver: lower state after two lower steps, the cycle's HVP (CG only), the hypergradient and stats."""
    local = {key: _rows(value, rank, world) for key, value in data.items()}
    out: dict[str, Any] = {}
    for solver in SOLVERS:
        trainer = _trainer(solver, sync_batchnorm=sync_batchnorm)
        lower = [trainer.lower_step(views, 2) for views in local["lower"]]
        trainer.begin_cycle(local["hessian"])
        hvp = trainer._cycle.matvec(_direction(trainer)) if solver == "cg" else None  # type: ignore[union-attr]
        grads, stats = trainer.hypergradient(local["batch"])
        out[solver] = {
            "lower_losses": [s["pretext_loss"] for s in lower],
            "state": {k: v.clone() for k, v in trainer._lower_modules.state_dict().items()},
            "hvp": hvp,
            "grads": [g.detach().clone() for g in grads],
            "stats": stats,
        }
    return out


def _rank(rank: int, world: int, out: str, data: dict[str, Any]) -> None:
    D.init_from_env("cpu")
    results = {"synced": _run(data, rank, world), "local_bn": _run(data, rank, world, sync_batchnorm=False)}
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    root = tmp_path_factory.mktemp("ddp_hypergradient")
    data = _data()
    spawn_ranks(_rank, WORLD, str(root), data)
    ranks = [torch.load(Path(root) / f"rank{r}.pt") for r in range(WORLD)]
    return ranks, _run(data, 0, 1)


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.e2e
@pytest.mark.parametrize("solver", SOLVERS)
def test_ddp_hypergradient_equals_single_process_on_the_concatenated_batch(results, solver):
    ranks, single = results
    expected = single[solver]
    for rank in ranks:
        got = rank["synced"][solver]
        assert got["lower_losses"] == pytest.approx(expected["lower_losses"], abs=TOL)
        # theta, psi and the BatchNorm running statistics after two lower steps
        assert _max_diff(list(got["state"].values()), list(expected["state"].values())) < TOL
        assert _max_diff(got["grads"], expected["grads"]) < TOL  # phi part, then head part
        for key in ("loss_theta", "loss_phi", "hypergrad_norm", "solver_iters", "solver_hvps"):
            assert got["stats"][key] == pytest.approx(expected["stats"][key], abs=TOL), key
    for a, b in zip(ranks[0]["synced"][solver]["grads"], ranks[1]["synced"][solver]["grads"], strict=True):
        assert torch.equal(a, b)  # every rank takes the identical step


def test_ddp_hessian_vector_product_equals_single_process(results):
    """The curvature of the gathered SimCLR loss is not divided by the number of processes (the paper code's bug)."""
    ranks, single = results
    expected = single["cg"]["hvp"]
    for rank in ranks:
        torch.testing.assert_close(rank["synced"]["cg"]["hvp"], expected, rtol=0, atol=TOL)
    # the comparison is sharp: H matters here (CG's answer differs from the identity's by far more than TOL)
    assert _max_diff(single["cg"]["grads"], single["identity"]["grads"]) > 1e3 * TOL
    assert float(expected.norm()) > 0.1 * float(single["cg"]["stats"]["hypergrad_norm"])


def test_ranks_with_unsynchronised_batchnorm_stay_identical(results):
    """Without sync_batchnorm each rank normalises its own rows (so no parity with one process), but the ranks
    keep identical weights, running statistics and hypergradients (rank 0's buffers are broadcast, as DDP does)."""
    ranks, _ = results
    for solver in SOLVERS:
        first, second = (rank["local_bn"][solver] for rank in ranks)
        for key, value in first["state"].items():
            assert torch.equal(value, second["state"][key]), (solver, key)
        assert all(torch.equal(a, b) for a, b in zip(first["grads"], second["grads"], strict=True))
