"""Batches whose targets do not stack: per-row lists split and join as rows, view lists as parts."""

import torch
from fake_detection import FakeDetection

from bissl.engine.microbatches import BatchPlan, Rows, cat_rows, take_rows
from bissl.engine.sampling import BatchStream


def test_rows_and_lists_of_dicts_split_as_rows_view_lists_as_parts():
    images = torch.arange(6.0)[:, None]
    targets = [{"boxes": torch.full((i, 4), float(i))} for i in range(6)]
    images_part, targets_part = take_rows((images, targets), 1, 2)
    assert images_part.flatten().tolist() == [1.0, 3.0, 5.0]
    assert isinstance(targets_part, Rows) and [len(t["boxes"]) for t in targets_part] == [1, 3, 5]
    views = [torch.arange(6.0), torch.arange(6.0) + 10]  # a pretext batch: a list of view tensors
    assert [v.tolist() for v in take_rows(views, 0, 3)] == [[0.0, 3.0], [10.0, 13.0]]
    rows = Rows(["a", "b", "c", "d"])
    assert take_rows(rows, 0, 2) == ["a", "c"] and isinstance(take_rows(rows, 0, 2), Rows)
    joined = cat_rows([take_rows((images, targets), s, 2) for s in range(2)])
    assert isinstance(joined[1], Rows) and len(joined[1]) == 6 and joined[0].shape == (6, 1)


def test_micro_batches_and_augment_shards_keep_targets_with_their_images():
    images = torch.arange(8.0)[:, None]
    targets = [{"id": torch.tensor(i)} for i in range(8)]
    plan = BatchPlan(batch_size=8, accumulation=2, augment_shards=4)
    for _, (x, t) in plan.micro_batches((images, targets)):
        assert [int(r["id"]) for r in t] == x.flatten().long().tolist()
    out = plan.augment(lambda rows, g: (rows[0], Rows(rows[1])), (images, targets), 0, 0, "tag", 0)
    assert [int(r["id"]) for r in out[1]] == out[0].flatten().long().tolist()


def test_batch_stream_uses_the_dataset_collate():
    stream = BatchStream(FakeDetection("val", size=8), 4, seed=0)
    images, targets = next(stream)
    assert images.shape == (4, 3, 64, 64) and isinstance(targets, list) and set(targets[0]) >= {"boxes", "labels"}
