import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import bissl.stages.hpo as hpo_module
from bissl.config import FinetuneConfig, load_config
from bissl.engine.checkpoint import backbone_spec, export_backbone
from bissl.models import build_backbone
from bissl.stages.hpo import final_runs, open_study, search, with_params
from bissl.utils.errors import BisslError, ConfigError
from bissl.utils.io import load_torch

optuna = pytest.importorskip("optuna")
TrialState = optuna.trial.TrialState
ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "epochs=2",
    "batch_size=128",
    "downstream.data.image_size=8",
    "hpo.lr_range=[0.01, 0.3]",
    "log.progress=false",
    "log.tensorboard=false",
]


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    torch.manual_seed(0)
    net = build_backbone("small_cnn", in_channels=1, width=8)
    path = tmp_path_factory.mktemp("backbone") / "backbone.pt"
    export_backbone(path, net, backbone_spec("small_cnn", 1, True, {"width": 8}))
    return path


@pytest.fixture
def make_cfg(backbone_file, tmp_path):
    def make(*extra: str, out: str = "hpo") -> FinetuneConfig:
        overrides = [*TINY, f"backbone={backbone_file}", f"out_dir={tmp_path / out}", *extra]
        return load_config(FinetuneConfig, "finetune_digits", overrides)

    return make


def _params(trials):
    return [(t["params"]["lr"], t["params"]["weight_decay"]) for t in trials]


@pytest.mark.e2e
def test_search_resumes_without_rerunning_finished_trials(make_cfg, tmp_path):
    first = search(make_cfg("hpo.trials=3"))
    assert first.new_trials == 3 and [t["state"] for t in first.trials] == ["COMPLETE"] * 3
    for trial in first.trials:
        assert 0.01 <= trial["params"]["lr"] <= 0.3 and 1e-5 <= trial["params"]["weight_decay"] <= 1e-2
        reported = trial["intermediate_values"]  # the pruning hook reports val top1 after every epoch
        assert sorted(reported) == [1, 2] and all(0 <= v <= 1 for v in reported.values())
        assert trial["value"] == pytest.approx(max(reported.values()))  # the best validation epoch is kept
        assert (tmp_path / "hpo" / "trials" / str(trial["number"]) / "summary.json").is_file()
    assert first.best_value == max(t["value"] for t in first.trials)

    again = search(make_cfg("hpo.trials=3"))
    assert again.new_trials == 0 and _params(again.trials) == _params(first.trials)
    more = search(make_cfg("hpo.trials=4"))
    assert more.new_trials == 1 and len(more.trials) == 4 and _params(more.trials)[:3] == _params(first.trials)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_draws_depend_only_on_seed_and_trial_number(make_cfg, sampler):
    """A resumed (or parallel) search draws what one uninterrupted search draws; the seed changes them."""

    def draws(cfg, *chunks):
        for n in chunks:
            study = open_study(cfg)  # a new process: a new sampler object
            study.optimize(lambda t: -abs(t.suggest_float("lr", 1e-4, 1, log=True) - 0.1), n_trials=n)
        return [t.params["lr"] for t in study.trials]

    n = 12 if sampler == "tpe" else 5  # TPE's random start-up is 10 trials: 2 model-based draws
    whole = draws(make_cfg(f"hpo.sampler={sampler}", out="a"), n)
    assert len(set(whole)) == n
    assert draws(make_cfg(f"hpo.sampler={sampler}", out="b"), n - 3, 2, 1) == whole
    if sampler == "random":
        assert draws(make_cfg("seed=1", out="c"), n) != whole


def _seeded_draw(cfg, number):
    """The (lr, weight_decay) the sampler seeded by trial ``number`` draws, in a throw-away study."""
    sampler = hpo_module._sampler(optuna, cfg.hpo.sampler, cfg.seed)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for _ in range(number + 1):
        trial = study.ask()
        drawn = (
            trial.suggest_float("lr", *cfg.hpo.lr_range, log=True),
            trial.suggest_float("weight_decay", *cfg.hpo.weight_decay_range, log=True),
        )
        study.tell(trial, 0.0)
    return drawn


