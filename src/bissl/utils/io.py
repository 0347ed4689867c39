"""Atomic file writes: a file is either its old content or its complete new content, never half of it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from bissl.utils.errors import BisslError, CheckpointError

__all__ = ["atomic_open", "atomic_write", "load_torch", "remove_stale_temp_files", "save_json", "save_torch"]

# The temporary files of atomic_open: ``.<name>.<8 random characters of mkstemp>.tmp``.
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
# Below this many free bytes a failed write is taken for a full disk (torch reports ENOSPC as a RuntimeError).
_NEARLY_FULL_BYTES = 1 << 20


def _new_file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would give: the existing file's, else 0666 minus the umask."""
    with contextlib.suppress(FileNotFoundError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC anywhere in the chain, or (torch's RuntimeError, which
    drops the errno) a message saying so or a file system with almost nothing free left."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(exc, RuntimeError):
        return False
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The file gets the mode a plain ``open`` would give (the old file's, else umask-derived, e.g. 0644). On any
    error the temporary file is removed and ``path`` keeps its old content; a full disk (``OSError`` ENOSPC, or
    the ``RuntimeError`` ``torch.save`` raises for it) is one :class:`BisslError` line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        full = _disk_full(exc, path.parent)  # measured before the temporary file frees its space
        _remove_quietly(tmp)
        if full:
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


def remove_stale_temp_files(folder: str | os.PathLike[str], *, older_than_s: float = 60.0) -> list[Path]:
    """Remove the temporary files :func:`atomic_open` left under ``folder`` (recursively) when killed mid-write.

    Only files named like its temporaries and not modified for ``older_than_s`` seconds are removed, so a write
    in progress elsewhere keeps its file. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - older_than_s
    removed = []
    for path in sorted(folder.rglob(".*.tmp")):
        if not _TEMP_NAME.match(path.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.is_file() and path.stat().st_mtime <= cutoff:
                path.unlink()
                removed.append(path)
    return removed


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[Any]], None], mode: str = "wb") -> None:
    with atomic_open(path, mode) as handle:
        writer(handle)


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`atomic_open`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _refused_global(exc: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a pickled global (as opposed to unreadable bytes)."""
    return isinstance(exc, pickle.UnpicklingError) and "unsupported global" in str(exc).lower()


def load_torch(path: str | os.PathLike[str], *, weights_only: bool = True) -> Any:
    """``torch.load`` on CPU with a one-line error for a missing, corrupted or refused (unsafe) file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (or run the stage that writes it)")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        if _refused_global(exc):
            raise CheckpointError(
                f"checkpoint {path} refused: it holds Python objects other than tensors (not a bissl file, or from "
                "an untrusted source); use a file written by bissl, or re-export the weights as a plain state dict"
            ) from exc
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a torch file ({type(exc).__name__}); run the stage that wrote it "
            "again with --overwrite (in a study: bissl pipeline --overwrite)"
        ) from exc


def save_json(obj: Any, path: str | os.PathLike[str]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"), mode="w")
