import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bissl.eval import extract_features, knn_accuracy, knn_k_used, knn_predict


def _clusters(n_per_class: int, n_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:n_classes] * 10
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=gen), labels


def test_knn_is_perfect_on_separated_clusters() -> None:
    train_x, train_y = _clusters(50, 4, 8, seed=0)
    test_x, test_y = _clusters(20, 4, 8, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07) == 1.0
    assert knn_accuracy(train_x, train_y, test_x, (test_y + 1) % 4) == 0.0


def test_knn_weights_neighbours_by_similarity() -> None:
    # test point (1, 0); neighbours: A = (1, 0) label 0 (cos 1), B = (0.8, 0.6) and C = (0.6, 0.8) label 1
    # (cos 0.8 and 0.6). Scores at T: class 0: e^{1/T}; class 1: e^{0.8/T} + e^{0.6/T}.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[2.0, 0.0]])
    for t in (0.07, 10.0):
        class0, class1 = math.exp(1 / t), math.exp(0.8 / t) + math.exp(0.6 / t)
        expected = 0 if class0 > class1 else 1
        assert knn_predict(train, labels, test, k=3, temperature=t).tolist() == [expected]
    assert class1 > class0  # at T = 10 the majority wins, at T = 0.07 the nearest neighbour does
    assert knn_predict(train, labels, test, k=1).tolist() == [0]


def test_knn_chunking_and_large_k() -> None:
    train_x, train_y = _clusters(30, 3, 5, seed=2)
    test_x, _ = _clusters(10, 3, 5, seed=3)
    whole = knn_predict(train_x, train_y, test_x, k=500)  # k is clamped to the 90 training points
    assert torch.equal(whole, knn_predict(train_x, train_y, test_x, k=500, chunk_size=7))


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.dropout = nn.Dropout(0.9)
        self.feature_dim = 3
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.dropout(self.linear(x.flatten(1)))


def test_extract_features_in_eval_mode_with_normalisation() -> None:
    torch.manual_seed(0)
    images, labels = torch.rand(10, 1, 2, 2), torch.arange(10)
    backbone = _Recorder().train()
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    feats, got_labels = extract_features(backbone, loader, normalize_fn=lambda x: 2 * x - 1)
    assert feats.shape == (10, 3) and not feats.requires_grad
    assert torch.equal(got_labels, labels) and backbone.modes == [False] * 3 and backbone.training
    with torch.no_grad():
        torch.testing.assert_close(feats, backbone.linear((2 * images - 1).flatten(1)))
    with pytest.raises(ValueError, match="empty"):
        extract_features(backbone, [])


def test_knn_k_is_capped_by_the_mean_class_size() -> None:
    two_classes_ten_shot = torch.arange(2).repeat_interleave(10)
    assert knn_k_used(20, two_classes_ten_shot) == 10  # not 20: every query would vote over the whole bank
    assert knn_k_used(5, two_classes_ten_shot) == 5
    one_rare_class = torch.cat([torch.arange(36).repeat_interleave(100), torch.tensor([36])])
    assert knn_k_used(20, one_rare_class) == 20  # a rare class does not shrink k for all
    assert knn_k_used(20, torch.arange(3)) == 1