@pytest.mark.e2e
def test_dead_trials_with_or_without_a_heartbeat_are_requeued_with_their_settings(make_cfg, tmp_path):
    cfg = make_cfg("hpo.trials=2", "hpo.heartbeat_s=1")
    study = open_study(cfg)
    with pytest.warns(UserWarning, match="Heartbeat"):
        orphan = study.ask()  # its worker was killed before the first heartbeat: must not stay RUNNING forever
        dead = study.ask()  # a trial whose process was killed: its heartbeat stops
    lr = dead.suggest_float("lr", *cfg.hpo.lr_range, log=True)
    dead.suggest_float("weight_decay", *cfg.hpo.weight_decay_range, log=True)
    dead_dir = tmp_path / "hpo" / "trials" / str(dead.number)
    dead.set_user_attr("run_dir", str(dead_dir))
    dead_dir.mkdir(parents=True)
    (dead_dir / "partial.txt").write_text("left by the killed process")
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3.5)  # grace period 2 x heartbeat_s, plus 1 s: SQLite timestamps are whole seconds

    result = search(cfg)
    states = {t["number"]: t["state"] for t in result.trials}
    assert states[orphan.number] == "FAIL" and states[dead.number] == "FAIL"
    assert result.new_trials == 2 and list(states.values()).count("COMPLETE") == 2 and len(states) == 4
    retry = next(t for t in result.trials if t["state"] == "COMPLETE" and t["user_attrs"]["run_dir"] == str(dead_dir))
    assert retry["params"]["lr"] == lr and retry["number"] > dead.number
    assert not (dead_dir / "partial.txt").exists() and (dead_dir / "summary.json").is_file()
    # The orphan died before drawing: its retry draws the settings seeded by the orphan's number, not its own.
    orphan_retry = next(t for t in result.trials if t["state"] == "COMPLETE" and t is not retry)
    assert (orphan_retry["params"]["lr"], orphan_retry["params"]["weight_decay"]) == _seeded_draw(cfg, orphan.number)


def test_a_trial_started_beyond_hpo_trials_is_skipped_not_run(make_cfg, monkeypatch):
    cfg = make_cfg("hpo.trials=1")
    study = open_study(cfg)
    with pytest.warns(UserWarning, match="Heartbeat"):
        study.ask()  # another worker's running trial holds the only slot
        late = study.ask()
    monkeypatch.setattr(hpo_module, "finetune", lambda *a, **k: pytest.fail("an excess trial must not run"))
    objective = hpo_module._objective(optuna, cfg, cfg.hpo, "top1")
    with pytest.raises(hpo_module._Skipped):
        objective(late)
    assert "hpo.trials=1" in study._storage.get_trial(late._trial_id).user_attrs["skipped"]


def _fake_finetune(run_cfg, on_eval=None, **_):
    """Fine-tuning in a blink: the validation metric is a fixed function of the learning rate."""
    value = 1.0 / (1.0 + abs(run_cfg.optim.lr - 0.1))
    if on_eval is not None:
        on_eval(1, {"top1": value})
    time.sleep(0.3)
    return hpo_module.FinetuneResult(Path(run_cfg.out_dir), 1, True, best_epoch=1, metrics={"val_top1": value})


# A worker process: fake fine-tuning, wait for the start signal (argv[1]) so both race on the fresh database.
WORKER = """
import sys, time
from pathlib import Path
import tests.stages.test_hpo as t
from bissl.config import FinetuneConfig, load_config
import bissl.stages.hpo as hpo

hpo.finetune = t._fake_finetune
cfg = load_config(FinetuneConfig, "finetune_digits", sys.argv[2:])
while not Path(sys.argv[1]).exists():
    time.sleep(0.01)
hpo.search(cfg)
"""


