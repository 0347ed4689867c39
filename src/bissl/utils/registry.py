"""A name -> object registry, used for datasets, backbones, pretext methods, solvers and tasks.

Users register their own entries with the same decorator the built-ins use::

    @PRETEXT_METHODS.register("mymethod")
    class MyMethod(PretextMethod): ...
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from bissl.utils.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
        """Register ``obj`` as ``name``. A name taken by another definition is an error unless ``overwrite``; the
        same definition again (one module imported twice, e.g. by an entry point and by ``--plugin FILE``) keeps
        the first."""
        key = name.lower()

        def decorator(obj: T) -> T:
            old = self._entries.get(key)
            if old is not None and not overwrite:
                if _same_definition(old, obj):
                    return obj
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {_origin(old)}); rename yours or pass "
                    "overwrite=True to replace it"
                )
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name.lower()]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)


def _source_file(obj: Any) -> Path | None:
    """The file of the module that defines ``obj``, if it has one."""
    file = getattr(sys.modules.get(getattr(obj, "__module__", "") or ""), "__file__", None)
    return Path(file).resolve() if file else None


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _same_definition(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are one definition: the same object, or objects of the same qualified name defined
    in the same source file (its module executed twice, under two module names)."""
    if a is b:
        return True
    qualname, file = getattr(a, "__qualname__", None), _source_file(a)
    return None not in (qualname, file) and qualname == getattr(b, "__qualname__", None) and file == _source_file(b)
