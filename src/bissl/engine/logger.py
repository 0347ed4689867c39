"""Metric logging to JSON lines, CSV (long format) and, when installed, TensorBoard.

Every record is ``(step, tag, name, value)``. On resume the files are cut back to the resumed step,
so a resumed run's logs read exactly like an uninterrupted run's.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

from bissl.utils.io import atomic_write


class MetricLogger:
    """Writes ``metrics.jsonl`` and ``metrics.csv`` under ``out_dir`` (and ``tb/`` for TensorBoard)."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.csv_path = self.out_dir / "metrics.csv"
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
                self._writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=resume_step)

    def _truncate(self, resume_step: int | None) -> None:
        """Start fresh (``None``) or keep only records with ``step <= resume_step``."""
        if resume_step is None or not self.jsonl_path.exists():
            records: list[dict[str, Any]] = []
        else:
            with self.jsonl_path.open() as handle:
                records = [r for r in map(json.loads, handle) if r["step"] <= resume_step]
        atomic_write(self.jsonl_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records), mode="w")

        def write_csv(handle: Any) -> None:
            writer = csv.writer(handle)
            writer.writerow(["step", "tag", "name", "value"])
            for r in records:
                writer.writerows([r["step"], r["tag"], k, v] for k, v in r.items() if k not in ("step", "tag"))

        atomic_write(self.csv_path, write_csv, mode="w")

    def log(self, step: int, tag: str, values: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items()}
        with self.jsonl_path.open("a") as handle:
            handle.write(json.dumps({"step": step, "tag": tag, **clean}) + "\n")
        with self.csv_path.open("a", newline="") as handle:
            csv.writer(handle).writerows([step, tag, k, v] for k, v in clean.items())
        if self._writer is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._writer.add_scalar(f"{tag}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str | Path, tag: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file, optionally only those of one ``tag``."""
    with Path(path).open() as handle:
        return [r for r in map(json.loads, handle) if tag is None or r["tag"] == tag]
