"""Checkpoints: resumable training state, and the stage-to-stage files (backbone, heads).

Every file is written atomically (temp file + rename) and loads with ``torch.load(weights_only=True)``:
only tensors, numbers, strings, lists and dicts are stored.

* ``backbone.pt``: ``{"format": "bissl.backbone/v1", "backbone": spec, "feature_dim": int, "state_dict": ...}``
  where ``spec = {"name", "in_channels", "small_images", "kwargs", "image_size", "plugins", "lora"}`` rebuilds the
  module with :func:`bissl.models.build_backbone`, then LoRA adapters if ``lora`` is set
  (:func:`bissl.models.lora.apply_lora`; the state dict holds the frozen base and the adapters). Written by
  ``pretrain`` and by ``align`` (its lower backbone theta).
* ``*_head.pt``: ``{"format": "bissl.head/v1", "kind", "name", "params", "plugins", "state_dict"}``.
* ``checkpoints/last.pt``: everything needed to continue a run bit-exactly, plus the config it ran with.

``plugins`` lists the plug-ins of the runs that made the file (:mod:`bissl.utils.plugins`); a stage loading a file
whose backbone, pretext method or task is not registered imports them first (:func:`require_registered`), so a run
made with a plug-in loads in a new process without ``--plugin``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bissl.engine.files import BACKBONE_FILE
from bissl.models.weights import BACKBONE_FORMAT
from bissl.utils.errors import CheckpointError, ConfigError
from bissl.utils.io import load_torch, save_torch
from bissl.utils.plugins import PluginImportError, import_plugins, merge_plugins
from bissl.utils.registry import Registry

HEAD_FORMAT = "bissl.head/v1"
STATE_FORMAT = "bissl.state/v1"


def backbone_spec(
    name: str,
    in_channels: int,
    small_images: bool,
    kwargs: dict[str, Any],
    *,
    image_size: int | None = None,
    plugins: list[str] | tuple[str, ...] = (),
    lora: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What :func:`load_backbone` needs to rebuild a backbone (LoRA adapters included), and the plug-ins that may
    register it."""
    return {
        "name": name,
        "in_channels": in_channels,
        "small_images": small_images,
        "kwargs": dict(kwargs),
        "image_size": image_size,
        "plugins": merge_plugins(plugins),
        "lora": dict(lora) if lora is not None else None,
    }


def require_registered(registry: Registry[Any], name: str, path: str | Path, plugins: list[str]) -> None:
    """Make sure ``name`` is registered, importing the plug-ins ``path`` records if it is not (one-line errors)."""
    if name in registry:
        return
    try:
        import_plugins(plugins)
    except PluginImportError as exc:
        raise ConfigError(
            f"unknown {registry.kind} {name!r}: {path} was written with plug-ins {plugins}; make {exc.ref!r} "
            f"importable (pip install / PYTHONPATH) or pass --plugin MODULE_OR_FILE ({exc.reason})"
        ) from exc
    if name not in registry:
        recorded = f"its plug-ins {plugins} do not register it" if plugins else "it records no plug-ins"
        raise ConfigError(
            f"unknown {registry.kind} {name!r}: {path} needs it but {recorded}; pass --plugin MODULE that does"
        )


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


def load_backbone(path: str | Path, plugins: list[str] | tuple[str, ...] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone stored in a bissl backbone file (importing its recorded plug-ins if its name is not
    registered); returns ``(module, spec)``, the spec's ``plugins`` extended by ``plugins`` (the loading run's)."""
    from bissl.models import BACKBONES, build_backbone
    from bissl.models.lora import apply_lora
    from bissl.models.weights import load_backbone_weights

    payload = read_backbone_file(path)
    broken = [k for k, v in payload["state_dict"].items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(
            f"backbone file {path} holds NaN/inf weights ({broken[0]}): it is corrupt or its run diverged; "
            "choose another backbone or re-run the stage that wrote it"
        )
    stored = payload["backbone"]
    spec = backbone_spec(
        stored["name"], stored["in_channels"], stored["small_images"], stored["kwargs"],
        image_size=stored.get("image_size"), plugins=merge_plugins(stored.get("plugins", ()), plugins),
        lora=stored.get("lora"),
    )  # fmt: skip
    require_registered(BACKBONES, spec["name"], path, stored.get("plugins", []))
    backbone = build_backbone(
        spec["name"], in_channels=spec["in_channels"], small_images=spec["small_images"],
        image_size=spec["image_size"], **spec["kwargs"],
    )  # fmt: skip
    if spec["lora"] is not None:
        apply_lora(backbone, spec["lora"])
    load_backbone_weights(backbone, payload["state_dict"])
    return backbone, spec


def export_head(
    path: str | Path,
    head: nn.Module,
    *,
    kind: str,
    name: str,
    params: dict[str, Any],
    plugins: list[str] | tuple[str, ...] = (),
) -> None:
    """Write a head file: the head's weights, the registered ``name`` it belongs to and the run's plug-ins."""
    save_torch(
        {
            "format": HEAD_FORMAT,
            "kind": kind,
            "name": name,
            "params": params,
            "plugins": merge_plugins(plugins),
            "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        },
        path,
    )


def read_head_file(path: str | Path, kind: str) -> dict[str, Any]:
    """A ``kind`` (``pretext`` or ``downstream``) head file, its method or task registered (recorded plug-ins
    imported if need be) and ``plugins`` set (``[]`` for files written before plug-ins were recorded)."""
    from bissl.downstream import DOWNSTREAM_TASKS
    from bissl.pretext import PRETEXT_METHODS

    payload = load_torch(path)
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT or payload.get("kind") != kind:
        raise CheckpointError(f"{path} is not a bissl {kind} head file; pass the file the earlier stage wrote")
    payload.setdefault("plugins", [])
    registry = PRETEXT_METHODS if kind == "pretext" else DOWNSTREAM_TASKS
    require_registered(registry, str(payload["name"]), path, payload["plugins"])
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
