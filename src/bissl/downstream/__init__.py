"""Downstream tasks: one contract (:class:`DownstreamTask`), built-ins registered through it (classification)."""

from bissl.downstream import classification, detection
from bissl.downstream.base import DOWNSTREAM_TASKS, DownstreamTask, Metric, TaskConfig, build_task, evaluating
from bissl.downstream.classification import ClassificationTask

__all__ = [
    "DOWNSTREAM_TASKS",
    "ClassificationTask",
    "DownstreamTask",
    "Metric",
    "TaskConfig",
    "build_task",
    "classification",
    "detection",
    "evaluating",
]
