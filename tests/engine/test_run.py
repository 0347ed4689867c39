"""The run folder is never overwritten by accident and is locked while a run writes to it; SIGTERM checkpoints;
divergence beyond NaN names the step and the setting."""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bissl.config import AlignConfig, PretrainConfig, load_config
from bissl.engine.files import LOCK_FILE
from bissl.engine.guard import DivergenceGuard
from bissl.engine.run import RunLocked, open_run_dir
from bissl.stages.align import align
from bissl.stages.pretrain import pretrain
from bissl.utils.errors import ConfigError, NonFiniteError, RunTerminated
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


def test_a_non_finite_step_names_the_cycle_and_the_settings_of_its_level_and_rule():
    from bissl.bilevel.trainer import NonFiniteStepError
    from bissl.stages.align import _naming_the_settings

    cases = [
        ("bissl", "upper", r"a Hessian-vector product is NaN.*cycle 3, upper step 7.*upper.optim.lr.*bilevel.damping"),
        ("penalty", "upper", r"cycle 3, upper step 7\); lower upper.optim.lr or bilevel.penalty_rho"),
        ("bissl", "lower", r"cycle 3, lower step 7\); lower lower.optim.lr$"),
    ]
    for rule, level, message in cases:
        with pytest.raises(NonFiniteError, match=message), _naming_the_settings(rule):
            raise NonFiniteStepError("a Hessian-vector product is NaN/inf", level, cycle=3, step=7)
    with pytest.raises(NonFiniteError, match=r"^the weights diverged$"), _naming_the_settings("bissl"):
        raise NonFiniteError("the weights diverged")  # a hook's error (the divergence guard's) passes unchanged


def _sigterm_then(original, wait_s=8.0):
    """``original``, called after this process sent itself SIGTERM and waited ``wait_s`` (work that goes on)."""

    def call(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(wait_s)
        return original(*args, **kwargs)

    return call


def test_sigterm_during_work_without_state_stops_at_once(tiny_pretrained, tiny_align_overrides, tmp_path, monkeypatch):
    """Evaluation and a head warm-up hold nothing to checkpoint: SIGTERM stops them within seconds (they are redone)."""
    import importlib

    from bissl.config import EvaluateConfig
    from bissl.utils.errors import RunTerminated

    evaluate_module = importlib.import_module("bissl.stages.evaluate")  # bissl.stages.evaluate is also a function
    align_module = importlib.import_module("bissl.stages.align")
    monkeypatch.setattr(evaluate_module, "frozen_features", _sigterm_then(evaluate_module.frozen_features))
    cfg = load_config(EvaluateConfig, "evaluate_digits", ["downstream.data.image_size=8", "log.progress=false",
                      f"backbone={tiny_pretrained}", f"out_dir={tmp_path / 'eval'}"])  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(RunTerminated, match=r"during the evaluation \(evaluate: no state to save\); run the same"):
        evaluate_module.evaluate(cfg)
    assert time.perf_counter() - start < 6 and not (tmp_path / "eval" / "summary.json").exists()

    monkeypatch.setattr(align_module, "warm_up_head", _sigterm_then(align_module.warm_up_head))
    start = time.perf_counter()
    with pytest.raises(RunTerminated, match=r"during the head warm-up \(align"):
        align(load_config(AlignConfig, "align_digits", tiny_align_overrides))
    assert time.perf_counter() - start < 6 and not (tmp_path / "align" / "checkpoints").exists()


@pytest.mark.e2e
def test_sigterm_after_the_last_checkpoint_stops_the_caller_once_the_run_finished(tiny_pretrain_overrides, monkeypatch):
    from bissl.engine.run import Run
    from bissl.utils.errors import RunTerminated

    monkeypatch.setattr(Run, "finish", _sigterm_then(Run.finish, wait_s=0))
    with pytest.raises(RunTerminated, match=r"after pretrain finished in .*; run the same command to go on"):
        pretrain(_pretrain_cfg(tiny_pretrain_overrides))
    assert (Path(_pretrain_cfg(tiny_pretrain_overrides).out_dir) / "summary.json").is_file()


def test_sigterm_between_stages_exits_143_with_one_line(monkeypatch, capsys):
    """Outside a stage's loop (between the stages of a study, between trials) SIGTERM ends the command: exit 143."""
    import dataclasses

    from bissl import cli

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # pytest's own process must survive the old code
    try:
        verb = dataclasses.replace(cli.VERBS["evaluate"], run=lambda cfg, args: _sigterm_then(lambda: None, 5.0)())
        monkeypatch.setitem(cli.VERBS, "evaluate", verb)
        start = time.perf_counter()
        assert cli.main(["evaluate", "--backbone", "unused.pt"]) == 143
        assert time.perf_counter() - start < 4
        err = capsys.readouterr().err.strip()
        assert err == (
            "bissl evaluate: terminated (SIGTERM) between stages; finished stages are kept: "
            "run the same command to go on"
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["moved", "trailing slash", "relative"])
def test_resume_finds_the_run_however_its_folder_is_named(tmp_path, monkeypatch, where):
    """``out_dir`` says where the run is, not how it runs: a moved folder, or the same one named otherwise, resumes."""
    import torch

    from bissl.engine.run import Run

    first = PretrainConfig(out_dir=str(tmp_path / "run"), log={"tensorboard": False, "progress": False})
    net = torch.nn.Linear(2, 2)
    with pytest.raises(RunTerminated), Run.start("pretrain", first) as run:
        run.resume(net=net)
        run._terminated = True
        run.checkpoint(due=False, log_step=3, step=3)
    monkeypatch.chdir(tmp_path)
    out = {"moved": str(tmp_path / "moved"), "trailing slash": f"{tmp_path / 'run'}/", "relative": "run"}[where]
    if where == "moved":
        shutil.move(tmp_path / "run", tmp_path / "moved")
    with Run.start("pretrain", first.model_copy(update={"out_dir": out}), resume=True) as run:
        assert run.resume(net=torch.nn.Linear(2, 2))["step"] == 3


@pytest.mark.e2e
def test_an_error_starts_its_own_line_after_a_progress_bar(tmp_path, capsys):
    """The progress bar of a run that fails is closed (its line ended) before the error is printed."""
    import torch

    from bissl.engine.run import Run

    cfg = PretrainConfig(out_dir=str(tmp_path / "run"), log={"tensorboard": False, "progress": True})
    with pytest.raises(ValueError), Run.start("pretrain", cfg) as run:
        run.resume(net=torch.nn.Linear(1, 1))
        bar = run.progress(10, 0, "step")  # held, as the failing stage's frame holds it while the error is printed
        bar.update(3)
        raise ValueError("boom")
    assert capsys.readouterr().err.endswith("\n") and bar.disable  # closed
