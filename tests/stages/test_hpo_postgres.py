"""Parallel hyper-parameter search against a real PostgreSQL server: worker PROCESSES sharing one Optuna study.

Needs ``BISSL_TEST_POSTGRES_URL`` (a SQLAlchemy URL, e.g. ``postgresql+psycopg2://user:pw@127.0.0.1:5432/db``);
``.ci/run`` starts a throw-away server with ``.ci/postgres`` and sets it. Without it the tests are skipped.
Each test gets a fresh database when the role may create one (CREATEDB), else a fresh study name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from bissl.utils.seed import derive_seed

optuna = pytest.importorskip("optuna")
TrialState = optuna.trial.TrialState
URL_VAR = "BISSL_TEST_POSTGRES_URL"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# A worker: pay the imports first, say so (argv[2]), wait for the start signal (argv[1]: workers really start
# together, and race to create the study's tables in a fresh database), then run the CLI on the rest of argv.
# It leaves through os._exit once the CLI returned: tearing down torch & co. takes seconds on a busy machine.
WORKER = """
import os, sys, time
from pathlib import Path

import optuna, psycopg2, torch
import bissl.cli, bissl.stages.finetune, bissl.stages.hpo

Path(sys.argv[2]).touch()
while not Path(sys.argv[1]).exists():
    time.sleep(0.02)
code = bissl.cli.main(sys.argv[3:])
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


@pytest.fixture
def postgres_url():
    """A fresh database on the configured server (dropped afterwards), or the configured one as it is."""
    url = os.environ.get(URL_VAR)
    if not url:
        pytest.skip(f"{URL_VAR} is not set: no PostgreSQL server to test against (.ci/run starts one)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver is missing: pip install 'bissl[postgres]'")
    import sqlalchemy

    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    name = f"bissl_hpo_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    except sqlalchemy.exc.OperationalError as exc:
        pytest.fail(f"cannot reach the PostgreSQL server of {URL_VAR}: {str(exc).splitlines()[0]}")
    except sqlalchemy.exc.ProgrammingError:  # no CREATEDB: share the database, studies have unique names
        yield url
        return
    yield sqlalchemy.engine.make_url(url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))  # PostgreSQL >= 13
    admin.dispose()


def _args(backbone: Path, out_dir: Path, url: str, study: str, trials: int, epochs: int, heartbeat_s: int) -> list[str]:
    return [
        "finetune",
        "--backbone",
        str(backbone),
        f"out_dir={out_dir}",
        "device=cpu",
        f"epochs={epochs}",
        "batch_size=128",
        "downstream.data.image_size=8",
        "log.progress=false",
        "log.tensorboard=false",
        f"hpo.trials={trials}",
        f"hpo.storage={url}",
        f"hpo.study_name={study}",
        f"hpo.heartbeat_s={heartbeat_s}",
        "hpo.lr_range=[0.01, 0.3]",
        "hpo.pruner=none",
        "hpo.final_seeds=[]",
    ]


@pytest.fixture
def start_worker():
    """``start(go, args, log)``: a worker process that runs once ``go`` exists (``<log>.ready`` when imported).

    Workers still running when the test ends (it failed) are killed.
    """
    started: list[subprocess.Popen] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def start(go: Path, args: list[str], log: Path) -> subprocess.Popen:
        with log.open("w") as handle:
            command = [sys.executable, "-c", WORKER, str(go), str(log.with_suffix(".ready")), *args]
            started.append(subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start_together(go: Path, workers: list[subprocess.Popen], logs: list[Path], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(log.with_suffix(".ready").exists() for log in logs):
        for proc, log in zip(workers, logs, strict=True):
            assert proc.poll() is None, f"worker ended before the start:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "workers did not get ready"
        time.sleep(0.05)
    go.touch()


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"worker timed out:\n{log.read_text()[-3000:]}")
    assert code == 0, f"worker exited with {code}:\n{log.read_text()[-3000:]}"


def _finished_in_logs(*logs: Path) -> Counter:
    """How often each trial number was reported finished, over all workers' logs (Optuna's INFO lines)."""
    return Counter(int(n) for log in logs for n in re.findall(r"Trial (\d+) (?:finished|pruned)", log.read_text()))


def _seeded_draws(seed: int, numbers: list[int], lr_range, wd_range) -> dict[int, tuple[float, float]]:
    """The parameters slot ``n`` draws: a RandomSampler seeded by ``(seed, n)`` (see bissl.stages.hpo._sampler)."""
    draws = {}
    for n in numbers:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=derive_seed(seed, "hpo", n) % 2**32))
        trial = study.ask()
        draws[n] = (
            trial.suggest_float("lr", *lr_range, log=True),
            trial.suggest_float("weight_decay", *wd_range, log=True),
        )
    return draws


