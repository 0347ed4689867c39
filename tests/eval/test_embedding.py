import numpy as np
import pytest
import torch

from bissl.eval.embedding import embed_2d, plot_embedding, plot_embeddings_grid
from bissl.utils.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _clusters(n_per_class: int = 40, dim: int = 16, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Tight Gaussian blobs around far-apart centres."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (classes, dim))
    x = np.concatenate([c + rng.normal(0, 0.5, (n_per_class, dim)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(classes), n_per_class)


def test_tsne_is_deterministic_for_a_seed_and_keeps_clusters_apart():
    x, y = _clusters()
    points, labels = embed_2d(torch.from_numpy(x), torch.from_numpy(y), seed=3)
    again, _ = embed_2d(x, y, seed=3)
    assert points.shape == (len(x), 2) and np.array_equal(labels, y)
    np.testing.assert_array_equal(points, again)
    centroids = np.stack([points[labels == c].mean(axis=0) for c in range(3)])
    spread = max(np.linalg.norm(points[labels == c] - centroids[c], axis=1).max() for c in range(3))
    gaps = [np.linalg.norm(centroids[a] - centroids[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > 2 * spread  # every cluster stays compact and apart from the others


def test_large_inputs_are_subsampled_with_their_labels():
    x, _ = _clusters(n_per_class=50)
    row_ids = np.arange(len(x))  # labels that name their row
    points, kept = embed_2d(x, row_ids, method="pca", seed=1, max_points=30)
    again, kept_again = embed_2d(x, row_ids, method="pca", seed=1, max_points=30)
    assert points.shape == (30, 2) and len(set(kept.tolist())) == 30 and np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(kept, kept_again)
    np.testing.assert_array_equal(points, again)
    direct, _ = embed_2d(x[kept], kept, method="pca", seed=1, max_points=None)
    np.testing.assert_allclose(points, direct, atol=1e-5)  # each point is the embedding of its label's row


def test_unknown_method_is_a_config_error():
    x, y = _clusters(n_per_class=2)
    with pytest.raises(ConfigError, match="unknown embedding method 'umap'; choose one of: tsne, pca"):
        embed_2d(x, y, method="umap")


def test_plots_are_non_empty_pngs(tmp_path):
    x, y = _clusters()
    points, labels = embed_2d(x, y, method="pca")
    single = plot_embedding(points, labels, tmp_path / "one.png", title="pca", class_names=["a", "b", "c"])
    grid = plot_embeddings_grid(
        [("before", points, labels), ("after", points[::2], labels[::2])], tmp_path / "sub" / "grid.png", title="arms"
    )
    for path in (single, grid):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert not list(tmp_path.rglob("*.tmp"))
    single_width = int.from_bytes(single.read_bytes()[16:20], "big")
    grid_width = int.from_bytes(grid.read_bytes()[16:20], "big")
    assert grid_width > 1.5 * single_width  # two panels side by side
