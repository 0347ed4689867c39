"""The detection task on the contract: head on feature maps, detector input range, losses, predictions, metrics,
and the BiSSL hypergradient with the detection loss as the upper loss against a dense exact solve."""

from __future__ import annotations

import pytest
import torch
from fake_detection import FakeDetection
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from bissl.bilevel.implicit import SolverSpec
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer
from bissl.config import DownstreamConfig
from bissl.downstream import DOWNSTREAM_TASKS
from bissl.downstream.detection import DetectionConfig, DetectionTask
from bissl.models import build_backbone
from bissl.pretext.base import PretextMethod
from bissl.utils.errors import ConfigError

CPU = torch.device("cpu")


def _task(size=16, **params):
    splits = {s: FakeDetection(s, image_size=64, size=size) for s in ("train", "val", "test")}
    cfg = DownstreamConfig(task="detection", data={"name": "synthetic_detection", "image_size": 64}, params=params)
    return DOWNSTREAM_TASKS.get("detection").from_config(cfg, splits), splits


def _batch(dataset, n, task, seed=0):
    rows = FakeDetection.collate([dataset[i] for i in range(n)])
    return task.prepare(rows, CPU, torch.Generator().manual_seed(seed))


def test_registered_and_built_from_config_like_a_user_task():
    task, _ = _task()
    assert isinstance(task, DetectionTask) and task.primary().key == "ap50_voc07"
    with pytest.raises(ValueError, match="cut"):
        DetectionConfig(cut="c5")
    from bissl.data import build_dataset

    digits = {s: build_dataset("digits", s, image_size=8) for s in ("train", "val", "test")}
    with pytest.raises(ConfigError, match="detection dataset"):
        DetectionTask.from_config(DownstreamConfig(task="detection"), digits)


def test_detector_sees_images_in_unit_range_normalised_with_the_dataset_statistics():
    task, splits = _task()
    backbone = build_backbone("small_cnn", in_channels=3, width=4, depth=3)
    head = task.build_head_for(backbone)
    seen = {}
    original = head.transform.normalize

    def spy(image):
        seen.setdefault("range", []).append((float(image.min()), float(image.max())))
        return original(image)

    head.transform.normalize = spy
    batch = _batch(splits["train"], 4, task)
    loss = task.loss(backbone, head, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(lo >= 0.0 and hi <= 1.0 for lo, hi in seen["range"])  # not 0..255
    assert head.transform.image_mean == list(splits["train"].info.mean)
    assert head.transform.image_std == list(splits["train"].info.std)


@pytest.mark.parametrize("cut", ["fpn", "c4"])
def test_loss_backpropagates_to_trunk_and_head_and_predictions_score(cut):
    task, splits = _task(cut=cut)
    backbone = build_backbone("small_cnn", in_channels=3, width=4, depth=3)
    head = task.build_head_for(backbone)
    loss = task.loss(backbone, head, _batch(splits["train"], 4, task))
    params = [*backbone.parameters(), *head.parameters()]
    grads = torch.autograd.grad(loss, params)  # every parameter is used: BiSSL's autograd.grad calls need that
    assert all(torch.isfinite(g).all() for g in grads)
    if cut == "c4":  # the last stage is the box head and stays the backbone's
        assert not any(p is q for p in head.parameters() for q in backbone.parameters())
    preds, targets = task.predict(backbone, head, splits["val"], CPU)
    assert len(preds) == len(targets) == len(splits["val"])
    metrics = task.score((preds, targets))
    assert {m.key for m in task.metrics} <= set(metrics)
    assert all(0.0 <= metrics[m.key] <= 1.0 for m in task.metrics)


def test_same_batch_same_samples_theta_and_phi_see_one_objective():
    task, splits = _task()
    backbone = build_backbone("small_cnn", in_channels=3, width=4, depth=3)
    head = task.build_head_for(backbone)
    batch = _batch(splits["train"], 4, task)
    torch.manual_seed(1)
    a = task.loss(backbone, head, batch)
    torch.manual_seed(2)
    b = task.loss(backbone, head, batch)
    assert a.item() == b.item()  # the samplers' draws come from the batch, not the global RNG


def test_flip_mirrors_boxes_with_images():
    task, splits = _task()
    rows = FakeDetection.collate([splits["train"][i] for i in range(8)])
    images, targets, _ = task.prepare(rows, CPU, torch.Generator().manual_seed(3))
    for image, original, target, raw in zip(images, rows[0], targets, rows[1], strict=True):
        if torch.equal(image, original):
            torch.testing.assert_close(target["boxes"], raw["boxes"])
        else:
            torch.testing.assert_close(image, original.flip(-1))
            torch.testing.assert_close(target["boxes"][:, 0], 64 - raw["boxes"][:, 2])


def test_metrics_perfect_and_empty_predictions():
    task, splits = _task(size=4)
    targets = [splits["val"][i][1] for i in range(4)]
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]} for t in targets]
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 4
    assert task.score((perfect, targets))["ap50_voc07"] == pytest.approx(1.0)
    assert task.score((perfect, targets))["map"] == pytest.approx(1.0)
    assert task.score((empty, targets))["ap50_voc07"] == 0.0


