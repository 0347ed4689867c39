"""Checkpoints: resumable training state, and the stage-to-stage files (backbone, heads).

Every file is written atomically (temp file + rename) and loads with ``torch.load(weights_only=True)``:
only tensors, numbers, strings, lists and dicts are stored.

* ``backbone.pt``: ``{"format": "bissl.backbone/v1", "backbone": spec, "feature_dim": int, "state_dict": ...}``
  where ``spec = {"name", "in_channels", "small_images", "kwargs"}`` rebuilds the module with
  :func:`bissl.models.build_backbone`. Written by ``pretrain`` and by ``align`` (its lower backbone theta).
* ``*_head.pt``: ``{"format": "bissl.head/v1", "kind", "name", "params", "state_dict"}``.
* ``checkpoints/last.pt``: everything needed to continue a run bit-exactly, plus the config it ran with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bissl.models.weights import BACKBONE_FORMAT
from bissl.utils.errors import CheckpointError, ConfigError
from bissl.utils.io import load_torch, save_torch

HEAD_FORMAT = "bissl.head/v1"
STATE_FORMAT = "bissl.state/v1"
BACKBONE_FILE = "backbone.pt"
PRETEXT_HEAD_FILE = "pretext_head.pt"
DOWNSTREAM_HEAD_FILE = "downstream_head.pt"


def backbone_spec(name: str, in_channels: int, small_images: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in_channels": in_channels, "small_images": small_images, "kwargs": dict(kwargs)}


def export_backbone(path: str | Path, backbone: nn.Module, spec: dict[str, Any]) -> None:
    """Write a backbone file that :func:`load_backbone` (and ``bissl finetune``) rebuilds."""
    save_torch(
        {
            "format": BACKBONE_FORMAT,
            "backbone": spec,
            "feature_dim": int(backbone.feature_dim),
            "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        },
        path,
    )


def resolve_backbone_file(path: str | Path) -> Path:
    """A run folder's ``backbone.pt``, or the given file itself."""
    candidate = Path(path)
    return candidate / BACKBONE_FILE if candidate.is_dir() else candidate


def read_backbone_file(path: str | Path) -> dict[str, Any]:
    payload = load_torch(path)
    if not isinstance(payload, dict) or payload.get("format") != BACKBONE_FORMAT:
        raise CheckpointError(
            f"{path} is not a bissl backbone file (expected format {BACKBONE_FORMAT!r}); pass the backbone.pt "
            "written by `bissl pretrain` or `bissl align`, or import foreign weights with backbone.weights=PATH"
        )
    return payload


def load_backbone(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone stored in a bissl backbone file; returns ``(module, spec)``."""
    from bissl.models import build_backbone
    from bissl.models.weights import load_backbone_weights

    payload = read_backbone_file(path)
    spec = payload["backbone"]
    backbone = build_backbone(
        spec["name"], in_channels=spec["in_channels"], small_images=spec["small_images"], **spec["kwargs"]
    )
    load_backbone_weights(backbone, payload["state_dict"])
    return backbone, spec


def export_head(path: str | Path, head: nn.Module, *, kind: str, name: str, params: dict[str, Any]) -> None:
    save_torch(
        {
            "format": HEAD_FORMAT,
            "kind": kind,
            "name": name,
            "params": params,
            "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        },
        path,
    )


def read_head_file(path: str | Path, kind: str) -> dict[str, Any]:
    payload = load_torch(path)
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT or payload.get("kind") != kind:
        raise CheckpointError(f"{path} is not a bissl {kind} head file; pass the file the earlier stage wrote")
    return payload


def save_state(path: str | Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Atomically save a resumable training state together with the config that produced it."""
    save_torch({"format": STATE_FORMAT, "config": config, "torch_rng": torch.get_rng_state(), **state}, path)


def load_state(path: str | Path, config: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a training state; refuse one written under a different config (keys in ``ignore`` may differ)."""
    state = load_torch(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a bissl training state; delete it or choose another out_dir")
    diff = config_diff(state["config"], config, ignore=ignore)
    if diff:
        raise ConfigError(
            f"cannot resume from {path}: the config changed ({diff}); restore it, or use a new out_dir to start over"
        )
    torch.set_rng_state(state["torch_rng"])
    return state


def config_diff(old: Any, new: Any, *, ignore: tuple[str, ...] = (), prefix: str = "") -> str:
    """The first differing dotted key of two config dicts as ``'key: old -> new'``, or ``''``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if dotted in ignore:
                continue
            found = config_diff(old.get(key), new.get(key), ignore=ignore, prefix=dotted)
            if found:
                return found
        return ""
    return "" if old == new else f"{prefix}: {old!r} -> {new!r}"
