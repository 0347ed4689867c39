import pytest
import torch

from bissl.eval import fit_linear_classifier, linear_probe
from bissl.eval.frozen import frozen_scores


def _blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = 8 * torch.eye(3)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    feats = centres[labels] + torch.randn(len(labels), 3, generator=gen)
    return 100 * feats + 50, labels  # badly scaled features: the probe standardises them


def test_linear_probe_separates_separable_classes() -> None:
    train_x, train_y = _blobs(60, seed=0)
    test_x, test_y = _blobs(30, seed=1)
    assert linear_probe(train_x, train_y, test_x, test_y, epochs=20, lr=0.05, weight_decay=1e-4, seed=0) == 1.0
    full_batch = linear_probe(
        train_x, train_y, test_x, test_y, epochs=50, lr=0.1, weight_decay=0, seed=0, batch_size=None
    )
    assert full_batch == 1.0


def test_linear_probe_is_deterministic_for_a_seed() -> None:
    x, y = _blobs(40, seed=2)
    fit = lambda seed: fit_linear_classifier(x, y, num_classes=3, epochs=3, lr=0.05, batch_size=16, seed=seed)  # noqa: E731
    a, b, c = fit(7), fit(7), fit(8)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)  # another seed shuffles differently


def test_classifier_acts_on_raw_features() -> None:
    x, y = _blobs(40, seed=3)
    layer = fit_linear_classifier(x, y, num_classes=3, epochs=30, lr=0.05, batch_size=None)
    with torch.no_grad():
        assert (layer(x).argmax(dim=1) == y).float().mean().item() == 1.0


def test_frozen_scores_probe_is_the_linear_probe() -> None:
    train, test = _blobs(20, seed=4), _blobs(10, seed=5)
    scores = frozen_scores(train, {"test": test}, knn_k=5, knn_temperature=0.07, probe_epochs=2, seed=3)
    assert scores["linear_probe_test"] == linear_probe(*train, *test, epochs=2, seed=3)


def test_a_probe_refuses_multi_label_targets() -> None:
    x, y = _blobs(5, seed=6)
    with pytest.raises(ValueError, match="single-label"):
        fit_linear_classifier(x, torch.nn.functional.one_hot(y), num_classes=3)
