"""What a run folder records: the config it was made with (a run under another config is refused) and the summary
of a finished run, with the environment it ran in."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel

from bissl.engine.checkpoint import config_diff
from bissl.engine.files import CONFIG_FILE, SUMMARY_FILE
from bissl.utils.errors import ConfigError
from bissl.utils.io import save_json

RESUMABLE_KEYS = ("log", "device")  # config keys that may differ between a run and its continuation


def require_same_config(out: Path, config: BaseModel) -> None:
    """Refuse to continue or reuse the run in ``out`` when it was made with another config.

    ``log`` and ``device`` may change between a run and its continuation; every other key must not.
    """
    path = out / CONFIG_FILE
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    diff = config_diff(old, config.model_dump(mode="json"), ignore=RESUMABLE_KEYS)
    if diff:
        raise ConfigError(
            f"{out} holds a run made with another config ({diff}); restore the config, or use a new out_dir "
            "(or delete that folder) to start over"
        )


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
