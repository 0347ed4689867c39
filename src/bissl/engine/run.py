"""One stage run, written once for every stage: device and ranks, the run folder, resume, logs, checkpoints, the
divergence guard, SIGTERM and the summary.

A stage reads like its paper loop; everything around the loop is a :class:`Run`::

    with Run.start("pretrain", cfg, resume=resume) as run:
        ...build the models...
        step = run.resume(backbone=backbone, optimizer=optimizer)["step"]     # 0 when fresh
        while step < stop:
            ...one step...
            guard.check(step, loss, backbone.parameters())                    # NaN/inf, loss or weights blown up
            run.checkpoint(due=step % per_epoch == 0, step=step)               # also saves and stops on SIGTERM
        return run.finish({"metrics": metrics}, exports)

SIGTERM stops a run at its next checkpoint call (saving it); inside :meth:`Run.interruptible` (work that holds no
state worth saving: evaluation, a head warm-up redone on resume) at once; one that arrives after the last
checkpoint stops the caller (e.g. a study) once the run has finished.

The folder (:func:`open_run_dir`) is locked while the run writes to it and is never overwritten by accident: a
finished run, another run's checkpoint or files the run did not write are refused unless ``overwrite`` is set.
Under ``torchrun`` rank 0 alone writes files; the other ranks get no-op loggers.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from pydantic import BaseModel
from tqdm.auto import tqdm

from bissl.config import to_yaml
from bissl.distributed import all_reduce_sum, barrier, init_from_env, is_main, main_only, on_main
from bissl.engine.checkpoint import load_state, save_state
from bissl.engine.files import CONFIG_FILE, LOCK_FILE, RUN_FILES, STATE_FILE, SUMMARY_FILE
from bissl.engine.logger import MetricLogger
from bissl.engine.names import validate_names
from bissl.engine.run_record import RESUMABLE_KEYS, require_same_config, write_summary
from bissl.utils.errors import BisslError, ConfigError, RunTerminated
from bissl.utils.io import atomic_write, remove_stale_temp_files
from bissl.utils.precision import resolve_precision

log = logging.getLogger("bissl.run")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class RunLocked(BisslError):
    """Another process is writing to the run folder."""


def _foreign(out: Path, run_folder: bool) -> list[str]:
    """Entries of ``out`` that no bissl stage wrote: everything in a folder that never held a run (a user's own
    ``config.yaml`` included), else the names no stage writes (atomic writers' ``.*.tmp`` files excepted)."""
    ours = RUN_FILES if run_folder else {LOCK_FILE}
    return sorted(
        p.name for p in out.iterdir() if p.name not in ours and not (p.name.startswith(".") and p.suffix == ".tmp")
    )


@contextlib.contextmanager
def open_run_dir(out_dir: str | Path, config: BaseModel, *, resume: bool, overwrite: bool) -> Iterator[bool]:
    """Lock ``out_dir`` for this run and record ``config`` in it; yields whether a checkpoint is to be resumed.

    Refused (one line naming the fix) unless ``overwrite``: a folder that is not a folder or is not writable; a
    finished run (``summary.json``); another run's checkpoint without ``resume``; a checkpoint or folder made with
    another config; files the run did not write. ``overwrite`` deletes the earlier run's files (never others).
    """
    out = Path(out_dir)
    run_folder = any((out / name).exists() for name in (LOCK_FILE, STATE_FILE, SUMMARY_FILE))
    make_out_dir(out)
    lock = (out / LOCK_FILE).open("a")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"another run is writing to {out}; wait for it to end or choose another out_dir") from None
        try:
            has_state = _check_folder(out, config, resume=resume, overwrite=overwrite, run_folder=run_folder)
        except BisslError:
            if not run_folder:  # leave a refused folder as it was
                (out / LOCK_FILE).unlink(missing_ok=True)
            raise
        remove_stale_temp_files(out, older_than_s=0)  # torn writes of a killed run (the folder is ours: locked)
        atomic_write(out / CONFIG_FILE, lambda f: f.write(to_yaml(config)), mode="w")
        yield has_state


def make_out_dir(out: Path) -> None:
    """Create ``out`` (and its parents) and check it takes files: a file, an unwritable folder, a name too long or
    a symlink loop is one line naming it."""
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out_dir {out} is a file, not a folder; choose another out_dir")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write to out_dir {out} ({exc.strerror}); choose a writable out_dir") from None


def clear_run_dir(out: str | Path) -> None:
    """Delete the files a stage wrote into ``out`` (never others): what ``overwrite`` does before a run."""
    for name in RUN_FILES - {LOCK_FILE}:
        path = Path(out) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _check_folder(out: Path, config: BaseModel, *, resume: bool, overwrite: bool, run_folder: bool) -> bool:
    has_state = (out / STATE_FILE).is_file()
    if overwrite and run_folder:
        clear_run_dir(out)
        return False
    if (out / SUMMARY_FILE).is_file():
        raise ConfigError(f"{out} holds a finished run (summary.json); choose another out_dir, or pass --overwrite")
    foreign = _foreign(out, run_folder)
    if foreign:
        raise ConfigError(
            f"{out} holds files this run did not write ({', '.join(foreign[:3])}); choose an empty or new out_dir"
        )
    if has_state and not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another out_dir")
    require_same_config(out, config)
    return has_state


