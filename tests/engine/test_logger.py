import csv

from bissl.engine.logger import MetricLogger, read_metrics


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
