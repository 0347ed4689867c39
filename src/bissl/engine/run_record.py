"""What a run folder records: the config it was made with (a run under another config is refused) and the summary
of a finished run, with the environment it ran in."""

from __future__ import annotations

import contextlib
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ValidationError

from bissl.engine.checkpoint import config_diff
from bissl.engine.files import CONFIG_FILE, SUMMARY_FILE
from bissl.utils.errors import ConfigError
from bissl.utils.io import save_json

# Config keys that may differ between a run and its continuation: ``out_dir`` is where the run is found (a folder
# moved, or named with a trailing slash or a relative path, resumes), not how it runs.
RESUMABLE_KEYS = ("out_dir", "log", "device")


def require_same_config(out: Path, config: BaseModel) -> None:
    """Refuse to continue or reuse the run in ``out`` when it was made with another config.

    ``out_dir``, ``log`` and ``device`` may change between a run and its continuation; every other key must not.
    """
    path = out / CONFIG_FILE
    if not path.is_file():
        return
    old = read_config_record(path)
    with contextlib.suppress(ValidationError):  # as today's code reads it: an earlier release's keys migrated
        old = type(config).model_validate(old).model_dump(mode="json")
    diff = config_diff(old, config.model_dump(mode="json"), ignore=RESUMABLE_KEYS)
    if diff:
        raise ConfigError(
            f"{out} holds a run made with another config ({diff}); restore the config, or use a new out_dir "
            "(or delete that folder) to start over"
        )


def read_config_record(path: Path) -> dict[str, Any]:
    """The config a run folder recorded in ``path``; a damaged record (binary, bad YAML) is one line."""
    try:
        record = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        record = exc
    if not isinstance(record, dict):
        raise ConfigError(
            f"{path} is not a readable config record; restore it, or pass --overwrite to run that folder afresh"
        )
    return record


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded with every result."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = out_dir / SUMMARY_FILE
    save_json({**summary, "environment": environment(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, path)
    return path