# ------------------------------------------------------------------------------------------------ hypergradient
class RegressPretext(PretextMethod):
    """Predict the mean colour of view 2 from view 1's pooled features."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        self.head = nn.Linear(feature_dim, 3)

    def loss(self, backbone, views):  # type: ignore[no-untyped-def]
        return F.mse_loss(self.head(backbone(views[0])), views[1].mean(dim=(2, 3)))


def test_hypergradient_with_the_detection_loss_matches_a_dense_solve_in_float64():
    """roi_align, nms and the box coder run in float64 on the CPU, so the check is exact to 1e-6."""
    torch.manual_seed(0)
    task, splits = _task(size=8, fpn_channels=4, representation_size=8, rpn_batch_size_per_image=16,
                         box_batch_size_per_image=16)  # fmt: skip
    backbone = build_backbone("small_cnn", in_channels=3, width=2, depth=2).double()
    pretext = RegressPretext(backbone.feature_dim).double()
    head = task.build_head_for(backbone).double()
    settings = BilevelSettings(lam=0.3, damping=2.0, gamma=1.0, solver=SolverSpec("exact", maxiter=0, rtol=None))
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    trainer = BiSSLTrainer(backbone=backbone, pretext=pretext, task=task, head=head, settings=settings,
                           make_lower_optimizer=sgd, make_upper_optimizer=sgd)  # fmt: skip
    with torch.no_grad():
        for p in trainer.phi:
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    views = [torch.rand(6, 3, 64, 64, generator=g, dtype=torch.float64) for _ in range(2)]
    batch = _batch(splits["train"], 4, task)
    grads, _ = trainer.hypergradient(batch, views)
    got = torch.cat([x.reshape(-1) for x in grads[: len(trainer.phi)]])

    names = [n for n, _ in backbone.named_parameters()]
    shapes = [p.shape for p in trainer.theta]
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.theta])

    def pretext_loss(theta_flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta_flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        features = functional_call(backbone, params, (views[0],))
        return F.mse_loss(pretext.head(features), views[1].mean(dim=(2, 3)))

    buffers = {k: v.clone() for k, v in backbone.state_dict().items()}
    hessian = torch.autograd.functional.hessian(pretext_loss, flat)
    backbone.load_state_dict(buffers)
    v = torch.cat([x.reshape(-1) for x in torch.autograd.grad(task.loss(backbone, head, batch), trainer.theta)])
    backbone.load_state_dict(buffers)
    mu = settings.lam + settings.damping
    implicit = mu * torch.linalg.solve(hessian + mu * torch.eye(len(flat), dtype=flat.dtype), v)
    plain = torch.autograd.grad(task.loss(trainer.upper_backbone, head, batch), trainer.phi)
    expected = implicit + torch.cat([x.reshape(-1) for x in plain])
    assert got.dtype == torch.float64
    assert torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected) < 1e-6


def test_a_list_of_short_sides_is_multi_scale_training():
    task, _ = _task(min_size=[48, 56, 64], max_size=64)
    head = task.build_head_for(build_backbone("small_cnn", in_channels=3, width=4, depth=3))
    assert head.transform.min_size == (48, 56, 64) and head.transform.max_size == 64
