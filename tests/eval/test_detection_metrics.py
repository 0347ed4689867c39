"""VOC07 AP50 against hand-worked cases and torchmetrics; COCO mAP's pitfalls (empty images, box format)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bissl.eval.detection_metrics import box_iou, coco_map, detection_metrics, voc07_ap50


def pred(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def gt(boxes, labels, difficult=None):
    labels = torch.tensor(labels, dtype=torch.int64)
    flags = torch.zeros(len(labels), dtype=torch.bool) if difficult is None else torch.tensor(difficult)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": labels, "difficult": flags}


A, B = [10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 60.0, 70.0]


def test_box_iou() -> None:
    iou = box_iou(np.array([[0.0, 0, 10, 10]]), np.array([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [20.0, 20, 30, 30]]))
    assert iou == pytest.approx(np.array([[1.0, 50 / 150, 0.0]]))


def test_perfect_predictions_give_one() -> None:
    targets = [gt([A, B], [0, 1]), gt([B], [1])]
    preds = [pred([A, B], [0.9, 0.8], [0, 1]), pred([B], [0.7], [1])]
    voc = voc07_ap50(preds, targets, num_classes=2)
    assert voc["mean"] == pytest.approx(1.0) and voc["per_class"] == pytest.approx([1.0, 1.0])
    assert detection_metrics(preds, targets, 2) == pytest.approx(
        {"ap50_voc07": 1.0, "map": 1.0, "map_50": 1.0, "map_75": 1.0}
    )


def test_a_right_box_with_the_wrong_class_is_a_false_positive() -> None:
    targets = [gt([A], [0])]
    voc = voc07_ap50([pred([A], [0.9], [1])], targets, num_classes=2)
    assert voc["per_class"][0] == 0.0 and math.isnan(voc["per_class"][1])  # class 1 has no ground truth: skipped
    assert voc["mean"] == 0.0 and voc["num_evaluated"] == 1
    # the wrong-class box ranks above the right one: class 0 is still found perfectly
    voc = voc07_ap50([pred([A, A], [0.9, 0.5], [1, 0])], targets, num_classes=2)
    assert voc["mean"] == pytest.approx(1.0)


def test_a_duplicate_detection_is_a_false_positive() -> None:
    # two ground truths; detections: TP (0.9), duplicate of the same box (0.8) -> FP, TP on the second (0.7)
    targets = [gt([A, B], [0, 0])]
    preds = [pred([A, [11.0, 10, 30, 30], B], [0.9, 0.8, 0.7], [0, 0, 0])]
    # recall/precision: (0.5, 1), (0.5, 1/2), (1, 2/3): 6 points at precision 1, 5 at 2/3
    assert voc07_ap50(preds, targets, 1)["mean"] == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)


def test_difficult_ground_truth_is_ignored() -> None:
    # a difficult-only image: a detection on it is neither TP nor FP; the other image's box is found
    targets = [gt([A], [0], [True]), gt([B], [0])]
    preds = [pred([A], [0.95], [0]), pred([B], [0.5], [0])]
    assert voc07_ap50(preds, targets, 1)["mean"] == pytest.approx(1.0)
    # the difficult box is not needed either: not detecting it costs nothing
    assert voc07_ap50([pred([], [], []), pred([B], [0.5], [0])], targets, 1)["mean"] == pytest.approx(1.0)
    # a class with difficult boxes only is skipped
    only = voc07_ap50([pred([A], [0.9], [0])], [gt([A], [0], [True])], 1)
    assert math.isnan(only["per_class"][0]) and only["mean"] == 0.0 and only["num_evaluated"] == 0


def test_empty_images_and_images_without_predictions() -> None:
    targets = [gt([A], [0]), gt([], []), gt([], [])]
    # a detection on an image without ground truth is a false positive (ranked first: precision 1/2 at recall 1)
    preds = [pred([A], [0.5], [0]), pred([B], [0.9], [0]), pred([], [], [])]
    assert voc07_ap50(preds, targets, 1)["mean"] == pytest.approx(0.5)
    # nothing predicted anywhere: AP 0 (the class has ground truth)
    nothing = [pred([], [], [])] * 3
    assert voc07_ap50(nothing, targets, 1)["mean"] == 0.0
    assert coco_map(nothing, targets) == {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    # no ground truth at all: defined as 0.0, no crash
    assert voc07_ap50(preds, [gt([], [])] * 3, 1)["mean"] == 0.0
    assert coco_map(preds, [gt([], [])] * 3) == {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    assert coco_map(nothing, [gt([], [])] * 3) == {"map": 0.0, "map_50": 0.0, "map_75": 0.0}


def test_coco_map_handles_empty_images_and_is_perfect_on_perfect_predictions() -> None:
    targets = [gt([A, B], [0, 1]), gt([], []), gt([B], [2])]
    preds = [pred([A, B], [0.9, 0.8], [0, 1]), pred([], [], []), pred([B], [0.7], [2])]
    assert coco_map(preds, targets) == pytest.approx({"map": 1.0, "map_50": 1.0, "map_75": 1.0})
    # an extra detection on the empty image, scored last, leaves precision 1 up to recall 1: still 1.0
    preds[1] = pred([A], [0.1], [0])
    assert coco_map(preds, targets)["map"] == pytest.approx(1.0)


def test_coco_map_reads_boxes_as_xyxy() -> None:
    # the same box given as (x, y, w, h) would be wrong under xyxy: IoU(A, xywh(A)) = 100/400 < 0.5
    targets = [gt([A], [0])]
    xywh = [A[0], A[1], A[2] - A[0], A[3] - A[1]]
    assert coco_map([pred([xywh], [0.9], [0])], targets)["map_50"] == 0.0
    assert coco_map([pred([A], [0.9], [0])], targets)["map_50"] == pytest.approx(1.0)


def test_coco_map_ignores_detections_on_difficult_boxes() -> None:
    targets = [gt([A, B], [0, 0], [False, True])]
    assert coco_map([pred([B, A], [0.9, 0.8], [0, 0])], targets)["map"] == pytest.approx(1.0)


def _random_scene(rng: np.random.Generator, num_classes: int) -> tuple[dict, dict]:
    """Ground truths on a grid (never overlapping each other) and detections: jittered copies, duplicates, random
    boxes and right boxes with a wrong class, all with distinct random scores."""
    cells = rng.permutation(16)[: rng.integers(0, 5)]
    boxes = np.array([[40.0 * (c % 4), 40.0 * (c // 4), 40.0 * (c % 4) + 30, 40.0 * (c // 4) + 30] for c in cells])
    boxes = boxes.reshape(-1, 4)
    labels = rng.integers(0, num_classes, len(boxes))
    det_boxes, det_labels = [], []
    for box, label in zip(boxes, labels, strict=True):
        for _ in range(rng.integers(0, 3)):  # 0, 1 or 2 (a duplicate) jittered copies
            det_boxes.append(box + rng.uniform(-6, 6, 4))
            det_labels.append(label if rng.random() < 0.8 else (label + 1) % num_classes)
    for _ in range(rng.integers(0, 3)):  # background detections
        x, y = rng.uniform(0, 130, 2)
        det_boxes.append(np.array([x, y, x + rng.uniform(5, 30), y + rng.uniform(5, 30)]))
        det_labels.append(rng.integers(num_classes))
    scores = rng.uniform(0, 1, len(det_boxes))
    return pred(np.array(det_boxes).reshape(-1, 4).tolist(), scores.tolist(), det_labels), gt(boxes.tolist(), labels)


def test_voc07_agrees_with_torchmetrics_at_iou_half_with_11_recall_points() -> None:
    # With ground truths that never overlap each other, COCO's matching equals VOC's, and COCO's precision envelope
    # sampled at recall 0, 0.1, ..., 1 is the 11-point AP: torchmetrics' mAP at these settings must match ours.
    from torchmetrics.detection import MeanAveragePrecision

    rng = np.random.default_rng(0)
    num_classes = 3
    scenes = [_random_scene(rng, num_classes) for _ in range(30)]
    preds, targets = [s[0] for s in scenes], [s[1] for s in scenes]
    ours = voc07_ap50(preds, targets, num_classes)
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="faster_coco_eval", iou_thresholds=[0.5],
        rec_thresholds=np.linspace(0, 1, 11).tolist(), class_metrics=True,
    )  # fmt: skip
    metric.update(preds, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    theirs = metric.compute()
    assert ours["num_evaluated"] == num_classes and 0.1 < ours["mean"] < 0.95  # a non-trivial case
    assert ours["per_class"] == pytest.approx(theirs["map_per_class"].tolist(), abs=1e-6)
    assert ours["mean"] == pytest.approx(float(theirs["map"]), abs=1e-6)


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="one prediction dict per target"):
        voc07_ap50([], [gt([A], [0])], 1)


def _counted_scenes(rng: np.random.Generator, counts: tuple[int, ...], images: int) -> tuple[list, list]:
    """Scenes where class ``c`` has exactly ``counts[c]`` ground truths in all (on a grid, never overlapping), so
    recalls land exactly on k/100 (counts 100, 50, 25); detections: jittered copies (some with the wrong class),
    duplicates and background boxes, with random scores. Coordinates are multiples of 1/8 (exact in float32)."""
    owner = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    per_image = np.array_split(owner, images)
    preds, targets = [], []
    for labels in per_image:
        cells = rng.permutation(64)[: len(labels)]
        boxes = np.array([[40.0 * (c % 8), 40.0 * (c // 8), 40.0 * (c % 8) + 30, 40.0 * (c // 8) + 30] for c in cells])
        det_boxes, det_labels = [], []
        for box, label in zip(boxes.reshape(-1, 4), labels, strict=True):
            for _ in range(rng.integers(0, 3)):
                det_boxes.append(box + np.round(rng.uniform(-8, 8, 4) * 8) / 8)
                det_labels.append(label if rng.random() < 0.8 else (label + 1) % len(counts))
        for _ in range(rng.integers(0, 4)):
            x, y = np.round(rng.uniform(0, 300, 2) * 8) / 8
            det_boxes.append(np.array([x, y, x + 20, y + 24]))
            det_labels.append(rng.integers(len(counts)))
        scores = rng.permutation(len(det_boxes)) / max(len(det_boxes), 1) + rng.uniform(0, 1e-3)
        preds.append(pred(np.array(det_boxes).reshape(-1, 4).tolist(), scores.tolist(), det_labels))
        targets.append(gt(boxes.reshape(-1, 4).tolist(), labels.tolist()))
    return preds, targets


def _pycocotools_map(preds: list, targets: list) -> dict[str, float]:
    """COCOeval's AP@[.5:.95], AP50 and AP75 with its own default parameters."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box: torch.Tensor) -> list[float]:
        x1, y1, x2, y2 = box.double().tolist()
        return [x1, y1, x2 - x1, y2 - y1]

    images, annotations, detections = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        images.append({"id": i})
        for box, label in zip(t["boxes"], t["labels"].tolist(), strict=True):
            w, h = xywh(box)[2:]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": label, "bbox": xywh(box),
                                "area": w * h, "iscrowd": 0})  # fmt: skip
        for box, score, label in zip(p["boxes"], p["scores"].tolist(), p["labels"].tolist(), strict=True):
            detections.append({"image_id": i, "category_id": label, "bbox": xywh(box), "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        categories = sorted({a["category_id"] for a in annotations} | {d["category_id"] for d in detections})
        coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in categories]}
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map": evaluator.stats[0], "map_50": evaluator.stats[1], "map_75": evaluator.stats[2]}


