"""Studies: per replicate (seed) pretrain and draw, then arms (conventional, BiSSL, ...) x tasks, then a report."""

from bissl.pipeline.study import StudyResult, run_study

__all__ = ["StudyResult", "run_study"]