@pytest.mark.e2e
def test_two_workers_on_a_fresh_sqlite_study_finish_exactly_hpo_trials(make_cfg, tmp_path):
    out = tmp_path / "odd?name#x%y"  # URL-special characters in out_dir must not misplace the study
    args = [*TINY, "backbone=unused.pt", f"out_dir={out}", "hpo.trials=4", "hpo.heartbeat_s=1"]
    go = tmp_path / "go"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(go), *args], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    time.sleep(3)  # both have paid their imports
    go.touch()
    errors = [w.communicate(timeout=240)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    assert (out / "study.db").is_file() and not list(tmp_path.glob("odd*study.db"))
    study = open_study(make_cfg(*args[len(TINY) :]))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4
    cfg = make_cfg(*args[len(TINY) :])
    assert sorted((t.params["lr"], t.params["weight_decay"]) for t in finished) == sorted(
        _seeded_draw(cfg, t.number) for t in finished
    )


def test_racing_table_creation_is_retried(make_cfg, monkeypatch):
    from sqlalchemy.exc import OperationalError

    real = optuna.storages.RDBStorage
    calls = []

    class Racing(real):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    open_study(make_cfg())
    assert len(calls) == 2


@pytest.mark.e2e
def test_pruned_and_non_finite_trials_are_recorded_not_crashes(make_cfg, monkeypatch):
    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **_: optuna.pruners.ThresholdPruner(lower=2.0))
    with pytest.raises(BisslError, match="no trial of study 'finetune_digits' completed"):
        search(make_cfg("hpo.trials=2", out="pruned"))
    study = open_study(make_cfg(out="pruned"))
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] for t in study.trials)
    assert "pruned at epoch 1 (val top1" in study.trials[0].user_attrs["pruned_reason"]

    cfg = make_cfg("hpo.trials=1", "hpo.pruner=none", "hpo.lr_range=[1e20, 1e21]", out="nan")
    with pytest.raises(BisslError, match="no trial"):
        search(cfg)
    (trial,) = open_study(cfg).trials
    assert trial.state == TrialState.PRUNED
    assert "fine-tuning loss at step" in trial.user_attrs["pruned_reason"]


@pytest.mark.e2e
def test_final_runs_aggregate_resume_and_apply_the_seed(make_cfg, tmp_path):
    cfg = make_cfg("hpo.trials=2")
    found = search(cfg)
    results = final_runs(cfg, found.best_params, [0, 1], search=found)
    summary = json.loads((tmp_path / "hpo" / "hpo_summary.json").read_text())
    assert summary["best_params"] == found.best_params and summary["best_trial"] == found.best_trial
    assert [(t["state"], t["params"]) for t in summary["trials"]] == [("COMPLETE", t["params"]) for t in found.trials]
    top1 = [r["metrics"]["test_top1"] for r in summary["per_seed"]]
    assert [r.metrics["test_top1"] for r in results] == top1 and all(0 <= v <= 1 for v in top1)
    assert summary["aggregate"]["test_top1"] == {"mean": statistics.fmean(top1), "std": statistics.stdev(top1), "n": 2}
    weights = [load_torch(r.out_dir / "backbone.pt")["state_dict"] for r in results]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # seeds differ

    stamp = (results[1].out_dir / "summary.json").stat().st_mtime_ns
    again = final_runs(cfg, found.best_params, [0, 1], search=found)  # finished seeds are read back
    assert (results[1].out_dir / "summary.json").stat().st_mtime_ns == stamp
    assert [r.metrics for r in again] == [r.metrics for r in results]

    (twin,) = final_runs(make_cfg(out="twin"), found.best_params, [1])  # the same seed elsewhere: identical
    assert twin.metrics == results[1].metrics
    twin_weights = load_torch(twin.out_dir / "backbone.pt")["state_dict"]
    assert all(torch.equal(twin_weights[k], weights[1][k]) for k in twin_weights)

    other = {**found.best_params, "lr": found.best_params["lr"] / 2}
    (rerun,) = final_runs(cfg, other, [1])  # a new best setting re-runs the seed folder
    assert rerun.out_dir == results[1].out_dir and (rerun.out_dir / "summary.json").stat().st_mtime_ns != stamp
    assert json.loads((tmp_path / "hpo" / "hpo_summary.json").read_text())["best_params"] == other


def test_bad_setups_are_one_line_errors(make_cfg, monkeypatch):
    open_study(make_cfg())
    with pytest.raises(ConfigError, match=r"was run with another config \(epochs: 2 -> 3\)"):
        open_study(make_cfg("epochs=3"))
    with pytest.raises(ConfigError, match=r"cannot open hpo\.storage 'nosuchdb://u:\*\*\*@host/x'"):
        open_study(make_cfg("hpo.storage=nosuchdb://u:secret@host/x"))
    with pytest.raises(ConfigError, match=r"hpo\.trials is 0"):
        search(make_cfg())
    with pytest.raises(ConfigError, match=r"hpo\.lr_range"):
        make_cfg("hpo.lr_range=[0.1, 0.01]")
    with pytest.raises(ConfigError, match=r"distinct seeds \(got \[0, 0\]\)"):
        final_runs(make_cfg(), {"lr": 0.1, "weight_decay": 1e-4}, [0, 0])
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(
        BisslError, match=r"^hyper-parameter search needs optuna \(a core dependency\): pip install -e \.$"
    ):
        search(make_cfg("hpo.trials=1"))


