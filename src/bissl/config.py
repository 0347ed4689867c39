"""Typed configuration: pydantic models, YAML files and dotted command-line overrides.

A setting flows one way: YAML file -> ``key=value`` overrides -> validated config object -> the one
function that uses it. Unknown keys and bad values are rejected before any work starts, with the
dotted key named (:class:`~bissl.utils.errors.ConfigError`).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bissl.utils.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_registered(kind: str, name: str) -> str:
    """Validate ``name`` against the registry of ``kind`` (imported lazily: registries import torch)."""
    if kind == "dataset":
        from bissl.data import DATASETS as registry
    elif kind == "backbone":
        from bissl.models import BACKBONES as registry
    elif kind == "pretext method":
        from bissl.pretext import PRETEXT_METHODS as registry
    elif kind == "optimizer":
        from bissl.train.optim import OPTIMIZERS as registry
    elif kind == "augmentation":
        from bissl.data.augment import AUGMENTATIONS as registry
    else:  # pragma: no cover - programming error
        raise AssertionError(kind)
    registry.get(name)  # raises ConfigError listing the known names
    return name


class DataConfig(StrictModel):
    """Which dataset, where it lies, and how it is batched."""

    name: str = "digits"
    root: str | None = None
    image_size: int = Field(16, gt=0)
    download: bool = False
    batch_size: int = Field(128, gt=0)
    num_workers: int = Field(0, ge=0)
    seed: int = 0  # seed of the dataset's train/val split (kept apart from the run seed)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return _check_registered("dataset", value)


class BackboneConfig(StrictModel):
    """A registered backbone (``bissl.models.BACKBONES``) and optional local weights to start from."""

    name: str = "small_cnn"
    small_images: bool = True
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None

    @field_validator("name")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return _check_registered("backbone", value)


class PretextSection(StrictModel):
    """A registered pretext method and its hyper-parameters (validated by the method's own Config)."""

    name: str = "simclr"
    params: dict[str, Any] = Field(default_factory=dict)
    augmentation: str | None = None  # default: the method's own
    augmentation_params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_method(self) -> PretextSection:
        _check_registered("pretext method", self.name)
        from bissl.pretext import PRETEXT_METHODS

        method_cls = PRETEXT_METHODS.get(self.name)
        try:
            method_cls.Config(**self.params)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, prefix="params")) from None
        if self.augmentation is not None:
            _check_registered("augmentation", self.augmentation)
        return self


class OptimConfig(StrictModel):
    """Optimizer, cosine learning-rate schedule with linear warm-up, and gradient clipping."""

    name: str = "sgd"
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return _check_registered("optimizer", value)


class MonitorConfig(StrictModel):
    """Periodic kNN accuracy of the frozen backbone on a labelled dataset (off when ``every_epochs`` is 0)."""

    dataset: str | None = None  # default: the training dataset, when it has labels
    every_epochs: int = Field(1, ge=0)
    knn_k: int = Field(20, gt=0)
    knn_temperature: float = Field(0.07, gt=0)
    linear_probe_epochs: int = Field(100, ge=0)  # final linear probe on the test split (0: skip)


class LogConfig(StrictModel):
    every_steps: int = Field(10, gt=0)
    tensorboard: bool = True
    progress: bool = True


class PretrainConfig(StrictModel):
    """``bissl pretrain``: self-supervised pretraining of a backbone with a pretext method."""

    seed: int = 0
    out_dir: str = "runs/pretrain"
    device: Device = "auto"
    epochs: int = Field(30, gt=0)
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: at the end of every epoch only
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    pretext: PretextSection = Field(default_factory=PretextSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    log: LogConfig = Field(default_factory=LogConfig)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first["loc"] if part != "__root__")
    key = ".".join(part for part in (prefix, loc) if part)
    if first["type"] == "extra_forbidden":
        return f"unknown config key {key!r}; remove it or check its spelling"
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"bad config value for {key!r}: {first['msg']}{shown}"


def shipped_config_path(name: str) -> Path:
    """Path of a config shipped with the package (``bissl/configs/<name>.yaml``)."""
    return Path(str(resources.files("bissl") / "configs" / f"{name.removesuffix('.yaml')}.yaml"))


def shipped_config_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in (resources.files("bissl") / "configs").iterdir()
        if p.name.endswith(".yaml")
    )


def resolve_config_path(path_or_name: str | Path) -> Path:
    """A YAML path, or the name of a shipped config (e.g. ``pretrain_digits``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = shipped_config_path(str(path_or_name))
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"config file {str(path_or_name)!r} not found; give a YAML path or one of: {', '.join(shipped_config_names())}"
    )


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["optim.lr=0.1", "data.name=mnist"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {item!r}; write it as key.subkey=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``update`` wins; dict-valued ``params``/``kwargs`` merge key by key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_config(cls: type[ConfigT], data: dict[str, Any] | None = None) -> ConfigT:
    """Validate a nested dict into ``cls``; any problem becomes one ConfigError naming the key."""
    try:
        return cls.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(
    cls: type[ConfigT], path_or_name: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ConfigT:
    """Load a YAML file (or shipped config name), apply dotted overrides, validate into ``cls``."""
    data: dict[str, Any] = {}
    if path_or_name is not None:
        path = resolve_config_path(path_or_name)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"config file {path} is not valid YAML ({exc.__class__.__name__}); fix its syntax"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        data = loaded or {}
    return build_config(cls, merge(data, parse_overrides(overrides)))


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


STAGE_CONFIGS: dict[str, type[BaseModel]] = {"pretrain": PretrainConfig}


def config_class_for(name: str) -> type[BaseModel]:
    """The config class of a shipped config, from its ``<stage>_`` name prefix (e.g. ``pretrain_digits``)."""
    stage = Path(name).name.split("_")[0]
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"config {name!r} does not start with a stage name ({', '.join(STAGE_CONFIGS)})")
    return STAGE_CONFIGS[stage]
