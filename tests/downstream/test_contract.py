"""A plug-in task that breaks the contract fails in one line (exit 2): before a run folder is made where that can be
seen without data (no metrics), and at its first scoring in every stage otherwise (a declared key score() misses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bissl.cli import main

QUIET = ["log.progress=false", "log.tensorboard=false"]
FINETUNE = ["epochs=1", "batch_size=128", "downstream.data.image_size=8", *QUIET]
ALIGN = [
    "pretext_data.image_size=8", "downstream.data.image_size=8", "lower.batch_size=64", "upper.batch_size=32",
    "bilevel.cycles=1", "bilevel.n_lower=1", "bilevel.n_upper=1", "bilevel.head_warmup_epochs=1", *QUIET,
]  # fmt: skip


def plugin(folder: Path, name: str, metrics: str, *extra: str) -> str:
    """A ``.py`` plug-in registering classification as ``name`` with other declared ``metrics``."""
    path = folder / f"{name}.py"
    body = "".join(f"    {line}\n" for line in extra)
    path.write_text(
        "from bissl.downstream import DOWNSTREAM_TASKS, ClassificationTask, Metric\n\n\n"
        f"@DOWNSTREAM_TASKS.register({name!r}, overwrite=True)\n"
        f"class Task(ClassificationTask):\n    metrics = {metrics}\n{body}"
    )
    return str(path)


def study(out: Path, pretrained: Path, task: str, *extra: str) -> list[str]:
    """A one-arm, one-seed study of ``task`` on 5-shot digits from ``pretrained`` (no pretraining)."""
    return [
        "pipeline", "--out-dir", str(out), f"pretrained={pretrained}", "seeds=[0]", "arms=[{name: conventional}]",
        f"tasks=[{{name: t, downstream: {{task: {task}, data: {{name: digits, image_size: 8}}, few_shot: 5}}, "
        "finetune: {batch_size: 10}}]",
        "search.trials=0", "finetune.epochs=1", "finetune.head_warmup_epochs=1", "evaluate.linear_probe_epochs=2",
        "embedding=false", "align.log.progress=false", "finetune.log.progress=false", "finetune.log.tensorboard=false",
        *extra,
    ]  # fmt: skip


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_a_task_without_metrics_is_refused_before_its_folder_is_made(tmp_path, tiny_pretrained, capsys) -> None:
    broken = plugin(tmp_path, "contract_no_metrics", "()")
    args = ["finetune", "--plugin", broken, "--backbone", str(tiny_pretrained), "downstream.task=contract_no_metrics"]
    assert main([*args, *FINETUNE, "--out-dir", str(tmp_path / "ft")]) == 2
    assert "declares no metrics" in one_line_error(capsys)
    assert not (tmp_path / "ft").exists()
    assert main([*study(tmp_path / "study", tiny_pretrained, "contract_no_metrics"), "--plugin", broken]) == 2
    assert "declares no metrics" in one_line_error(capsys)
    assert not (tmp_path / "study").exists()
    # the fixed plug-in runs in the same folder
    (tmp_path / "fixed").mkdir()
    fixed = plugin(tmp_path / "fixed", "contract_no_metrics", '(Metric("top1"),)')
    assert main([*args[:2], fixed, *args[3:], *FINETUNE, "--out-dir", str(tmp_path / "ft")]) == 0


def test_a_metric_that_is_not_a_metric_is_refused() -> None:
    from bissl.downstream import ClassificationTask
    from bissl.utils.errors import ConfigError

    class Names(ClassificationTask):
        metrics = ("top1",)

    with pytest.raises(ConfigError, match=r"declares 'top1' in `metrics`; declare Metric\(...\)s there"):
        Names.check_contract()


MISSING = "downstream task 'contract_misspelt': score() returned no 'top_1'"


def test_a_misspelt_metric_key_is_one_line_in_finetune_and_align(tmp_path, tiny_pretrained, capsys) -> None:
    misspelt = plugin(tmp_path, "contract_misspelt", '(Metric("top_1"), Metric("loss", higher_is_better=False))')
    args = ["--plugin", misspelt, "downstream.task=contract_misspelt"]
    finetune = ["finetune", "--out-dir", str(tmp_path / "ft"), *args, f"backbone={tiny_pretrained}", *FINETUNE]
    assert main(finetune) == 2
    err = one_line_error(capsys)
    assert MISSING in err and "declared metrics: top_1, loss" in err
    assert main(["align", "--out-dir", str(tmp_path / "al"), *args, f"pretrained={tiny_pretrained}", *ALIGN]) == 2
    assert MISSING in one_line_error(capsys)
    assert main([*study(tmp_path / "study", tiny_pretrained, "contract_misspelt"), "--plugin", misspelt]) == 2
    assert MISSING in one_line_error(capsys)
    # evaluate scores a task through score() where it probes the task's own head (not scored on class labels)
    probed = plugin(tmp_path, "contract_probed", '(Metric("top_1"),)', "class_label_probe = False")
    evaluate = ["evaluate", "--out-dir", str(tmp_path / "ev"), "--plugin", probed, "downstream.task=contract_probed"]
    evaluate += [f"backbone={tiny_pretrained}", "downstream.data.image_size=8", "linear_probe_epochs=1"]
    assert main(evaluate) == 2
    assert "downstream task 'contract_probed': score() returned no 'top_1'" in one_line_error(capsys)
