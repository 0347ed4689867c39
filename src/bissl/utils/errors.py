"""Error types whose message is one line that names the problem and the fix."""

from __future__ import annotations

import re


class BisslError(RuntimeError):
    """Base class of every error bissl raises on bad input; the CLI prints it as one line.

    A DataLoader worker's exception comes back as ``type(exc)(traceback text)``; the original one-line message
    is taken back out of that text, so an error raised in a worker reads the same as in the main process.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and "\n" in args[0]:
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            original = [line[len(prefix) :] for line in args[0].splitlines() if line.startswith(prefix)]
            if original and args[0].startswith("Caught "):
                args = (original[-1],)
        super().__init__(*args)


class ConfigError(BisslError, ValueError):
    """A configuration key or value is invalid."""


class DataError(BisslError, FileNotFoundError):
    """A dataset is missing, empty or malformed."""


class CheckpointError(BisslError):
    """A checkpoint is missing, corrupted or belongs to another architecture."""


class NonFiniteError(BisslError, FloatingPointError):
    """A loss, gradient or solver iterate became NaN or infinite."""


class RunTerminated(BisslError):
    """The run received SIGTERM and stopped after writing its checkpoint."""


_ASKED = re.compile(r"tried to allocate ([\d.]+) ?(bytes|[KMGT]iB)", re.IGNORECASE)
_UNITS = {"bytes": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def out_of_memory(exc: BaseException) -> str | None:
    """One line for an allocation failure (torch's CPU or CUDA allocator, Python's ``MemoryError``) naming the memory
    it asked for, or None for any other error."""
    if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
        return None
    asked = _ASKED.search(str(exc))
    size = f" ({float(asked[1]) * _UNITS[asked[2].lower()] / 2**30:,.1f} GiB asked for at once)" if asked else ""
    if not asked and not isinstance(exc, MemoryError):
        return None
    return (
        f"out of memory{size}; lower the batch size, data.image_size or the backbone's size (backbone.kwargs), "
        "or run on a machine with more memory"
    )
