"""Atomic file writes: a file is either its old content or its complete new content, never half of it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from bissl.utils.errors import BisslError, CheckpointError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    On any error (disk full included) the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        if exc.errno == errno.ENOSPC:
            raise BisslError(
                f"disk full while writing {path}; free space or choose another out_dir (old file kept)"
            ) from exc
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[Any]], None], mode: str = "wb") -> None:
    with atomic_open(path, mode) as handle:
        writer(handle)


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`atomic_open`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | os.PathLike[str], *, weights_only: bool = True) -> Any:
    """``torch.load`` on CPU with a one-line error for a missing or corrupted file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (or run the stage that writes it)")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a torch file ({type(exc).__name__}); delete it and re-run the "
            "stage that writes it"
        ) from exc


def save_json(obj: Any, path: str | os.PathLike[str]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"), mode="w")
