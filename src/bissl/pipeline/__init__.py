"""Studies: pretrain once, then arms (conventional, BiSSL, ...) x tasks x seeds, then a report."""

from bissl.pipeline.study import StudyResult, run_study

__all__ = ["StudyResult", "run_study"]