def _trials(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def test_two_worker_processes_share_one_study(tiny_pretrained, tmp_path, postgres_url, start_worker):
    """Two processes, one study: every trial number runs once, in one worker, with its own seeded draw."""
    n, study = 6, f"parallel_{uuid.uuid4().hex[:8]}"
    go, logs = tmp_path / "go", [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [
        start_worker(go, _args(tiny_pretrained, tmp_path / name, postgres_url, study, n, 2, 30), log)
        for name, log in zip("ab", logs, strict=True)
    ]
    _start_together(go, workers, logs)
    for proc, log in zip(workers, logs, strict=True):
        _wait(proc, log)

    trials = _trials(postgres_url, study)
    finished = [t for t in trials if t.state in FINISHED]
    # Exactly n: a trial the two workers started beyond n at the same moment is recorded FAIL, not run.
    assert len(finished) == n, [(t.number, t.state.name) for t in trials]
    skipped = [t for t in trials if t.state not in FINISHED]
    assert all(t.state == TrialState.FAIL and "skipped" in t.user_attrs for t in skipped)  # none left RUNNING
    assert [t.number for t in trials] == list(range(len(trials)))
    trials = finished
    numbers = [t.number for t in trials]
    assert _finished_in_logs(*logs) == Counter(numbers)  # each trial reported finished once, by one worker

    params = {t.number: (t.params["lr"], t.params["weight_decay"]) for t in trials}
    assert len(set(params.values())) == len(params)
    assert params == _seeded_draws(0, numbers, (0.01, 0.3), (1e-5, 1e-2))

    owners = Counter()
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir.name == str(t.number) and (run_dir / "summary.json").is_file()
        owners[run_dir.parent.parent.name] += 1
    assert set(owners) == {"a", "b"}, owners  # both workers ran trials: the search really was parallel
    for name in "ab":  # and no folder was made for a trial the worker did not run
        assert sorted(p.name for p in (tmp_path / name / "trials").iterdir()) == sorted(
            str(t.number) for t in trials if Path(t.user_attrs["run_dir"]).parent.parent.name == name
        )


def test_study_resumes_after_a_worker_is_killed_mid_trial(tiny_pretrained, tmp_path, postgres_url, start_worker):
    """SIGKILL a worker inside its second trial; the same command again fails and re-queues it by heartbeat."""
    n, heartbeat_s, study = 3, 1, f"killed_{uuid.uuid4().hex[:8]}"
    args = _args(tiny_pretrained, tmp_path / "hpo", postgres_url, study, n, 5, heartbeat_s)
    go, first_log = tmp_path / "go", tmp_path / "first.log"
    go.touch()
    worker = start_worker(go, args, first_log)
    rerun_go, second_log = tmp_path / "go_again", tmp_path / "second.log"
    rerun = start_worker(rerun_go, args, second_log)  # the same command again, held back until after the kill
    storage = optuna.storages.RDBStorage(postgres_url)
    victim, deadline = None, time.monotonic() + 90
    while victim is None:
        assert worker.poll() is None, f"the worker ended before it could be killed:\n{first_log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no trial got past its first epoch:\n{first_log.read_text()[-3000:]}"
        time.sleep(0.05)
        try:
            study_id = storage.get_study_id_from_name(study)
        except KeyError:
            continue
        running = [
            t
            for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            if t.number >= 1 and t.intermediate_values  # the second trial, past its first epoch
        ]
        if running:
            worker.kill()  # SIGKILL: no clean-up, no final heartbeat, the trial stays RUNNING
            worker.wait()
            victim = running[0]
    killed_at = time.monotonic()
    before = {t.number: t for t in _trials(postgres_url, study)}
    assert before[victim.number].state == TrialState.RUNNING
    done_before = [t for t in before.values() if t.state in FINISHED]
    assert [t.number for t in done_before] == list(range(victim.number))
    stamps = {t.number: (Path(t.user_attrs["run_dir"]) / "summary.json").stat().st_mtime_ns for t in done_before}

    time.sleep(max(0.0, killed_at + 2 * heartbeat_s + 0.5 - time.monotonic()))  # the heartbeat's grace period
    _start_together(rerun_go, [rerun], [second_log])
    _wait(rerun, second_log)

    trials = _trials(postgres_url, study)
    states = {t.number: t.state for t in trials}
    assert states[victim.number] == TrialState.FAIL
    assert [t.state for t in trials].count(TrialState.COMPLETE) == n and TrialState.RUNNING not in states.values()
    (retry,) = [t for t in trials if "failed_trial" in t.system_attrs]  # set by Optuna's retry callback
    assert retry.system_attrs["failed_trial"] == victim.number and retry.number > victim.number
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["run_dir"] == victim.user_attrs["run_dir"]  # the dead trial's folder, restarted
    # each trial draws the settings of its search slot (bissl.stages.hpo: a sampler seeded by (seed, slot)); the
    # victim's slot was freed by its death and taken again by a later trial, which drew the same settings
    drawn = {t.user_attrs["slot"]: (t.params["lr"], t.params["weight_decay"]) for t in trials if "slot" in t.user_attrs}
    assert sorted(drawn) == list(range(n))
    assert drawn == _seeded_draws(0, list(drawn), (0.01, 0.3), (1e-5, 1e-2))
    assert (Path(retry.user_attrs["run_dir"]) / "summary.json").is_file()
    assert f"{len(done_before)} of {n} trials finished" in second_log.read_text()
    for t in done_before:  # finished trials are not run again
        assert (Path(t.user_attrs["run_dir"]) / "summary.json").stat().st_mtime_ns == stamps[t.number]
    assert _finished_in_logs(first_log, second_log) == Counter(t.number for t in trials if t.state in FINISHED)
