import errno
import os
import stat
import time
from unittest import mock

import pytest
import torch

from bissl.utils.errors import BisslError, CheckpointError
from bissl.utils.io import atomic_open, load_torch, remove_stale_temp_files, save_json, save_torch


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
    with pytest.raises(CheckpointError, match=r"bad.pt is corrupted") as info:
        load_torch(bad)
    # Deleting a finished stage's file leads to "does not exist", then to "pass --overwrite": say that at once.
    assert "run the stage that wrote it again with --overwrite (in a study: bissl pipeline --overwrite)" in str(
        info.value
    )


def test_torch_disk_full_runtime_error_is_one_line_and_old_file_kept(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as a RuntimeError without errno: by its message, or by a file system left full."""
    path = tmp_path / "x.pt"
    save_torch({"v": 1}, path)
    with (
        mock.patch(
            "torch.save",
            side_effect=RuntimeError("PytorchStreamWriter failed writing file data/0: No space left on device"),
        ),
        pytest.raises(BisslError, match=r"disk full while writing .*x.pt.*old file kept"),
    ):
        save_torch({"v": 2}, path)
    full = mock.Mock(free=0)
    with (
        mock.patch(
            "torch.save", side_effect=RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")
        ),
        mock.patch("shutil.disk_usage", return_value=full),
        pytest.raises(BisslError, match=r"disk full while writing"),
    ):
        save_torch({"v": 2}, path)
    assert load_torch(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_other_runtime_errors_pass_through(tmp_path):
    with (
        mock.patch("torch.save", side_effect=RuntimeError("a bug")),
        pytest.raises(RuntimeError, match="a bug") as info,
    ):
        save_torch({"v": 2}, tmp_path / "x.pt")
    assert not isinstance(info.value, BisslError)
    assert list(tmp_path.iterdir()) == []


def test_atomic_files_get_the_umask_mode_and_keep_an_existing_mode(tmp_path):
    old = os.umask(0o022)
    try:
        save_json({"a": 1}, tmp_path / "new.json")
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
        os.umask(0o027)
        save_json({"a": 1}, tmp_path / "other.json")
        assert stat.S_IMODE((tmp_path / "other.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    (tmp_path / "new.json").chmod(0o600)
    save_json({"a": 2}, tmp_path / "new.json")
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o600


def test_remove_stale_temp_files(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".x.pt.ab12_xyz.tmp", tmp_path / "checkpoints" / ".last.pt.k9ofx_2a.tmp"]
    fresh = tmp_path / ".summary.json.q1w2e3r4.tmp"
    kept = [tmp_path / "x.pt", tmp_path / ".hidden.tmp", tmp_path / "notes.tmp", fresh]
    for path in (*stale, *kept):
        path.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    for path in (*stale, *kept[:-1]):
        os.utime(path, (hour_ago, hour_ago))
    assert remove_stale_temp_files(tmp_path) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert remove_stale_temp_files(tmp_path / "missing") == []


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_refused_pickle_is_not_called_corrupted(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match=r"evil.pt refused: it holds Python objects other than tensors") as info:
        load_torch(evil)
    assert "corrupted" not in str(info.value) and "\n" not in str(info.value)
    good = tmp_path / "good.pt"
    torch.save({"x": torch.ones(3)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"truncated.pt is corrupted"):
        load_torch(truncated)
