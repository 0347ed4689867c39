"""Every file bissl writes into a folder is named once, in bissl.engine.files, and no two names collide."""

from __future__ import annotations

from bissl.engine import files


def _names() -> dict[str, str]:
    return {key: value for key, value in vars(files).items() if key.endswith(("_FILE", "_DIR"))}


def test_every_name_is_distinct() -> None:
    names = _names()
    assert len(set(names.values())) == len(names), names


def test_run_files_hold_every_run_folder_name() -> None:
    search_or_study = {
        files.HPO_STUDY_FILE,
        files.HPO_SUMMARY_FILE,
        files.RESULTS_FILE,
        files.REPORT_FILE,
        files.HEADLINE_PLOT_FILE,
        files.CURVES_PLOT_FILE,
    }  # a search's or a study's folder
    assert {name.split("/")[0] for name in _names().values()} - search_or_study == files.RUN_FILES
