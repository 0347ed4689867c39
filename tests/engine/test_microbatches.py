import pytest
import torch
from torch import nn

from bissl.engine.microbatches import (
    BatchPlan,
    Objective,
    accumulate_gradients,
    cat_rows,
    take_rows,
    use_channels_last,
)
from bissl.utils.errors import ConfigError
from bissl.utils.precision import resolve_precision
from bissl.utils.seed import make_generator


def _fake_augment(rows: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """Two 'views' per row: the row's global index and a random number from the shard's generator."""
    noise = torch.rand(len(rows), generator=generator)
    return [torch.stack([rows, noise], dim=1), torch.stack([rows, -noise], dim=1)]


def _views_of_step(batch_size: int, world: int, accumulation: int, shards: int) -> dict[int, list[list[float]]]:
    """Every rank's micro-batches' views, keyed by the global row index they came from."""
    global_rows = torch.arange(batch_size, dtype=torch.float64)
    views: dict[int, list[list[float]]] = {}
    for rank in range(world):
        plan = BatchPlan(batch_size, world, rank, accumulation, shards)
        for shard, rows in plan.micro_batches(global_rows[rank::world]):  # the sampler's shard of this rank
            first, second = plan.augment(_fake_augment, rows, shard, 7, "views", 3)
            for a, b in zip(first.tolist(), second.tolist(), strict=True):
                views[int(a[0])] = [a, b]
    return views


def test_views_depend_on_augment_shards_not_on_processes_or_micro_batches():
    reference = _views_of_step(24, 1, 1, 4)
    assert sorted(reference) == list(range(24))  # every row once
    for world, accumulation in [(2, 1), (4, 1), (1, 2), (2, 2), (1, 4)]:
        assert _views_of_step(24, world, accumulation, 4) == reference, (world, accumulation)
    assert _views_of_step(24, 2, 1, 2) != reference  # another number of shards: other random views


def test_one_shard_draws_from_the_step_generator_as_before():
    rows = torch.arange(6.0)
    expected = _fake_augment(rows, make_generator(7, "views", 3))
    got = BatchPlan(6).augment(_fake_augment, rows, 0, 7, "views", 3)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_plan_rejects_batches_that_do_not_split():
    with pytest.raises(ConfigError, match=r"batch_size=10 must be divisible by processes x grad_accumulation = 1 x 3"):
        BatchPlan.create(10, accumulation=3, augment_shards=None, batch_key="batch_size")
    with pytest.raises(ConfigError, match=r"augment_shards=3 must be a multiple of .* = 2"):
        BatchPlan.create(12, accumulation=2, augment_shards=3, batch_key="batch_size")
    assert BatchPlan.create(12, accumulation=2, augment_shards=None, batch_key="b").augment_shards == 2


def test_rows_of_nested_batches():
    batch = [torch.arange(6), {"y": torch.arange(6) * 2}]
    parts = [take_rows(batch, t, 2) for t in range(2)]
    assert parts[1][0].tolist() == [1, 3, 5] and parts[1][1]["y"].tolist() == [2, 6, 10]
    joined = cat_rows(parts)
    assert joined[0].tolist() == [0, 2, 4, 1, 3, 5] and isinstance(joined, list)


def test_accumulated_gradients_equal_the_whole_batch_for_a_mean_loss():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    net = nn.Linear(3, 1).double()
    model = Objective(lambda batch: nn.functional.mse_loss(net(batch[0]), batch[1]), net=net)
    device = torch.device("cpu")
    whole = accumulate_gradients(model, [(x, y)], precision="fp32", device=device)
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    plan = BatchPlan(8, accumulation=2)
    split = accumulate_gradients(
        model, [rows for _, rows in plan.micro_batches((x, y))], precision="fp32", device=device
    )
    assert split.item() == pytest.approx(whole.item(), rel=1e-6)  # the reported loss is float32
    for param, grad in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-12, atol=1e-14)


def test_bf16_without_cuda_falls_back_to_fp32_with_a_warning():
    with pytest.warns(UserWarning, match="bf16 needs a CUDA device"):
        assert resolve_precision("bf16", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_resuming_with_another_number_of_shards_warns():
    with pytest.warns(UserWarning, match="set distributed.augment_shards=2 to keep them"):
        BatchPlan(8).check_resumed(2)


def test_channels_last_on_cpu_changes_the_layout_not_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(5, 3, 12, 12)
    expected = model(x)
    use_channels_last(model, True)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
