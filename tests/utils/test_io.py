import errno
from unittest import mock

import pytest
import torch

from bissl.utils.errors import BisslError, CheckpointError
from bissl.utils.io import atomic_open, load_torch, save_torch


def test_atomic_save_roundtrip_weights_only(tmp_path):
    path = tmp_path / "a" / "x.pt"
    save_torch({"w": torch.arange(3), "name": "x"}, path)
    loaded = load_torch(path)
    assert loaded["name"] == "x" and torch.equal(loaded["w"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]  # no temp file left behind


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "x.pt"
    save_torch({"v": 1}, path)
    with pytest.raises(RuntimeError), atomic_open(path) as handle:
        handle.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert load_torch(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_disk_full_is_one_clear_error_and_old_file_kept(tmp_path):
    path = tmp_path / "x.pt"
    save_torch({"v": 1}, path)
    with (
        mock.patch("os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")),
        pytest.raises(BisslError, match=r"disk full while writing .*x.pt.*old file kept"),
    ):
        save_torch({"v": 2}, path)
    assert load_torch(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_missing_and_corrupted_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_torch(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad.pt is corrupted"):
        load_torch(bad)
