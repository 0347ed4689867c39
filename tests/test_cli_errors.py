"""Bad input and faults end the command with ONE line on stderr naming the problem and the fix (exit code 2), never a
traceback: unreadable config files and records, unusable output folders, numbers torch cannot hold, a backbone
that cannot be built or does not fit its pretext head, allocation failures, an absurd thread count."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from bissl.cli import main
from bissl.utils.errors import out_of_memory
from bissl.utils.io import load_torch, save_torch
from conftest import TINY_PRETRAIN


def _one_line(capsys: pytest.CaptureFixture[str], verb: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"bissl {verb}: error: "), err
    return err


def _run_folder(tmp_path: Path, record: bytes) -> Path:
    """A run folder (a lock file marks it) whose config.yaml record holds ``record``."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").touch()
    (out / "config.yaml").write_bytes(record)
    return out


def _symlink_loop(tmp_path: Path) -> Path:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path / "loop" / "study"


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "taken").write_text("a file")
    return tmp_path / "taken"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("verb", "args", "expected"),
    [
        ("pretrain", lambda t: ["--config", str(t / "binary.yaml")], r"binary\.yaml is not a text \(YAML\) file"),
        ("pretrain", lambda t: ["--resume", "--out-dir", str(_run_folder(t, b"\x00\xff\xfe\x80"))],
         r"run/config\.yaml is not a readable config record; restore it, or pass --overwrite"),
        ("pretrain", lambda t: ["--resume", "--out-dir", str(_run_folder(t, b"seed: [0\n"))],
         r"run/config\.yaml is not a readable config record"),
        ("pipeline", lambda t: ["--out-dir", str(_a_file(t))], r"out_dir .*taken is a file, not a folder"),
        ("pipeline", lambda t: ["--out-dir", str(_symlink_loop(t))],
         r"cannot write to out_dir .*loop/study \(Too many levels of symbolic links\); choose a writable out_dir"),
        ("pipeline", lambda t: ["--out-dir", str(t / ("a" * 300))], r"out_dir .* \(File name too long\)"),
        ("pretrain", lambda t: ["backbone.kwargs.width=0"], r"backbone 'small_cnn': small_cnn needs width > 0.*kwargs"),
        ("pretrain", lambda t: ["optim.lr=1e39"], r"'optim\.lr': beyond float32's range .*choose a smaller value"),
        ("pretrain", lambda t: ["seed=99999999999999999999999"], r"'seed': beyond a 64-bit integer's range"),
        ("pretrain", lambda t: ["backbone.kwargs.width=1000000"],
         r"out of memory \([\d,.]+ GiB asked for at once\); lower the batch size, data\.image_size or the backbone's"),
    ],
    ids=["binary config", "binary record", "bad yaml record", "out-dir a file", "symlink loop", "300 characters",
         "width 0", "lr 1e39", "huge seed", "allocation"],
)  # fmt: skip
def test_bad_input_is_one_line(tmp_path, capsys, verb, args, expected):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    argv = [verb, *(TINY_PRETRAIN if verb == "pretrain" else []), *args(tmp_path)]
    if verb == "pretrain" and "--out-dir" not in argv:
        argv += ["--out-dir", str(tmp_path / "fresh")]
    assert main(argv) == 2
    assert re.search(expected, _one_line(capsys, verb))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert main(["pipeline", "--out-dir", str(tmp_path / "ro")]) == 2
    assert "cannot write to out_dir" in _one_line(capsys, "pipeline")


def test_align_from_a_folder_whose_pretext_head_has_another_width(
    tmp_path, tiny_pretrained, tiny_align_overrides, capsys
):
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_pretrained, mixed)
    head = load_torch(mixed / "pretext_head.pt")
    key = next(k for k, v in head["state_dict"].items() if v.ndim == 2)
    head["state_dict"][key] = torch.zeros(head["state_dict"][key].shape[0], 3)  # as from a backbone 3 wide
    save_torch(head, mixed / "pretext_head.pt")
    assert main(["align", *tiny_align_overrides, f"pretrained={mixed}"]) == 2
    err = _one_line(capsys, "align")
    assert f"{mixed / 'pretext_head.pt'} does not fit the backbone" in err and "size mismatch" in err
    assert "point pretrained= at one pretrain run folder" in err


def test_thread_counts_beyond_4_per_core_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--threads", "100000"])
    assert exc.value.code == 2
    assert f"--threads: at most {4 * os.cpu_count()} (4 per core), got '100000'" in capsys.readouterr().err


def test_allocation_failures_name_the_memory_asked_for():
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**50, dtype=torch.uint8)
    assert "(1,048,576.0 GiB asked for at once)" in out_of_memory(cpu.value)
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0; 79.1 GiB total capacity)")
    assert out_of_memory(cuda).startswith("out of memory (2.5 GiB asked for at once)")
    assert out_of_memory(MemoryError()).startswith("out of memory; lower")
    assert out_of_memory(RuntimeError("shapes cannot be multiplied")) is None


def test_overrides_may_follow_options(tmp_path, capsys):
    """``bissl pretrain --out-dir X epochs=2`` reads the override (argparse alone calls it unrecognized)."""
    assert main(["pretrain", "--out-dir", str(tmp_path / "x"), "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in _one_line(capsys, "pretrain")
    with pytest.raises(SystemExit):
        main(["pretrain", "epochs=1", "--out-dir", str(tmp_path / "x"), "seed=1", "stray", "--nope"])
    assert "unrecognized arguments: stray --nope" in capsys.readouterr().err
