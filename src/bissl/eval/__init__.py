"""Evaluation: frozen-backbone scores (features, weighted kNN, linear probes), the sharded evaluation of a task
through its contract, and detection metrics."""

from bissl.eval.detection_metrics import coco_map, detection_metrics, voc07_ap50
from bissl.eval.features import extract_features
from bissl.eval.frozen import frozen_features, frozen_scores
from bissl.eval.knn import knn_accuracy, knn_k_used, knn_predict
from bissl.eval.linear_probe import fit_linear_classifier, linear_probe, probe_accuracy
from bissl.eval.task import PredictingTask, evaluate_split

__all__ = [
    "PredictingTask",
    "coco_map",
    "detection_metrics",
    "evaluate_split",
    "extract_features",
    "fit_linear_classifier",
    "frozen_features",
    "frozen_scores",
    "knn_accuracy",
    "knn_k_used",
    "knn_predict",
    "linear_probe",
    "probe_accuracy",
    "voc07_ap50",
]
