"""Evaluation of frozen backbones: feature extraction, weighted kNN and linear probes."""

from bissl.eval.features import extract_features
from bissl.eval.knn import knn_accuracy, knn_predict
from bissl.eval.linear_probe import fit_linear_classifier, linear_probe

__all__ = ["extract_features", "fit_linear_classifier", "knn_accuracy", "knn_predict", "linear_probe"]