class Run:
    """The plumbing of one stage run (module docstring). Use :meth:`start`."""

    def __init__(self, stage: str, cfg: Any, out: Path, has_state: bool, progress: bool) -> None:
        self.stage = stage
        self.cfg = cfg
        self.out = out
        self.has_state = has_state
        self.device = init_from_env(cfg.device)
        self.precision = resolve_precision(getattr(cfg, "precision", "fp32"), self.device)
        self.config_dict = cfg.model_dump(mode="json")
        self.start_time = time.perf_counter()
        self._logger: MetricLogger | None = None
        self._log_step: int | None = None  # where a resumed run's logs are cut back to
        self._progress = progress
        self._tracked: dict[str, Stateful] = {}
        self._terminated = False
        self._interruptible: str | None = None  # what the run is doing while SIGTERM stops it at once
        self._bars: list[tqdm] = []

    @classmethod
    @contextlib.contextmanager
    def start(cls, stage: str, cfg: Any, *, resume: bool = False, overwrite: bool = False) -> Iterator[Run]:
        """Validate ``cfg``'s names, join the ranks, open (lock) the folder; on exit close the logs and unlock."""
        validate_names(cfg)
        init_from_env(cfg.device)
        with contextlib.ExitStack() as stack:
            has_state = on_main(
                lambda: stack.enter_context(open_run_dir(cfg.out_dir, cfg, resume=resume, overwrite=overwrite))
            )
            run = cls(stage, cfg, Path(cfg.out_dir), has_state, cfg.log.progress and is_main())
            previous = _install_sigterm(run)
            try:
                yield run
            finally:
                signal.signal(signal.SIGTERM, previous)
                for bar in run._bars:  # ends the bar's line: an error printed next starts its own
                    bar.close()
                if run._logger is not None:
                    run._logger.close()
            if run._terminated:
                raise RunTerminated(
                    f"terminated (SIGTERM) after {stage} finished in {run.out}; run the same command to go on"
                )

    # ------------------------------------------------------------------------------------------ resume, checkpoints
    def resume(self, **objects: Stateful) -> dict[str, Any]:
        """Track ``objects`` (saved in every checkpoint); when resuming, load them and return the saved counters."""
        self._tracked = objects
        if not self.has_state:
            return {}
        state = load_state(self.out / STATE_FILE, self.config_dict, ignore=RESUMABLE_KEYS)
        for name, obj in objects.items():
            obj.load_state_dict(state[name])
        counters = {k: v for k, v in state.items() if k not in objects}
        self._log_step = int(counters.get("log_step", 0))
        log.info("resumed %s at %s", self.out, {k: v for k, v in counters.items() if isinstance(v, int)})
        return counters

    @property
    def logger(self) -> MetricLogger:
        """The run's metric logger (rank 0; a no-op elsewhere), opened at first use: after :meth:`resume`, so a
        resumed run's logs are cut back to its checkpoint."""
        if self._logger is None:
            step = self._log_step
            self._logger = main_only(
                lambda: MetricLogger(self.out, tensorboard=self.cfg.log.tensorboard, resume_step=step)
            )
        return self._logger

    def checkpoint(self, *, due: bool = True, log_step: int, **counters: Any) -> None:
        """Save the tracked objects and ``counters`` when ``due`` (or when SIGTERM arrived: then stop the run).

        ``log_step`` is the step the logs have reached: a resumed run cuts its logs back to it.
        """
        terminated = self._terminated_on_any_rank()
        if not (due or terminated):
            return
        if is_main():
            state = {name: obj.state_dict() for name, obj in self._tracked.items()}
            save_state(self.out / STATE_FILE, {**state, **counters, "log_step": log_step}, self.config_dict)
        if terminated:
            barrier()
            raise RunTerminated(
                f"terminated (SIGTERM) at {self.stage} step {log_step}; checkpoint saved in {self.out}: "
                "run the same command with --resume to continue"
            )

    @contextlib.contextmanager
    def interruptible(self, what: str) -> Iterator[None]:
        """While inside, SIGTERM stops the run at once: ``what`` (e.g. "the head warm-up") holds no state worth a
        checkpoint, and a resumed run does it again."""
        self._interruptible = what
        try:
            if self._terminated:
                _stop_during(self)
            yield
        finally:
            self._interruptible = None

    def _terminated_on_any_rank(self) -> bool:
        return bool(all_reduce_sum(float(self._terminated)).item() > 0)

    # ------------------------------------------------------------------------------------------ logs and progress
    def log(self, step: int, tag: str, values: dict[str, float]) -> None:
        self.logger.log(step, tag, values)

    def progress(self, total: int, initial: int, unit: str) -> tqdm:
        bar = tqdm(total=total, initial=initial, desc=self.stage, unit=unit, disable=not self._progress)
        self._bars.append(bar)
        return bar

    # ------------------------------------------------------------------------------------------ the end
    def finish(self, summary: dict[str, Any], exports: Iterable[Callable[[Path], None]] = ()) -> Path:
        """Write the exports (rank 0), then ``summary.json`` last (its presence marks the run finished)."""
        full = {"stage": self.stage, **summary, "wall_time_s": time.perf_counter() - self.start_time}

        def write() -> Path:
            for export in exports:
                export(self.out)
            return write_summary(self.out, full)

        path = on_main(write)
        barrier()
        return path


def _install_sigterm(run: Run) -> Any:
    """On SIGTERM, ask ``run`` to checkpoint and stop at its next checkpoint call (main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        run._terminated = True
        if run._interruptible is not None:
            _stop_during(run)
        log.warning("SIGTERM: %s will checkpoint and stop after this step", run.stage)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return signal.getsignal(signal.SIGTERM)


def _stop_during(run: Run) -> None:
    raise RunTerminated(
        f"terminated (SIGTERM) during {run._interruptible} ({run.stage}: no state to save); "
        "run the same command again to continue"
    )
