"""The process-group helpers: no-ops in one process; with two gloo processes (spawned, loopback), the same results
as one process on the concatenated data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bissl.distributed import process as D
from helpers.ranks import spawn_ranks

WORLD = 2


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_from_env("cpu") == torch.device("cpu")
    assert (D.world(), D.rank(), D.is_main()) == (1, 0, True)
    rows = torch.arange(5.0)
    assert D.gather_shards(rows) is rows and D.shard_dataset(rows) is rows  # type: ignore[arg-type]
    assert D.on_main(lambda: 3) == 3 and D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.all_reduce_mean(torch.tensor(2.0)).item() == 2.0
    module = nn.Linear(2, 2)
    assert D.wrap_ddp(module, torch.device("cpu"), sync_batchnorm=True) is module and D.unwrap(module) is module
    assert D.main_only(lambda: "logger") == "logger"
    D.require_in_sync(module, "x")
    D.barrier()
    D.cleanup()


def test_convert_sync_batchnorm_keeps_parameters_and_state():
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12)))
    net.eval()
    params = list(net.parameters())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    D.convert_sync_batchnorm(net, torch.device("cpu"))
    assert isinstance(net[1], D.GlobalBatchNorm) and isinstance(net[2][1], D.GlobalBatchNorm)
    assert list(net.parameters()) == params and not net[1].training  # same Parameter objects: optimizers keep them
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    x = torch.randn(4, 1, 2, 2)
    net.train()
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(net[1].state_dict())
    hidden = net[0](x)
    torch.testing.assert_close(net[1](hidden), plain(hidden))  # without a process group: a plain BatchNorm


def _bn_outputs(bn: nn.Module, x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient, weight gradient and input HVP of ``sum(bn(x) * v)`` (direction ``u``)."""
    x = x.clone().requires_grad_(True)
    loss = (bn(x) * v).sum()
    g_x, g_w = torch.autograd.grad(loss, (x, bn.weight), create_graph=True)
    (h_x,) = torch.autograd.grad((g_x * u).sum(), x)
    return {"out": bn(x).detach(), "grad_x": g_x.detach(), "grad_w": g_w.detach(), "hvp_x": h_x}


def _helpers_rank(rank: int, world: int, out: str, data: dict[str, torch.Tensor]) -> None:
    assert D.init_from_env("cpu") == torch.device("cpu") and (D.world(), D.rank()) == (world, rank)
    results: dict[str, object] = {}
    items = torch.arange(7) * 10  # 7 items over 2 ranks: shards of 4 and 3
    shard = [int(i) for i in D.shard_dataset(items)]  # type: ignore[arg-type]
    results["gathered"] = D.gather_shards(torch.tensor(shard) + 1)
    results["mean"] = D.all_reduce_mean(torch.tensor(float(rank)))
    in_place = [torch.full((2, 3), float(rank)), torch.tensor([rank, 2.0 * rank], dtype=torch.float64)]
    D.all_reduce_mean_(in_place)
    results["mean_"] = in_place
    module = nn.BatchNorm1d(2)
    module.running_mean.fill_(rank + 1.0)
    module.num_batches_tracked.fill_(rank + 5)
    D.broadcast_buffers(module)
    results["buffers"] = module.state_dict()
    rows = torch.full((2, 1), float(rank + 1), requires_grad=True)
    gathered = D.all_gather_rows(rows)
    (grad,) = torch.autograd.grad((gathered**3).sum() * (rank + 1), rows, create_graph=True)
    (hess,) = torch.autograd.grad(grad.sum(), rows)
    results["gather"] = (gathered.detach(), grad.detach(), hess)
    try:
        D.on_main(lambda: 1 / 0)
    except ZeroDivisionError:
        results["raised"] = True
    bn = D.convert_sync_batchnorm(nn.BatchNorm2d(3).double(), torch.device("cpu"))
    part = slice(rank, None, world)
    results["bn"] = _bn_outputs(bn, data["x"][part], data["v"][part], data["u"][part])
    results["bn_state"] = {k: v.clone() for k, v in bn.state_dict().items()}
    torch.manual_seed(rank)
    with pytest.raises(RuntimeError, match="the test module differs between ranks"):
        D.require_in_sync(nn.Linear(2, 2), "the test module")
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.e2e
def test_two_processes_gather_reduce_and_batchnorm_equal_one_process(tmp_path: Path):
    torch.manual_seed(0)
    data = {name: torch.randn(6, 3, 2, 2, dtype=torch.float64) for name in ("x", "v", "u")}
    spawn_ranks(_helpers_rank, WORLD, str(tmp_path), data)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    bn = nn.BatchNorm2d(3).double()
    # rank r holds rows r::2; the single process sees them in the order [rank 0's, rank 1's]
    order = torch.cat([torch.arange(6)[r::WORLD] for r in range(WORLD)])
    expected = _bn_outputs(bn, *(data[k][order] for k in ("x", "v", "u")))
    for r, result in enumerate(ranks):
        assert result["gathered"].tolist() == [10 * i + 1 for i in range(7)]  # dataset order, no padding
        assert result["mean"].item() == 0.5 and result["raised"]
        assert result["mean_"][0].eq(0.5).all() and result["mean_"][1].tolist() == [0.5, 1.0]
        assert result["buffers"]["running_mean"].tolist() == [1.0, 1.0]  # rank 0's
        assert result["buffers"]["num_batches_tracked"].item() == 5
        # sum over ranks q of (q + 1) * sum(gathered^3): d/dx = 3 x^2 * (1 + 2), d2/dx2 = 6 x * 3 for this rank's x
        gathered, grad, hess = result["gather"]
        assert gathered.flatten().tolist() == [1.0, 1.0, 2.0, 2.0]
        assert grad.flatten().tolist() == [9.0 * (r + 1) ** 2] * 2 and hess.flatten().tolist() == [18.0 * (r + 1)] * 2
        rows = slice(r * 3, (r + 1) * 3)
        for key in ("out", "grad_x", "hvp_x"):  # gradients flow through both ranks' statistics, twice
            torch.testing.assert_close(result["bn"][key], expected[key][rows], rtol=1e-10, atol=1e-12)
        for key, value in bn.state_dict().items():  # running statistics of the whole batch
            torch.testing.assert_close(result["bn_state"][key], value, rtol=1e-10, atol=1e-12)
    # the weight gradient is each rank's share; DDP sums (averages) the shares
    torch.testing.assert_close(sum(r["bn"]["grad_w"] for r in ranks), expected["grad_w"], rtol=1e-10, atol=1e-12)
