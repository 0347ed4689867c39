"""Detection metrics on lists of per-image dicts: VOC07 11-point AP50 (by hand) and COCO mAP (torchmetrics).

Predictions: ``{"boxes": [N, 4] xyxy, "scores": [N], "labels": [N]}``; targets: ``{"boxes", "labels",
"difficult"}`` (``difficult`` optional), one dict per image in the same order, boxes in the same pixel frame
(continuous coordinates, :mod:`bissl.data.detection`).

Undefined values: where no (non-difficult) ground truth exists at all, every mean here is 0.0 (torchmetrics says
-1 there; we map it to 0.0 so that every value stays in [0, 1]); per-class VOC APs of classes without
non-difficult ground truth are NaN and left out of the mean, as in the VOC devkit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

VOC_IOU = 0.5
VOC_RECALL_POINTS = np.linspace(0.0, 1.0, 11)
#: COCO's IoU and recall thresholds exactly as pycocotools builds them (``Params.setDetParams``: numpy, float64);
#: torchmetrics' defaults come from ``torch.linspace`` in torch's default dtype, and a recall of exactly k/100
#: then falls on the other side of a float32 threshold
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True).tolist()
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True).tolist()

Detections = Sequence[dict[str, torch.Tensor]]


def _array(value: object, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    if value is None:
        return np.zeros((0, *shape[1:]), dtype=dtype)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype).reshape(shape)


def _check(predictions: Detections, targets: Detections) -> None:
    if len(predictions) != len(targets):
        raise ValueError(f"need one prediction dict per target dict, got {len(predictions)} and {len(targets)}")


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU ``[N, M]`` of xyxy boxes in continuous coordinates (area ``(x2 - x1) * (y2 - y1)``, no +1)."""
    lt = np.maximum(boxes[:, None, :2], others[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.clip(rb - lt, 0.0, None).prod(axis=2)
    area = (boxes[:, 2:] - boxes[:, :2]).clip(0.0).prod(axis=1)
    other_area = (others[:, 2:] - others[:, :2]).clip(0.0).prod(axis=1)
    union = area[:, None] + other_area[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def voc07_ap50(predictions: Detections, targets: Detections, num_classes: int) -> dict[str, object]:
    """Pascal VOC 2007 AP at IoU 0.5 with 11-point interpolation, per class and its mean (the VOC devkit's rule).

    Conventions, those of the devkit's Python port (``voc_eval.py`` of py-faster-rcnn / Detectron, whose numbers
    most papers report), where they differ from the MATLAB devkit:

    - continuous coordinates: box areas are ``(x2 - x1) * (y2 - y1)``, no +1 pixel (the devkit adds 1 because VOC
      annotations are inclusive integer pixel indices; our boxes are continuous, :mod:`bissl.data.detection`);
    - a detection matches only at IoU **> 0.5** (the port's ``ovmax > ovthresh``; the MATLAB devkit counts IoU =
      0.5 as a match): a box with IoU exactly 0.5 is a false positive;
    - the 11 recall points are ``k * 0.1`` in float64 (``np.linspace(0, 1, 11)``, the port's
      ``np.arange(0, 1.1, 0.1)``), so e.g. ``3 * 0.1 = 0.30000000000000004``: a recall of exactly 3/10 does not
      reach the point 0.3.

    Per class: all detections of that class over all images, sorted by score (stable); each one takes the ground
    truth box of its class and image with the highest IoU; IoU > 0.5 with a difficult box: ignored (neither TP nor
    FP); IoU > 0.5 with a box not matched yet: TP (the box is now matched); otherwise (already matched: a duplicate,
    or no overlap): FP. Recall is over non-difficult boxes; AP = mean over recall r in {0, 0.1, ..., 1} of the
    highest precision at recall >= r (0 where that recall is never reached). A class without non-difficult ground
    truth has AP NaN and is left out of the mean.

    Returns ``{"mean": float, "per_class": list[float] (NaN for skipped classes), "num_evaluated": int}``.
    """
    _check(predictions, targets)
    positives = np.zeros(num_classes, dtype=np.int64)
    all_scores, all_labels, all_outcomes = [], [], []  # per image; outcome 1: TP, 0: FP, -1: ignored (difficult)
    for pred, target in zip(predictions, targets, strict=True):
        gt_labels = _array(target["labels"], np.int64, (-1,))
        difficult = _array(target.get("difficult"), bool, (-1,))
        difficult = difficult if len(difficult) else np.zeros(len(gt_labels), dtype=bool)
        counted = gt_labels[~difficult]
        positives += np.bincount(counted[(counted >= 0) & (counted < num_classes)], minlength=num_classes)
        labels, confidence = _array(pred["labels"], np.int64, (-1,)), _array(pred["scores"], np.float64, (-1,))
        outcome = np.zeros(len(labels), dtype=np.int8)  # FP unless matched below
        if len(labels) and len(gt_labels):
            overlaps = box_iou(_array(pred["boxes"], np.float64, (-1, 4)), _array(target["boxes"], np.float64, (-1, 4)))
            overlaps[labels[:, None] != gt_labels[None, :]] = -1.0  # a box matches ground truth of its class only
            best, best_iou = overlaps.argmax(axis=1), overlaps.max(axis=1)
            matched = np.zeros(len(gt_labels), dtype=bool)
            order = np.argsort(-confidence, kind="stable")
            for k in order[best_iou[order] > VOC_IOU].tolist():  # in score order: earlier ones match first
                j = best[k]
                if difficult[j]:
                    outcome[k] = -1
                elif not matched[j]:
                    outcome[k], matched[j] = 1, True
        all_scores.append(confidence)
        all_labels.append(labels)
        all_outcomes.append(outcome)
    scores_cat = np.concatenate(all_scores) if all_scores else np.zeros(0)
    labels_cat = np.concatenate(all_labels) if all_labels else np.zeros(0, dtype=np.int64)
    outcomes_cat = np.concatenate(all_outcomes) if all_outcomes else np.zeros(0, dtype=np.int8)
    per_class: list[float] = []
    for cls in range(num_classes):
        if positives[cls] == 0:
            per_class.append(math.nan)
            continue
        mine = labels_cat == cls
        outcome = outcomes_cat[mine][np.argsort(-scores_cat[mine], kind="stable")]  # all images, by score
        tp_sum, fp_sum = np.cumsum(outcome == 1), np.cumsum(outcome == 0)
        recall = tp_sum / positives[cls]
        precision = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)
        ap = 0.0
        for point in VOC_RECALL_POINTS:
            reached = recall >= point
            ap += (precision[reached].max() if reached.any() else 0.0) / len(VOC_RECALL_POINTS)
        per_class.append(float(ap))
    evaluated = [ap for ap in per_class if not math.isnan(ap)]
    return {
        "mean": float(np.mean(evaluated)) if evaluated else 0.0,
        "per_class": per_class,
        "num_evaluated": len(evaluated),
    }


def _coco_backend() -> str:
    import importlib.util

    for backend, module in (("faster_coco_eval", "faster_coco_eval"), ("pycocotools", "pycocotools")):
        if importlib.util.find_spec(module) is not None:
            return backend
    raise ImportError("coco_map needs faster-coco-eval (a core dependency): reinstall bissl (pip install -e .)")


def coco_map(predictions: Detections, targets: Detections, *, max_detections: int = 100) -> dict[str, float]:
    """COCO box mAP (IoU 0.5:0.95, 101-point), mAP at IoU 0.5 and at 0.75, by torchmetrics' MeanAveragePrecision.

    The numbers are pycocotools' COCOeval's: its IoU and recall thresholds are passed explicitly
    (:data:`COCO_IOU_THRESHOLDS`, :data:`COCO_RECALL_THRESHOLDS`), so they do not depend on torch's default dtype.
    Backend faster_coco_eval (pycocotools if it is missing); difficult targets are passed as ``iscrowd`` (a
    detection on one is ignored, as COCO does for crowds). Images without predictions or without targets are
    fine; where no image has any ground truth the values are 0.0 (torchmetrics gives -1). ``max_detections``
    per image (COCO's 100) must be at least as large as the number a detector keeps, or low-scored boxes are cut.
    """
    from torchmetrics.detection import MeanAveragePrecision

    _check(predictions, targets)
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend=_coco_backend(), max_detection_thresholds=[1, 10, max_detections],
        iou_thresholds=COCO_IOU_THRESHOLDS, rec_thresholds=COCO_RECALL_THRESHOLDS,
    )  # fmt: skip
    preds, gts = [], []
    for pred, target in zip(predictions, targets, strict=True):
        preds.append({
            "boxes": torch.as_tensor(_array(pred["boxes"], np.float32, (-1, 4))),
            "scores": torch.as_tensor(_array(pred["scores"], np.float32, (-1,))),
            "labels": torch.as_tensor(_array(pred["labels"], np.int64, (-1,))),
        })  # fmt: skip
        labels = torch.as_tensor(_array(target["labels"], np.int64, (-1,)))
        difficult = _array(target.get("difficult"), bool, (-1,))
        crowd = torch.as_tensor(difficult if len(difficult) else np.zeros(len(labels), dtype=bool)).long()
        gts.append({"boxes": torch.as_tensor(_array(target["boxes"], np.float32, (-1, 4))), "labels": labels,
                    "iscrowd": crowd})  # fmt: skip
    if not any(len(g["labels"]) for g in gts):
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}  # nothing to find: COCO's value would be -1
    metric.update(preds, gts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about many detections and about its backend
        result = metric.compute()
    return {key: max(float(result[key]), 0.0) for key in ("map", "map_50", "map_75")}


def detection_metrics(predictions: Detections, targets: Detections, num_classes: int) -> dict[str, float]:
    """``{"ap50_voc07", "map", "map_50", "map_75"}``, all in [0, 1] (higher is better)."""
    return {"ap50_voc07": voc07_ap50(predictions, targets, num_classes)["mean"], **coco_map(predictions, targets)}
