"""2-D embeddings of features (t-SNE or PCA from scikit-learn) and their scatter plots (PNG, matplotlib).

Plotting needs the optional ``plots`` extra (matplotlib); it is imported only when a plot is drawn, and
drawn with the Agg canvas directly, so no global backend or ``pyplot`` state is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bissl.utils.errors import ConfigError
from bissl.utils.plotting import new_figure, save_png

EMBEDDING_METHODS = ("tsne", "pca")
Panel = tuple[str, np.ndarray, np.ndarray]  # (title, points [N, 2], labels [N])


def _numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def embed_2d(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    method: str = "tsne",
    seed: int = 0,
    perplexity: float = 30.0,
    max_points: int | None = 2000,
) -> tuple[np.ndarray, np.ndarray]:
    """``(points [M, 2], labels [M])``: a 2-D embedding of ``features [N, D]`` and the labels of the kept rows.

    With more than ``max_points`` rows, a subset of ``max_points`` drawn with ``seed`` is embedded (rows keep
    their order). t-SNE is PCA-initialised with ``random_state=seed`` (perplexity capped below the number of
    points), so a seed gives the same picture every time; ``pca`` is the fast, linear alternative.
    """
    if method not in EMBEDDING_METHODS:
        raise ConfigError(f"unknown embedding method {method!r}; choose one of: {', '.join(EMBEDDING_METHODS)}")
    x = _numpy(features).astype(np.float32).reshape(len(features), -1)
    y = _numpy(labels)
    if len(x) != len(y):
        raise ValueError(f"need one label per feature row, got {len(x)} rows and {len(y)} labels")
    if len(x) < 3:
        raise ValueError(f"a 2-D embedding needs at least 3 points, got {len(x)}")
    if max_points is not None and len(x) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), size=max_points, replace=False))
        x, y = x[keep], y[keep]
    if method == "pca":
        from sklearn.decomposition import PCA

        points = PCA(n_components=2, random_state=seed).fit_transform(x)
    else:
        from sklearn.manifold import TSNE

        tsne = TSNE(
            n_components=2,
            perplexity=min(perplexity, (len(x) - 1) / 3),
            init="pca",
            learning_rate="auto",
            random_state=seed,
        )
        points = tsne.fit_transform(x)
    return points.astype(np.float32), y


def _scatter(
    ax: Any,
    points: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None,
    num_classes: int,
    *,
    legend: bool,
) -> None:
    """Points coloured by their class index, optionally with a legend (left out beyond 20 classes)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"]
    for cls in np.unique(labels).astype(int):
        mask = labels == cls
        name = class_names[cls] if class_names is not None and 0 <= cls < len(class_names) else str(cls)
        color = cmap(cls) if num_classes <= 20 else cmap(cls / max(num_classes - 1, 1))
        ax.scatter(points[mask, 0], points[mask, 1], s=6, color=color, label=name, alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend and num_classes <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)


def plot_embedding(
    points: np.ndarray,
    labels: np.ndarray | torch.Tensor,
    path: str | Path,
    *,
    title: str,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write a PNG scatter plot of ``points [N, 2]`` coloured by ``labels`` (atomically); returns ``path``."""
    return plot_embeddings_grid([(title, points, _numpy(labels))], path, class_names=class_names)


def plot_embeddings_grid(
    panels: Sequence[Panel],
    path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write side-by-side scatter panels ``(title, points, labels)`` in one PNG (atomically); returns ``path``.

    Colours follow the label values, so the same class has the same colour in every panel; the legend is
    drawn once, beside the last panel.
    """
    if not panels:
        raise ValueError("plot_embeddings_grid needs at least one panel")
    fig = new_figure((4.6 * len(panels), 4.0))
    all_labels = [_numpy(labels).astype(int) for _, _, labels in panels]
    num_classes = max(1, len(class_names or ()), *(int(labels.max()) + 1 for labels in all_labels if len(labels)))
    for i, ((panel_title, points, _), labels) in enumerate(zip(panels, all_labels, strict=True)):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _scatter(ax, np.asarray(points), labels, class_names, num_classes, legend=i == len(panels) - 1)
        ax.set_title(panel_title, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)
