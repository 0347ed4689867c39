"""Metric logging to JSON lines, CSV (long format) and, when installed, TensorBoard.

Every record is ``(step, tag, name, value)``. On resume the files are cut back to the resumed step,
so a resumed run's logs read exactly like an uninterrupted run's.

Failures: ``metrics.jsonl`` and ``metrics.csv`` are the record of a run, so a full disk while appending to them
is one :class:`BisslError` line. TensorBoard is a convenience view of the same numbers: when its writer fails
(full disk included) the logger warns once and goes on without it, and CSV/JSON keep working.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bissl.engine.files import METRICS_CSV_FILE, METRICS_JSONL_FILE, TENSORBOARD_DIR
from bissl.utils.errors import BisslError
from bissl.utils.io import atomic_write


class MetricLogger:
    """Writes ``metrics.jsonl`` and ``metrics.csv`` under ``out_dir`` (and ``tb/`` for TensorBoard)."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / METRICS_JSONL_FILE
        self.csv_path = self.out_dir / METRICS_CSV_FILE
        self._truncate(resume_step)
        self._writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    "tensorboard is not installed; logging to CSV/JSON only (pip install 'bissl[tensorboard]')",
                    stacklevel=2,
                )
            else:
                _quiet_writer_thread()
                with self._tensorboard():
                    self._writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=resume_step)

    @contextlib.contextmanager
    def _tensorboard(self) -> Iterator[None]:
        """Run a TensorBoard call; on failure warn once, drop the writer and keep logging to CSV/JSON."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            writer, self._writer = self._writer, None
            if writer is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()
            reason = " ".join(str(exc).split()) or type(exc).__name__
            warnings.warn(
                f"TensorBoard logging to {self.out_dir / 'tb'} failed ({reason}); continuing with CSV/JSON only "
                "(free space, or set log.tensorboard=false)",
                stacklevel=3,
            )

    def _truncate(self, resume_step: int | None) -> None:
        """Start fresh (``None``) or keep only records with ``step <= resume_step``."""
        if resume_step is None or not self.jsonl_path.exists():
            records: list[dict[str, Any]] = []
        else:
            records = [r for r in read_metrics(self.jsonl_path) if r["step"] <= resume_step]
        self._kept = {(r["step"], r["tag"]) for r in records}
        atomic_write(self.jsonl_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records), mode="w")

        def write_csv(handle: Any) -> None:
            writer = csv.writer(handle)
            writer.writerow(["step", "tag", "name", "value"])
            for r in records:
                writer.writerows([r["step"], r["tag"], k, v] for k, v in r.items() if k not in ("step", "tag"))

        atomic_write(self.csv_path, write_csv, mode="w")

    def log(self, step: int, tag: str, values: dict[str, float]) -> None:
        """Append one record; a resumed run re-logging a record it kept (its last step's, bit-exact) writes nothing."""
        if (step, tag) in self._kept:
            return
        clean = {k: float(v) for k, v in values.items()}
        try:
            with self.jsonl_path.open("a") as handle:
                handle.write(json.dumps({"step": step, "tag": tag, **clean}) + "\n")
            with self.csv_path.open("a", newline="") as handle:
                csv.writer(handle).writerows([step, tag, k, v] for k, v in clean.items())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise BisslError(
                    f"disk full while logging to {self.out_dir}; free space, then run again with --resume"
                ) from exc
            raise
        if self._writer is not None:
            with self._tensorboard():
                for key, value in clean.items():
                    if math.isfinite(value):
                        self._writer.add_scalar(f"{tag}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            with self._tensorboard():
                self._writer.close()
            self._writer = None


def read_metrics(path: str | Path, tag: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file, optionally only those of one ``tag``.

    A torn last line (the process was killed mid-write) is dropped with a warning; a bad line before it is one
    :class:`BisslError` line naming the file and line.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record or "tag" not in record:
                raise ValueError("not a metrics record")
        except ValueError as exc:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: dropped a torn last line (the run was killed mid-write)", stacklevel=2)
                break
            raise BisslError(
                f"{path}:{number}: not a metrics record ({exc}); delete that line, or pass --overwrite to run afresh"
            ) from None
        if tag is None or record["tag"] == tag:
            records.append(record)
    return records


def _quiet_writer_thread() -> None:
    """Keep Python from printing the traceback of TensorBoard's writer thread when a write fails (a full disk):
    the writer raises the same error in the main thread at its next call, where the logger warns once."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook
