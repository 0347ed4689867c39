"""bissl: bilevel self-supervised learning (BiSSL).

The import is kept light: submodules (``bissl.data``, ``bissl.models``, ``bissl.pretext``,
``bissl.bilevel``, ``bissl.engine``, ``bissl.stages``, ...) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_SUBMODULES = (
    "bilevel",
    "config",
    "data",
    "dist",
    "downstream",
    "engine",
    "eval",
    "models",
    "pipeline",
    "pretext",
    "stages",
    "utils",
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"bissl.{name}")
    raise AttributeError(f"module 'bissl' has no attribute {name!r}")