@pytest.mark.e2e
def test_a_lower_is_better_primary_metric_is_minimised(make_cfg, monkeypatch):
    """The study's direction and best trial follow the task's primary metric (here a user task's loss-like metric)."""
    from bissl.downstream import DOWNSTREAM_TASKS, ClassificationTask, Metric

    @DOWNSTREAM_TASKS.register("test_lower_is_better", overwrite=True)
    class LowerIsBetter(ClassificationTask):
        metrics = (Metric("loss", higher_is_better=False), *ClassificationTask.metrics)

    cfg = make_cfg("hpo.trials=3", "hpo.final_seeds=[]", "downstream.task=test_lower_is_better", "hpo.pruner=none")
    assert open_study(cfg).direction == optuna.study.StudyDirection.MINIMIZE
    found = search(cfg)
    values = [t["value"] for t in found.trials if t["state"] == "COMPLETE"]
    assert found.metric == "loss" and found.best_value == min(values)


@pytest.mark.e2e
def test_l2sp_is_searched_only_when_a_range_is_given(make_cfg, tmp_path):
    found = search(make_cfg("hpo.trials=2", "hpo.l2sp_range=[0.01, 1.0]"))
    assert all(0.01 <= t["params"]["l2sp"] <= 1.0 for t in found.trials)
    run = yaml.safe_load((tmp_path / "hpo" / "trials" / "0" / "config.yaml").read_text())
    assert run["l2sp"] == found.trials[0]["params"]["l2sp"] and "l2sp" not in run["optim"]
    assert "l2sp" not in search(make_cfg("hpo.trials=1", out="plain")).best_params
    cfg = with_params(make_cfg(), {"lr": 0.1, "weight_decay": 1e-3, "l2sp": 0.5})  # what a study's runs get
    assert (cfg.l2sp, cfg.optim.lr, cfg.optim.weight_decay) == (0.5, 0.1, 1e-3)


def _smooth_finetune(run_cfg, on_eval=None, **_):
    """Fine-tuning in a blink: validation and test metrics are fixed functions of the settings, over 2 epochs."""
    import math

    value = 1.0 / (1.0 + abs(math.log(run_cfg.optim.lr / 0.05)) + abs(math.log(run_cfg.optim.weight_decay / 1e-3)))
    for epoch in (1, 2):
        if on_eval is not None:
            on_eval(epoch, {"top1": value * epoch / 2})
    metrics = {"val_top1": value, "test_top1": value - 0.01 * run_cfg.seed}
    return hpo_module.FinetuneResult(Path(run_cfg.out_dir), 2, True, best_epoch=2, metrics=metrics)


def _interrupting(kill: str, at: int):
    """A fine-tuning that fails like ``kill`` at its ``at``-th call, else runs like :func:`_smooth_finetune`."""
    import errno

    from bissl.utils.errors import RunTerminated

    calls = []

    def run(run_cfg, on_eval=None, **kwargs):
        calls.append(1)
        if len(calls) == at + 1:
            if kill == "sigkill":
                os._exit(137)
            if kill == "sigterm":
                raise RunTerminated("terminated (SIGTERM) at finetune step 3")
            raise OSError(errno.ENOSPC, "No space left on device")
        return _smooth_finetune(run_cfg, on_eval, **kwargs)

    return run


