import csv
import errno
from pathlib import Path
from unittest import mock

import pytest

from bissl.engine.logger import MetricLogger, read_metrics
from bissl.utils.errors import BisslError


def test_jsonl_and_csv_and_resume_truncation(tmp_path):
    logger = MetricLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, "train", {"loss": 1.0 / step, "lr": 0.1})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")] == [1, 2, 3]
    # Resuming at step 2 drops what the interrupted run logged after its checkpoint.
    logger = MetricLogger(tmp_path, tensorboard=False, resume_step=2)
    logger.log(3, "train", {"loss": 0.5})
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert rows[0] == {"step": "1", "tag": "train", "name": "loss", "value": "1.0"}
    assert len(rows) == 5  # 2 + 2 kept, 1 new


def test_tensorboard_events_written(tmp_path):
    logger = MetricLogger(tmp_path, tensorboard=True)
    logger.log(1, "train", {"loss": 1.0})
    logger.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    logger = MetricLogger(tmp_path, tensorboard=False)
    for step in (1, 2):
        logger.log(step, "train", {"loss": 1.0})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "tag": "tr')  # killed mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropped a torn last line"):
        logger = MetricLogger(tmp_path, tensorboard=False, resume_step=2)
    logger.log(3, "train", {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_garbage_before_the_last_line_is_one_line_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "tag": "train", "loss": 1.0}\nGARBAGE\n{"step": 2, "tag": "t"}\n'
    )
    with pytest.raises(BisslError, match=r"metrics.jsonl:2: not a metrics record .*pass --overwrite") as info:
        MetricLogger(tmp_path, tensorboard=False, resume_step=2)
    assert "\n" not in str(info.value)
    assert "GARBAGE" in (tmp_path / "metrics.jsonl").read_text()  # nothing rewritten


def test_disk_full_in_tensorboard_degrades_to_csv_and_json(tmp_path):
    logger = MetricLogger(tmp_path, tensorboard=True)
    full = OSError(errno.ENOSPC, "No space left on device")
    with (
        mock.patch.object(logger._writer, "add_scalar", side_effect=full),
        pytest.warns(
            UserWarning, match=r"TensorBoard logging to .*tb failed \(.*No space left on device\); continuing"
        ),
    ):
        logger.log(1, "train", {"loss": 1.0})
    logger.log(2, "train", {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert len(list(csv.DictReader((tmp_path / "metrics.csv").open()))) == 2


def test_disk_full_in_csv_or_json_is_one_line_error(tmp_path):
    logger = MetricLogger(tmp_path, tensorboard=False)
    real_open = Path.open

    def full_open(self, mode="r", *args, **kwargs):
        if mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    with mock.patch.object(Path, "open", full_open), pytest.raises(BisslError, match=r"disk full while logging"):
        logger.log(1, "train", {"loss": 1.0})


def test_a_resumed_run_does_not_write_a_kept_record_twice(tmp_path):
    """Resumed from its last checkpoint (its summary.json was deleted), a run logs its final record again: kept once."""
    logger = MetricLogger(tmp_path, tensorboard=False)
    logger.log(5, "train", {"loss": 0.5})
    logger.log(5, "final", {"test_top1": 0.9})
    logger.close()
    logger = MetricLogger(tmp_path, tensorboard=False, resume_step=5)
    logger.log(5, "final", {"test_top1": 0.9})
    logger.log(6, "final", {"test_top1": 0.9})
    logger.close()
    assert [(r["step"], r["tag"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (5, "train"), (5, "final"), (6, "final")
    ]  # fmt: skip
    assert len(list(csv.DictReader((tmp_path / "metrics.csv").open()))) == 3


def test_disk_full_in_tensorboards_writer_thread_is_one_warning_not_a_traceback(tmp_path, monkeypatch):
    """TensorBoard writes from its own thread: a full disk there must not print the thread's traceback (Python's
    ``threading.excepthook``); the logger warns once in the main thread instead."""
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    printed = []
    monkeypatch.setattr(threading, "excepthook", printed.append)  # what would print the traceback

    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch.object(RecordWriter, "write", side_effect=full), pytest.warns(UserWarning, match="TensorBoard"):
        logger = MetricLogger(tmp_path, tensorboard=True)
        for step in range(1, 30):
            logger.log(step, "train", {"loss": 1.0})
        logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 30))
    assert printed == []
