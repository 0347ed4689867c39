"""Error types whose message is one line that names the problem and the fix."""

from __future__ import annotations


class BisslError(RuntimeError):
    """Base class of every error bissl raises on bad input; the CLI prints it as one line."""


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
