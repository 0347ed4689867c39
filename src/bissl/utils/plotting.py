"""matplotlib figures drawn on the Agg canvas directly (no pyplot state), saved atomically as PNG.

matplotlib is imported only when a figure is made, so ``import bissl`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bissl.utils.errors import BisslError
from bissl.utils.io import atomic_write


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` attached to an Agg canvas, or a one-line error naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BisslError("plots need matplotlib, which is not installed; pip install matplotlib") from None
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def require_plotting() -> None:
    """Fail early (before long work) when plots cannot be drawn."""
    new_figure((1, 1))


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    return Path(path)