@pytest.mark.e2e
@pytest.mark.parametrize("kill", ["sigterm", "sigkill", "disk"])
@pytest.mark.parametrize("at", [0, 3, 6])
def test_an_interrupted_search_ends_as_an_uninterrupted_one(make_cfg, monkeypatch, kill, at):
    """Killed in trial ``at`` (SIGTERM, kill -9 or a full disk) and run again, a search runs the same settings in the
    same slots, prunes alike (the median pruner starts at trial 5), and ends with the same best setting and test
    metric as a search that was never interrupted."""
    import multiprocessing

    def outcome(cfg):
        found = search(cfg)
        slots = sorted(
            (t["user_attrs"]["slot"], t["state"], t["params"]["lr"], t["params"]["weight_decay"])
            for t in found.trials
            if t["state"] in ("COMPLETE", "PRUNED")
        )
        (final,) = final_runs(cfg, found.best_params, [1], search=found)
        return slots, found.best_params, found.best_value, final.metrics["test_top1"]

    monkeypatch.setattr(hpo_module, "finetune", _smooth_finetune)
    whole = outcome(make_cfg("hpo.trials=7", out="whole"))
    assert [s[0] for s in whole[0]] == list(range(7))

    cfg = make_cfg("hpo.trials=7", out="cut")
    monkeypatch.setattr(hpo_module, "finetune", _interrupting(kill, at))
    if kill == "sigkill":
        child = multiprocessing.get_context("fork").Process(target=search, args=(cfg,))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == 137
    else:
        with pytest.raises(BisslError if kill == "sigterm" else OSError):
            search(cfg)
    monkeypatch.setattr(hpo_module, "finetune", _smooth_finetune)
    assert outcome(cfg) == whole


def test_a_failing_trial_is_logged_in_one_line_without_optunas_traceback(make_cfg, monkeypatch, capfd, caplog):
    def broken(*args, **kwargs):
        raise BisslError("dataset 'digits' is empty; check its root folder")

    monkeypatch.setattr(hpo_module, "finetune", broken)
    with pytest.raises(BisslError, match="is empty"):
        search(make_cfg("hpo.trials=1"))
    failed = [r for r in caplog.records if "failed with parameters" in r.getMessage()]
    assert failed and all(r.exc_info is None for r in failed)
    assert "Traceback" not in capfd.readouterr().err + caplog.text


@pytest.mark.e2e
def test_a_trial_start_is_searched_and_an_interrupted_search_ends_as_an_uninterrupted_one(make_cfg, tmp_path):
    """Each trial draws the start's parameter after lr / weight decay and fine-tunes from the backbone its start made
    in the trial's folder; a start killed mid-way (any error) leaves the search to end with the same trials."""
    backbone = make_cfg().backbone
    calls: list[float] = []

    def make_start(fail_first: bool) -> hpo_module.TrialStart:
        def run(params: dict[str, float], folder: Path) -> Path:
            calls.append(params["w"])
            if fail_first and not (tmp_path / "cut" / "failed").exists():
                (tmp_path / "cut" / "failed").touch()
                raise RuntimeError("killed mid-start")
            (folder / "start").mkdir(parents=True)
            (folder / "start" / "backbone.pt").write_bytes(Path(backbone).read_bytes())
            return folder / "start"

        return hpo_module.TrialStart({"w": (0.1, 10.0)}, run, {"cycles": 3})

    whole = search(make_cfg("hpo.trials=2", out="whole"), start=make_start(False))
    with pytest.raises(RuntimeError, match="killed mid-start"):
        search(make_cfg("hpo.trials=2", out="cut"), start=make_start(True))
    resumed = search(make_cfg("hpo.trials=2", out="cut"), start=make_start(True))

    def finished(result):
        return [(t["params"], t["value"]) for t in result.trials if t["state"] == "COMPLETE"]

    assert finished(resumed) == finished(whole) and len(finished(whole)) == 2
    weights = [t["params"]["w"] for t in whole.trials]
    assert len(set(weights)) == 2 and all(0.1 <= w <= 10 for w in weights)
    assert calls == [*weights, weights[0], *weights]  # the killed trial's retry draws its slot's w again
    assert _params(whole.trials) == _params(search(make_cfg("hpo.trials=2", out="plain")).trials)  # lr / wd unchanged
    for trial in whole.trials:
        run_dir = Path(trial["user_attrs"]["run_dir"])
        record = yaml.safe_load((run_dir / "finetune" / "config.yaml").read_text())
        assert record["backbone"] == str(run_dir / "start") and (run_dir / "finetune" / "summary.json").is_file()
    with pytest.raises(ConfigError, match=r"another config \(start.config.cycles: 3 -> 4\)"):
        search(
            make_cfg("hpo.trials=2", out="whole"), start=hpo_module.TrialStart({"w": (0.1, 10.0)}, print, {"cycles": 4})
        )
