import pytest

from bissl.engine.sampling import EpochBatchSampler, steps_per_epoch


def test_order_depends_only_on_seed_and_epoch():
    a = list(EpochBatchSampler(20, 4, seed=1, epoch=3))
    b = list(EpochBatchSampler(20, 4, seed=1, epoch=3))
    c = list(EpochBatchSampler(20, 4, seed=1, epoch=4))
    assert a == b and a != c
    assert sorted(i for batch in a for i in batch) == list(range(20))


def test_mid_epoch_start_continues_the_same_order():
    full = list(EpochBatchSampler(22, 4, seed=0, epoch=0))
    assert len(full) == steps_per_epoch(22, 4) == 5  # drop_last
    assert list(EpochBatchSampler(22, 4, seed=0, epoch=0, start=2)) == full[2:]


def test_rank_shards_union_is_the_global_batch():
    whole = list(EpochBatchSampler(16, 8, seed=5, epoch=0))
    ranks = [list(EpochBatchSampler(16, 8, seed=5, epoch=0, rank=r, world_size=2)) for r in range(2)]
    for step, batch in enumerate(whole):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)
    with pytest.raises(ValueError, match="divisible"):
        EpochBatchSampler(16, 5, seed=0, epoch=0, world_size=2)


def test_batch_stream_resumes_at_its_position():
    import torch

    from bissl.engine.sampling import BatchStream

    data = torch.utils.data.TensorDataset(torch.arange(10))
    whole = [next(BatchStream(data, 3, seed=2, position=k))[0].tolist() for k in range(7)]
    stream = BatchStream(data, 3, seed=2)
    assert [next(stream)[0].tolist() for _ in range(7)] == whole
    assert stream.position == 7 and stream.epoch == 2
    resumed = BatchStream(data, 3, seed=2, position=4)
    assert [next(resumed)[0].tolist() for _ in range(3)] == whole[4:]


def test_batch_stream_ranks_share_each_global_batch():
    import torch

    from bissl.engine.sampling import BatchStream

    data = torch.utils.data.TensorDataset(torch.arange(10))
    whole = BatchStream(data, 4, seed=3)
    ranks = [BatchStream(data, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # across an epoch boundary (2 batches per epoch)
        expected = next(whole)[0]
        assert all(torch.equal(next(ranks[r])[0], expected[r::2]) for r in range(2))


@pytest.mark.e2e
def test_batch_stream_with_workers_reads_the_same_batches_and_follows_a_moved_position():
    import torch

    from bissl.engine.sampling import BatchStream

    data = torch.utils.data.TensorDataset(torch.arange(10))
    plain = BatchStream(data, 3, seed=4)
    expected = [next(plain)[0].tolist() for _ in range(8)]  # 3 batches per epoch: crosses two epoch boundaries
    workers = BatchStream(data, 3, seed=4, num_workers=2)
    assert [next(workers)[0].tolist() for _ in range(5)] == expected[:5]
    workers.position = 2  # e.g. a resumed state: the stream restarts there
    assert [next(workers)[0].tolist() for _ in range(6)] == expected[2:]
