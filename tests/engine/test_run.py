"""The run folder is never overwritten by accident and is locked while a run writes to it; SIGTERM checkpoints;
divergence beyond NaN names the step and the setting."""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bissl.config import AlignConfig, PretrainConfig, load_config
from bissl.engine.files import LOCK_FILE
from bissl.engine.guard import DivergenceGuard
from bissl.engine.run import RunLocked, open_run_dir
from bissl.stages.align import align
from bissl.stages.pretrain import pretrain
from bissl.utils.errors import ConfigError, NonFiniteError
from bissl.utils.io import load_torch


def _pretrain_cfg(overrides, *extra):
    return load_config(PretrainConfig, "pretrain_digits", [*overrides, *extra])


@pytest.mark.e2e
def test_finished_run_without_checkpoints_is_not_overwritten(tiny_pretrain_overrides):
    cfg = _pretrain_cfg(tiny_pretrain_overrides)
    result = pretrain(cfg)
    before = (result.out_dir / "backbone.pt").read_bytes()
    for path in (result.out_dir / "checkpoints").iterdir():
        path.unlink()
    with pytest.raises(ConfigError, match=r"holds a finished run .*--overwrite"):
        pretrain(cfg)
    assert (result.out_dir / "backbone.pt").read_bytes() == before
    assert pretrain(cfg, overwrite=True).finished


def test_a_users_own_files_are_never_overwritten(tmp_path, tiny_pretrain_overrides):
    (tmp_path / "config.yaml").write_text("my: own config\n")
    cfg = _pretrain_cfg(tiny_pretrain_overrides, f"out_dir={tmp_path}")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"holds files this run did not write \(config.yaml\)"):
            pretrain(cfg, overwrite=overwrite)
    assert (tmp_path / "config.yaml").read_text() == "my: own config\n"


def test_a_folder_is_locked_while_a_run_writes_to_it(tmp_path):
    cfg = PretrainConfig(out_dir=str(tmp_path / "run"))
    with open_run_dir(cfg.out_dir, cfg, resume=False, overwrite=False):
        with (
            pytest.raises(RunLocked, match=r"another run is writing to .*; wait for it"),
            open_run_dir(cfg.out_dir, cfg, resume=True, overwrite=False),
        ):
            pass
        with (tmp_path / "run" / LOCK_FILE).open() as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open_run_dir(cfg.out_dir, cfg, resume=True, overwrite=False) as has_state:  # released at exit
        assert not has_state


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.write_text("x"), "is a file, not a folder"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), r"did not write \(notes.txt\)"),
    ],
)
def test_bad_out_dirs_are_one_line(tmp_path, setup, message):
    out = tmp_path / "out"
    setup(out)
    cfg = PretrainConfig(out_dir=str(out))
    with pytest.raises(ConfigError, match=message), open_run_dir(out, cfg, resume=False, overwrite=False):
        pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir_is_one_line(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    cfg = PretrainConfig(out_dir=str(out / "run"))
    with (
        pytest.raises(ConfigError, match="cannot write to out_dir"),
        open_run_dir(cfg.out_dir, cfg, resume=False, overwrite=False),
    ):
        pass


@pytest.mark.e2e
def test_pretraining_that_blows_up_without_nan_is_stopped(tiny_pretrain_overrides):
    cfg = _pretrain_cfg(tiny_pretrain_overrides, "optim.lr=1e6", "optim.grad_clip=null", "optim.weight_decay=0")
    with pytest.raises(NonFiniteError, match=r"(norm of the weights|weights became NaN|pretext loss).*lower optim.lr"):
        pretrain(cfg)


def test_an_upper_level_blow_up_names_the_upper_setting(tiny_align_overrides, tiny_pretrained):
    cfg = load_config(
        AlignConfig, "align_digits",
        [*tiny_align_overrides, "upper.optim.lr=1e8", "bilevel.upper_grad_clip=null"],
    )  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"upper.*lower upper.optim.lr"):
        align(cfg)


def test_guard_ranges():
    guard = DivergenceGuard("loss", "optim.lr", warmup=2)
    guard.check(0, 2.0)
    guard.check(1, 3.0)
    guard.check(2, 300.0)  # 100 x (1 + 3) = 400 is the limit
    with pytest.raises(NonFiniteError, match=r"loss at step 3 is 500, over 100x .*lower optim.lr"):
        guard.check(3, 500.0)
    with pytest.raises(NonFiniteError, match=r"loss at step 4 became nan; lower optim.lr"):
        guard.check(4, float("nan"))


@pytest.mark.e2e
def test_sigterm_writes_a_checkpoint_and_exits_with_a_message(tmp_path, tiny_pretrain_overrides):
    out = tmp_path / "run"
    args = [*tiny_pretrain_overrides, "epochs=200", f"out_dir={out}"]
    cmd = [sys.executable, "-m", "bissl.cli", "pretrain", "--config", "pretrain_digits", "--threads", "1", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be terminated"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr and "--resume" in stderr and "Traceback" not in stderr
    step = load_torch(out / "checkpoints" / "last.pt")["step"]
    assert step > 0 and not (out / "summary.json").exists()


def test_torn_temporary_files_of_a_killed_run_are_removed_at_start(tmp_path):
    cfg = PretrainConfig(out_dir=str(tmp_path / "run"))
    with open_run_dir(cfg.out_dir, cfg, resume=False, overwrite=False):
        pass
    torn = tmp_path / "run" / "checkpoints" / ".last.pt.abcd1234.tmp"
    torn.parent.mkdir()
    torn.write_bytes(b"half a checkpoint")
    with open_run_dir(cfg.out_dir, cfg, resume=True, overwrite=False):
        assert not torn.exists()


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chattr"), reason="needs root and chattr")
def test_immutable_out_dir_is_one_line(tmp_path):
    out = tmp_path / "immutable"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("this file system does not support the immutable attribute")
    try:
        cfg = PretrainConfig(out_dir=str(out))
        with (
            pytest.raises(ConfigError, match="cannot write to out_dir"),
            open_run_dir(out, cfg, resume=False, overwrite=False),
        ):
            pass
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)


def test_a_non_finite_upper_step_names_the_cycle_and_the_settings():
    from bissl.stages.align import _naming_the_step

    message = r"a Hessian-vector product is NaN.*cycle 3, upper step 7.*upper.optim.lr"
    with pytest.raises(NonFiniteError, match=message), _naming_the_step(3, 7):
        raise NonFiniteError("a Hessian-vector product is NaN/inf")
