"""Downstream tasks: a head, a loss on prepared batches and metrics (classification; detection later)."""

from bissl.downstream import classification
from bissl.downstream.base import DOWNSTREAM_TASKS, DownstreamTask
from bissl.downstream.classification import ClassificationTask

__all__ = ["DOWNSTREAM_TASKS", "ClassificationTask", "DownstreamTask", "classification"]
