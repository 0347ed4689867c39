"""Plug-ins: modules that register a user's backbones, pretext methods, downstream tasks or datasets on import.

A plug-in is a module name importable from ``sys.path`` (``my_pkg.mlp``) or the path of a ``.py`` file
(``examples/mlp_backbone.py``). Three roads import them, all before a config's names are checked:
``bissl VERB --plugin MODULE``, a config's ``plugins: [...]``, and the ``bissl.plugins`` entry-point group of
installed packages (imported at CLI start). Files record path plug-ins as absolute paths (:func:`plugin_ref`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from pathlib import Path
from types import FrameType, ModuleType

from bissl.utils.errors import ConfigError

ENTRY_POINT_GROUP = "bissl.plugins"


class PluginImportError(ConfigError):
    """A plug-in could not be imported: ``reason`` says why, the message adds the fix."""

    def __init__(self, ref: str, reason: str, fix: str) -> None:
        super().__init__(f"{reason}; {fix}")
        self.ref = ref
        self.reason = reason


def is_path(ref: str) -> bool:
    """Whether a plug-in reference names a ``.py`` file rather than a module."""
    return ref.endswith(".py") or "/" in ref or "\\" in ref


def plugin_ref(ref: str) -> str:
    """The reference as it is recorded: a module name as given, a file as its absolute path."""
    return str(Path(ref).expanduser().resolve()) if is_path(ref) else ref


def merge_plugins(*groups: Iterable[str]) -> list[str]:
    """The plug-in references of every group in order, each once."""
    return list(dict.fromkeys(plugin_ref(ref) for group in groups for ref in group))


def _import_file(path: Path) -> ModuleType:
    """The module of a ``.py`` file, imported once: as ``<stem>`` (also when imported by that name before) unless
    another module holds that name, else under a name made from its path."""
    alias = f"_bissl_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    for name in (path.stem, alias):
        module = sys.modules.get(name)
        if module is not None and Path(getattr(module, "__file__", None) or "").resolve() == path:
            return module
    name = alias if path.stem in sys.modules else path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _in_module(name: str) -> Callable[[FrameType], bool]:
    """Whether a frame runs code of module ``name`` or of one of its submodules."""

    def owns(frame: FrameType) -> bool:
        module = str(frame.f_globals.get("__name__", ""))
        return module == name or module.startswith(f"{name}.")

    return owns


def _failure_site(exc: BaseException, owns: Callable[[FrameType], bool]) -> str:
    """`` at FILE:LINE`` of a syntax error, else of the deepest traceback frame that ``owns`` (the plug-in's own
    code, not the library it called, e.g. a registry refusing a name); ``""`` when no frame is the plug-in's."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    site, tb = "", exc.__traceback__
    while tb is not None:
        if owns(tb.tb_frame):
            site = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return site


def import_plugin(ref: str) -> ModuleType:
    """Import one plug-in (module name or ``.py`` path); any failure is one :class:`PluginImportError` naming it
    and the file and line of its code that failed."""
    path = Path(plugin_ref(ref)) if is_path(ref) else None
    if path is not None and not path.is_file():
        raise PluginImportError(ref, f"plug-in file {ref!r} not found (looked at {path})", "check the path")
    try:
        return importlib.import_module(ref) if path is None else _import_file(path)
    except SystemExit as exc:  # would end bissl without a word
        reason = f"plug-in {ref!r} called sys.exit({exc.code!r}) on import"
        raise PluginImportError(ref, reason, "remove that call from the plug-in") from None
    except Exception as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing and (ref == missing or ref.startswith(f"{missing}.")):
            fix = "make it importable (pip install it, or add its folder to PYTHONPATH) or pass its .py file"
            raise PluginImportError(ref, f"cannot import plug-in {ref!r} (no module named {missing!r})", fix) from None
        own = _in_module(ref) if path is None else (lambda frame: frame.f_code.co_filename == str(path))
        reason = f"plug-in {ref!r} failed to import ({type(exc).__name__}: {exc}){_failure_site(exc, own)}"
        raise PluginImportError(ref, reason, "install what it needs" if missing else "fix the plug-in") from exc


def import_plugins(refs: Iterable[str]) -> list[ModuleType]:
    """Import every plug-in in ``refs`` (each at most once per process: Python caches modules)."""
    return [import_plugin(ref) for ref in refs]


def load_entry_point_plugins() -> list[str]:
    """Import the modules installed packages declare in the ``bissl.plugins`` entry-point group; their module
    names, which a run records like ``--plugin`` ones (a later process that lacks the package then names it)."""
    loaded = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:
            dist = entry.dist.name if entry.dist else "an installed package"
            raise ConfigError(
                f"entry point {entry.name!r} ({entry.value}) of {dist} in group {ENTRY_POINT_GROUP!r} failed to "
                f"import ({type(exc).__name__}: {exc}){_failure_site(exc, _in_module(entry.module))}; fix or "
                "uninstall that package"
            ) from None
        loaded.append(entry.module)
    return loaded
