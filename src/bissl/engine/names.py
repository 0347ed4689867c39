"""Registry names in a config, validated against the registries before any work starts.

``bissl.config`` sits below every registry (it imports none), so names are checked here, one layer up: each
stage calls :func:`validate_names` first, and the CLI calls it right after loading a config. It imports the
config's ``plugins`` first, since they register the names it checks (the CLI has already imported ``--plugin``
modules and the ``bissl.plugins`` entry points). A bad name is one :class:`ConfigError` naming the dotted key
and the registered choices; a pretext method's or downstream task's ``params`` are validated by its own ``Config``,
and a downstream task's declared metrics by :meth:`~bissl.downstream.base.DownstreamTask.check_contract`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from bissl.bilevel.mfac import INVERSES
from bissl.bilevel.solvers import SOLVERS
from bissl.config import (
    BackboneConfig,
    DataConfig,
    DownstreamConfig,
    MonitorConfig,
    OptimConfig,
    PretextSection,
    SolverConfig,
    format_validation_error,
)
from bissl.data import AUGMENTATIONS, DATASETS
from bissl.data.build import dataset_builder
from bissl.downstream import DOWNSTREAM_TASKS
from bissl.engine.optim import OPTIMIZERS
from bissl.models import BACKBONES
from bissl.pretext import PRETEXT_METHODS
from bissl.utils.errors import ConfigError
from bissl.utils.plugins import import_plugins
from bissl.utils.registry import Registry

#: (config section, field) -> the registries one of which its value must name
NAMED_FIELDS: tuple[tuple[type[BaseModel], str, Registry[Any] | tuple[Registry[Any], ...]], ...] = (
    (DataConfig, "name", DATASETS),
    (MonitorConfig, "dataset", DATASETS),
    (BackboneConfig, "name", BACKBONES),
    (PretextSection, "name", PRETEXT_METHODS),
    (PretextSection, "augmentation", AUGMENTATIONS),
    (OptimConfig, "name", OPTIMIZERS),
    (SolverConfig, "name", (SOLVERS, INVERSES)),  # a linear solver or an inverse operator (M-FAC)
    (DownstreamConfig, "task", DOWNSTREAM_TASKS),
)


def _sections(node: Any, path: str) -> Iterator[tuple[str, BaseModel]]:
    """Every config section under ``node`` (itself included) with its dotted path."""
    if isinstance(node, BaseModel):
        yield path, node
        for name in type(node).model_fields:
            yield from _sections(getattr(node, name), f"{path}.{name}" if path else name)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from _sections(item, f"{path}.{i}")


def validate_names(config: BaseModel) -> None:
    """Import the config's plug-ins, then raise :class:`ConfigError` for the first registry name in ``config`` that
    nothing registered."""
    import_plugins(getattr(config, "plugins", ()))
    for path, section in _sections(config, ""):
        for cls, field, registries in NAMED_FIELDS:
            value = getattr(section, field) if isinstance(section, cls) else None
            if value is None:
                continue
            choices = registries if isinstance(registries, tuple) else (registries,)
            key = f"{path}.{field}" if path else field
            if any(value in registry for registry in choices):
                if registries is DATASETS:
                    dataset_builder(value, key)  # a plug-in's builder with the wrong signature: one line, now
                continue
            names = ", ".join(sorted(name for registry in choices for name in registry))
            kinds = " or ".join(registry.kind for registry in choices)
            raise ConfigError(
                f"bad config value for {key!r}: unknown {kinds} {value!r}; choose one of: {names} "
                "(or a plug-in's: --plugin MODULE, or plugins: [MODULE])"
            )
        if isinstance(section, PretextSection) and section.name is not None:  # None: align's, from the pretrained run
            _check_params(PRETEXT_METHODS.get(section.name).Config, section.params, path)
        if isinstance(section, DownstreamConfig):
            DOWNSTREAM_TASKS.get(section.task).check_contract()
            _check_params(DOWNSTREAM_TASKS.get(section.task).Config, section.params, path)


def _check_params(schema: type[BaseModel], params: dict[str, Any], path: str) -> None:
    """A plug-in's ``params`` validated by its own pydantic ``Config``, errors named by dotted key."""
    try:
        schema(**params)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{path}.params" if path else "params")) from None
