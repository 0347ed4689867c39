"""The name of every file bissl writes into a folder: a stage's run folder, a fine-tuning search and a study.

Stages meet only through these files, so each name is written here once and imported wherever it is read or written.
"""

from __future__ import annotations

# A stage's run folder (``out_dir``); its names, top level, are RUN_FILES.
CONFIG_FILE = "config.yaml"  # the config the run was made with (a study folder has one too)
SUMMARY_FILE = "summary.json"  # a finished run's results: its presence marks the run finished
LOCK_FILE = ".lock"  # held while a process writes to the folder
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = f"{CHECKPOINT_DIR}/last.pt"  # what a run resumes from
METRICS_JSONL_FILE = "metrics.jsonl"
METRICS_CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tb"
BACKBONE_FILE = "backbone.pt"  # pretrain, align (theta), finetune: the exported backbone
UPPER_BACKBONE_FILE = "upper_backbone.pt"  # align: the upper level's backbone phi
PRETEXT_HEAD_FILE = "pretext_head.pt"
DOWNSTREAM_HEAD_FILE = "downstream_head.pt"
EMBEDDING_FILE = "embedding.png"  # evaluate: t-SNE of the test features

#: every name a stage writes into its folder; anything else is the user's and is never overwritten
RUN_FILES = frozenset(
    {
        CONFIG_FILE,
        SUMMARY_FILE,
        LOCK_FILE,
        CHECKPOINT_DIR,
        METRICS_JSONL_FILE,
        METRICS_CSV_FILE,
        TENSORBOARD_DIR,
        BACKBONE_FILE,
        UPPER_BACKBONE_FILE,
        PRETEXT_HEAD_FILE,
        DOWNSTREAM_HEAD_FILE,
        EMBEDDING_FILE,
    }
)

# A fine-tuning search's folder (bissl.stages.hpo).
HPO_STUDY_FILE = "study.db"  # the optuna study (SQLite)
HPO_SUMMARY_FILE = "hpo_summary.json"  # the search's best trial and final runs

# A study's folder (bissl.pipeline), beside its CONFIG_FILE.
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
HEADLINE_PLOT_FILE = "headline.png"
CURVES_PLOT_FILE = "curves.png"


def alignment_plot_file(task: str) -> str:
    """The study's t-SNE panel of ``task``: the backbones each arm fine-tunes from."""
    return f"alignment_{task}.png"