def test_coco_map_equals_pycocotools_where_recalls_hit_hundredths() -> None:
    rng = np.random.default_rng(0)
    preds, targets = _counted_scenes(rng, (100, 50, 25), images=40)
    reference = _pycocotools_map(preds, targets)
    assert 0.05 < reference["map"] < 0.95  # a non-trivial case
    assert coco_map(preds, targets) == pytest.approx(reference, abs=1e-6)
    # the number does not depend on torch's default dtype
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert coco_map(preds, targets) == pytest.approx(reference, abs=1e-6)
    finally:
        torch.set_default_dtype(previous)


def test_voc07_conventions_at_their_boundaries() -> None:
    # the conventions tested here are the ones the docstring states
    assert all(text in voc07_ap50.__doc__ for text in ("no +1 pixel", "IoU **> 0.5**", "``k * 0.1`` in float64"))
    # continuous coordinates, no +1 pixel: [0, 0, 10, 5] covers exactly half of [0, 0, 10, 10] (IoU 0.5, not 0.5+)
    target = [gt([[0.0, 0, 10, 10]], [0])]
    assert box_iou(np.array([[0.0, 0, 10, 5]]), np.array([[0.0, 0, 10, 10]]))[0, 0] == 0.5
    # a match needs IoU > 0.5 (the Python port's rule; the MATLAB devkit would count IoU = 0.5)
    assert voc07_ap50([pred([[0.0, 0, 10, 5]], [0.9], [0])], target, 1)["mean"] == 0.0
    assert voc07_ap50([pred([[0.0, 0, 10, 5.5]], [0.9], [0])], target, 1)["mean"] == pytest.approx(1.0)
    # recall points are k * 0.1 in float64: a recall of exactly 3/10 reaches 0, 0.1 and 0.2 but not 3 * 0.1
    targets = [gt([[40.0 * i, 0, 40.0 * i + 30, 30]], [0]) for i in range(10)]
    preds = [pred([[40.0 * i, 0, 40.0 * i + 30, 30]] if i < 3 else [], [0.9] if i < 3 else [], [0] if i < 3 else [])
             for i in range(10)]  # fmt: skip
    assert voc07_ap50(preds, targets, 1)["mean"] == pytest.approx(3 / 11)
