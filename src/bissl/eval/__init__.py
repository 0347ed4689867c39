"""Evaluation of frozen backbones (feature extraction, weighted kNN, linear probes) and detection metrics."""

from bissl.eval.detection_metrics import coco_map, detection_metrics, voc07_ap50
from bissl.eval.features import extract_features
from bissl.eval.knn import knn_accuracy, knn_k_used, knn_predict
from bissl.eval.linear_probe import fit_linear_classifier, linear_probe, probe_accuracy

__all__ = [
    "coco_map",
    "detection_metrics",
    "extract_features",
    "fit_linear_classifier",
    "knn_accuracy",
    "knn_k_used",
    "knn_predict",
    "linear_probe",
    "probe_accuracy",
    "voc07_ap50",
]
