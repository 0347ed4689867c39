"""Hyper-parameter search for fine-tuning (Optuna), then the best setting re-run over several seeds.

The paper's protocol: random search over log-uniform ``optim.lr`` and ``optim.weight_decay``, model
selection on the validation split, then final runs of the best setting over seeds, reported as mean and
std of the TEST metrics. Layout of ``out_dir``::

    study.db              the default storage (any Optuna RDB URL works, e.g. PostgreSQL: hpo.storage)
    trials/<number>/      one fine-tuning run per trial
    final/seed<k>/        the best setting, one run per seed
    hpo_summary.json      best params, every trial, per-seed test metrics, mean and std

Re-running resumes: ``hpo.trials`` counts the finished (complete or pruned) trials already in the study.
Several workers may share one study through its storage URL; the study ends with exactly ``hpo.trials``
finished trials: a worker starts a trial only while finished plus running trials are fewer, and a trial that
two workers started at once beyond that count is recorded FAIL (user attr ``skipped``) without running.
The search has ``hpo.trials`` slots; a trial takes the lowest slot no finished, running or queued trial holds
(user attr ``slot``), and its parameters are drawn from a sampler seeded by ``(seed, slot)``. A trial that failed
(SIGTERM, a full disk, any error) frees its slot, and the re-run draws its settings again; so an interrupted search
runs the same settings, in the same order, as an uninterrupted one. A trial whose process died stops sending
heartbeats (or never sent one); after ``2 * hpo.heartbeat_s`` the next worker marks it failed and re-queues it
with its parameters and slot, and the retry restarts the dead trial's folder. A trial whose worker process on
this host is gone (user attr ``worker``, ``host:pid``) is failed and re-queued at once, so a killed search
resumes where it stood. A worker with nothing left to start waits for the other workers' running trials, so its
summary sees every trial.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from bissl.config import FinetuneConfig, HPOConfig, build_config
from bissl.downstream import DOWNSTREAM_TASKS
from bissl.engine.checkpoint import config_diff
from bissl.engine.files import CONFIG_FILE, HPO_STUDY_FILE, HPO_SUMMARY_FILE, LOCK_FILE, SUMMARY_FILE
from bissl.engine.run_record import RESUMABLE_KEYS, environment, read_config_record
from bissl.stages.finetune import FinetuneResult, finetune
from bissl.utils.errors import BisslError, ConfigError, NonFiniteError
from bissl.utils.io import save_json
from bissl.utils.seed import derive_seed

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("bissl.hpo")

# Keys that may differ between the runs (or workers) of one study: where things go, and what is searched.
_STUDY_IGNORES = (
    "out_dir",
    "device",
    "log",
    "optim.lr",
    "optim.weight_decay",
    "downstream.data.root",
    "downstream.data.num_workers",
    "hpo.trials",
    "hpo.storage",
    "hpo.heartbeat_s",
    "hpo.final_seeds",
)


@dataclass
class SearchResult:
    study_name: str
    storage: str  # the storage URL, password hidden
    metric: str  # the validation metric maximised
    best_trial: int
    best_value: float
    best_params: dict[str, float]
    trials: list[dict[str, Any]]  # number, state, params, value, intermediate values, user attrs
    new_trials: int  # trials finished while this call ran (by any worker of the study)


class SearchChanged(ConfigError):
    """A study's storage holds a search run with another config; ``diff`` names the first changed key."""

    def __init__(self, message: str, diff: str) -> None:
        super().__init__(message)
        self.diff = diff


def _optuna() -> ModuleType:
    try:
        import optuna
    except ImportError:
        raise BisslError("hyper-parameter search needs optuna (a core dependency): pip install -e .") from None
    trial_log = logging.getLogger("optuna.study._optimize")
    if _drop_traceback not in trial_log.filters:
        trial_log.addFilter(_drop_traceback)
    return optuna


def _drop_traceback(record: logging.LogRecord) -> bool:
    """Optuna logs a failed trial's traceback before bissl reports the error in one line: keep the line only."""
    record.exc_info = None
    record.exc_text = None
    return True


def storage_url(cfg: FinetuneConfig, hpo: HPOConfig) -> str:
    """``hpo.storage``, or a SQLite file in the run folder (any path: ``?``, ``#``, ``%`` are escaped)."""
    if hpo.storage:
        return hpo.storage
    from sqlalchemy.engine import URL

    database = str((Path(cfg.out_dir) / HPO_STUDY_FILE).resolve())
    return URL.create("sqlite", database=database).render_as_string(hide_password=False)


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _finished_states(optuna: ModuleType) -> tuple[Any, ...]:
    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _slot(trial: optuna.trial.FrozenTrial) -> int:
    """The search slot of ``trial`` (module docstring): its ``slot`` user attr; for a trial that has none (a study
    of an earlier version, a trial not yet started), the number of the trial it retries, else its own number."""
    return int(trial.user_attrs.get("slot", trial.system_attrs.get("failed_trial", trial.number)))


def _sampler(optuna: ModuleType, kind: str, seed: int) -> optuna.samplers.BaseSampler:
    """A sampler that delegates each trial to a fresh ``kind`` sampler seeded by ``(seed, slot)``, so a trial
    draws the settings of its slot whichever worker runs it, and after however many restarts."""

    def make(slot: int) -> optuna.samplers.BaseSampler:
        trial_seed = derive_seed(seed, "hpo", slot) % 2**32
        if kind == "tpe":
            return optuna.samplers.TPESampler(seed=trial_seed)
        return optuna.samplers.RandomSampler(seed=trial_seed)

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._current: tuple[tuple[int, int], optuna.samplers.BaseSampler] | None = None

        def _of(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.BaseSampler:
            key = (trial.number, _slot(trial))
            if self._current is None or self._current[0] != key:
                self._current = (key, make(key[1]))
            return self._current[1]

        def infer_relative_search_space(
            self, study: optuna.Study, trial: optuna.trial.FrozenTrial
        ) -> dict[str, optuna.distributions.BaseDistribution]:
            return self._of(trial).infer_relative_search_space(study, trial)

        def sample_relative(
            self,
            study: optuna.Study,
            trial: optuna.trial.FrozenTrial,
            search_space: dict[str, optuna.distributions.BaseDistribution],
        ) -> dict[str, Any]:
            return self._of(trial).sample_relative(study, trial, search_space)

        def sample_independent(
            self,
            study: optuna.Study,
            trial: optuna.trial.FrozenTrial,
            param_name: str,
            param_distribution: optuna.distributions.BaseDistribution,
        ) -> Any:
            return self._of(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            self._of(trial).before_trial(study, trial)

        def after_trial(
            self,
            study: optuna.Study,
            trial: optuna.trial.FrozenTrial,
            state: optuna.trial.TrialState,
            values: Sequence[float] | None,
        ) -> None:
            self._of(trial).after_trial(study, trial, state, values)

    return TrialSeededSampler()


def _pruner(optuna: ModuleType, kind: str, epochs: int) -> optuna.pruners.BasePruner:
    """Median pruning once 5 trials finished, from epoch ``epochs // 4`` on (the first epochs are noisy)."""
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=epochs // 4)
    return optuna.pruners.NopPruner()


def _storage(optuna: ModuleType, url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """The RDB storage, with heartbeats and re-queueing of trials whose worker died.

    Workers opening a fresh database together race to create its tables: the loser sees "already exists" (or a
    duplicate key, or a locked SQLite file) and tries again.
    """
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    def connect() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():  # heartbeats and retries are marked experimental by Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                heartbeat_interval=heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )

    attempt = 0
    try:
        while True:
            try:
                return connect()
            except (IntegrityError, OperationalError, ProgrammingError) as exc:
                attempt += 1
                if attempt == _CREATE_ATTEMPTS or not _CREATE_RACE.search(str(exc)):
                    raise
                time.sleep(0.2 * attempt)
    except Exception as exc:  # bad URL, missing database driver, unreachable server
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot open hpo.storage {_hide_password(url)!r}: {reason}") from None


_CREATE_ATTEMPTS = 6
_CREATE_RACE = re.compile(r"already exists|duplicate key|UNIQUE constraint|database is locked", re.IGNORECASE)


def open_study(cfg: FinetuneConfig, hpo: HPOConfig | None = None, start: TrialStart | None = None) -> optuna.Study:
    """Create or load the study (``load_if_exists``); refuse one that was run with another config (or start)."""
    optuna = _optuna()
    hpo = hpo or cfg.hpo
    url = storage_url(cfg, hpo)
    if not hpo.storage:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=_storage(optuna, url, hpo.heartbeat_s),
        study_name=hpo.study_name,
        direction=DOWNSTREAM_TASKS.get(cfg.downstream.task).primary().direction,
        sampler=_sampler(optuna, hpo.sampler, cfg.seed),
        pruner=_pruner(optuna, hpo.pruner, cfg.epochs),
        load_if_exists=True,
    )
    config = {**cfg.model_dump(mode="json"), "hpo": hpo.model_dump(mode="json")}
    if start is not None:
        config["start"] = {"ranges": {k: list(v) for k, v in start.ranges.items()}, "config": dict(start.config)}
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config)
    elif diff := config_diff(stored, config, ignore=_STUDY_IGNORES):
        raise SearchChanged(
            f"study {hpo.study_name!r} in {_hide_password(url)} was run with another config ({diff}); restore it, "
            "or set hpo.study_name (or out_dir) for a new study",
            diff,
        )
    return study


STAGE_PARAMS = ("l2sp",)  # searched settings of the fine-tuning stage itself; the others belong to ``optim``


def with_params(cfg: FinetuneConfig, params: Mapping[str, float]) -> FinetuneConfig:
    """``cfg`` with searched ``params`` set: ``l2sp`` on the stage, the others (lr, weight decay) in ``optim``."""
    data = cfg.model_dump(mode="json")
    data.update({k: v for k, v in params.items() if k in STAGE_PARAMS})
    data["optim"].update({k: v for k, v in params.items() if k not in STAGE_PARAMS})
    return build_config(FinetuneConfig, data)


def run_config(cfg: FinetuneConfig, out_dir: Path, params: dict[str, float], seed: int | None = None) -> FinetuneConfig:
    """The plain fine-tuning config of one trial or final run: ``params`` set (:func:`with_params`), no search."""
    update = {"out_dir": str(out_dir), "seed": cfg.seed if seed is None else seed, "hpo": HPOConfig()}
    return with_params(cfg.model_copy(update=update), params)


@dataclass(frozen=True)
class TrialStart:
    """What each trial runs before fine-tuning: ``run(params, folder)`` makes, under the trial's ``folder`` (not in
    its ``finetune/``, where the trial fine-tunes), the backbone the trial fine-tunes from (e.g. an alignment), with
    ``params`` drawn log-uniform in ``ranges`` after lr / weight decay (so those draws stay what they were).
    ``config`` (what ``run`` does besides ``params``) is recorded with the study: a changed one is refused like a
    changed fine-tuning config."""

    ranges: Mapping[str, tuple[float, float]]
    run: Callable[[dict[str, float], Path], Path]
    config: Mapping[str, Any]


class _Skipped(Exception):
    """A trial started beyond ``hpo.trials`` by workers racing; recorded FAIL without running."""


def _take_slot(optuna: ModuleType, trial: optuna.Trial, trials: int) -> int | None:
    """The slot ``trial`` runs in (module docstring), or None when every slot is taken.

    A retry keeps the slot of the trial it retries. A new trial takes the lowest free slot, after one free slot for
    each lower-numbered running trial that has not taken its own yet: workers starting at once pick distinct slots.
    """
    me = trial.study._storage.get_trial(trial._trial_id)
    holding = (*_finished_states(optuna), optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    others = [t for t in trial.study.get_trials(deepcopy=False, states=holding) if t.number != trial.number]
    if not _unslotted(me):
        finished = {_slot(t) for t in others if t.state in _finished_states(optuna)}
        return None if _slot(me) in finished else _slot(me)
    starting = [t for t in others if _unslotted(t) and t.state == optuna.trial.TrialState.RUNNING]
    held = {_slot(t) for t in others if all(t.number != s.number for s in starting)}
    free = [slot for slot in range(trials) if slot not in held]
    ahead = sum(t.number < trial.number for t in starting)
    return free[ahead] if ahead < len(free) else None


def _unslotted(trial: optuna.trial.FrozenTrial) -> bool:
    return "slot" not in trial.user_attrs and "failed_trial" not in trial.system_attrs


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _objective(
    optuna: ModuleType, cfg: FinetuneConfig, hpo: HPOConfig, metric: str, start: TrialStart | None = None
) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", _worker())
        slot = _take_slot(optuna, trial, hpo.trials)
        if slot is None:
            trial.set_user_attr("skipped", f"the study already held hpo.trials={hpo.trials} trials")
            raise _Skipped(trial.number)
        trial.set_user_attr("slot", slot)
        params = {
            "lr": trial.suggest_float("lr", *hpo.lr_range, log=True),
            "weight_decay": trial.suggest_float("weight_decay", *hpo.weight_decay_range, log=True),
        }
        if hpo.l2sp_range is not None:
            params["l2sp"] = trial.suggest_float("l2sp", *hpo.l2sp_range, log=True)
        own = {
            name: trial.suggest_float(name, *bounds, log=True)
            for name, bounds in (start.ranges if start else {}).items()
        }
        # A retry of a dead trial inherits its user attrs, so it restarts the dead trial's folder.
        run_dir = Path(trial.user_attrs.get("run_dir") or Path(cfg.out_dir) / "trials" / str(trial.number))
        trial.set_user_attr("run_dir", str(run_dir))
        shutil.rmtree(run_dir, ignore_errors=True)

        def report(epoch: int, val: dict[str, float]) -> None:
            trial.report(val[metric], epoch)
            if trial.should_prune():
                reason = f"pruned at epoch {epoch} (val {metric} {val[metric]:.4f}, {hpo.pruner} pruner)"
                trial.set_user_attr("pruned_reason", reason)
                raise optuna.TrialPruned(reason)

        trial_cfg = run_config(cfg, run_dir, params)
        if start is not None:  # the trial's folder holds its start (e.g. align/) and its fine-tuning (finetune/)
            backbone = start.run(own, run_dir)
            trial_cfg = run_config(cfg.model_copy(update={"backbone": str(backbone)}), run_dir / "finetune", params)
        try:
            result = finetune(trial_cfg, on_eval=report)
        except NonFiniteError as exc:
            trial.set_user_attr("pruned_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("best_epoch", result.best_epoch)
        return result.metrics[f"val_{metric}"]

    return objective


def _process_gone(worker: str) -> bool:
    """Whether ``worker`` (``host:pid``) names a process on this host that no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def fail_stale_trials(optuna: ModuleType, study: optuna.Study, grace_s: float) -> None:
    """Mark failed, and re-queue with their parameters, RUNNING trials whose worker died: Optuna's own check (a
    heartbeat that stopped for ``grace_s``), trials that never sent one (their worker died between starting the
    trial and its first heartbeat), judged by their start time, and, at once, trials whose worker process on this
    host is gone."""
    from optuna.storages._rdb.models import TrialHeartbeatModel  # Optuna has no public query for this

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    storage = study._storage
    rdb = getattr(storage, "_backend", storage)  # create_study wraps the RDB storage in a cache
    cutoff = datetime.now() - timedelta(seconds=grace_s)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    dead = {t._trial_id: t for t in running if _process_gone(t.user_attrs.get("worker", ""))}
    old = {t._trial_id: t for t in running if t.datetime_start is not None and t.datetime_start < cutoff}
    if old:
        session = rdb.scoped_session()
        try:
            rows = session.query(TrialHeartbeatModel.trial_id).filter(TrialHeartbeatModel.trial_id.in_(list(old)))
            dead.update((trial_id, old[trial_id]) for trial_id in set(old) - {row[0] for row in rows})
        finally:
            session.close()
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial_id in sorted(dead):
        try:
            if not storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
        log.warning("trial %d: its worker died; failed and re-queued", dead[trial_id].number)
        if retry is not None:
            retry(study, storage.get_trial(trial_id))


def _trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    start, end = trial.datetime_start, trial.datetime_complete
    return {
        "number": trial.number,
        "state": trial.state.name,
        "params": trial.params,
        "value": trial.value,
        "intermediate_values": trial.intermediate_values,
        "user_attrs": trial.user_attrs,
        "duration_s": (end - start).total_seconds() if start and end else None,  # None: not finished
    }


def search(cfg: FinetuneConfig, hpo: HPOConfig | None = None, start: TrialStart | None = None) -> SearchResult:
    """Run trials until the study holds ``hpo.trials`` finished ones (default ``hpo = cfg.hpo``); with ``start``,
    each trial first makes its own starting backbone (:class:`TrialStart`), with parameters searched too."""
    optuna = _optuna()
    hpo = hpo or cfg.hpo
    if hpo.trials < 1:
        raise ConfigError("hpo.trials is 0; set hpo.trials=N (N >= 1) to search")
    metric = DOWNSTREAM_TASKS.get(cfg.downstream.task).primary().key
    study = open_study(cfg, hpo, start)
    finished = _finished_states(optuna)
    done = len(study.get_trials(deepcopy=False, states=finished))
    log.info("study %s: %d of %d trials finished", hpo.study_name, done, hpo.trials)
    objective = _objective(optuna, cfg, hpo, metric, start)
    while True:
        fail_stale_trials(optuna, study, 2 * hpo.heartbeat_s)
        done_slots = {_slot(t) for t in study.get_trials(deepcopy=False, states=finished)}
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if len(done_slots) >= hpo.trials:
            break
        if len(done_slots) + len(running) >= hpo.trials:  # the rest is running in other workers: wait for it
            time.sleep(hpo.heartbeat_s)
            continue
        with warnings.catch_warnings():  # heartbeats are marked experimental by Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=1, catch=(_Skipped,))
    trials = study.get_trials(deepcopy=False)
    new = len([t for t in trials if t.state in finished]) - done
    try:
        best = study.best_trial
    except ValueError:
        raise BisslError(
            f"no trial of study {hpo.study_name!r} completed (all pruned or non-finite, see the trials' "
            "pruned_reason); lower hpo.lr_range or set pruner=none"
        ) from None
    return SearchResult(
        study_name=hpo.study_name,
        storage=_hide_password(storage_url(cfg, hpo)),
        metric=metric,
        best_trial=best.number,
        best_value=float(best.value),
        best_params=dict(best.params),
        trials=[_trial_record(t) for t in trials],
        new_trials=new,
    )


def clear_search(out_dir: str | Path) -> None:
    """Delete a search's files in ``out_dir`` (its SQLite study, trials, final runs and summary), to start over."""
    out = Path(out_dir)
    for name in (HPO_STUDY_FILE, HPO_SUMMARY_FILE, "trials", "final"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _finished_run(run_cfg: FinetuneConfig) -> FinetuneResult | None:
    """The result of a finished run of exactly ``run_cfg``; a folder run with other settings is removed."""
    out = Path(run_cfg.out_dir)
    if not out.exists():
        return None
    config_file = out / CONFIG_FILE
    if not config_file.is_file():
        diff = f"no {CONFIG_FILE}"
    else:
        diff = config_diff(read_config_record(config_file), run_cfg.model_dump(mode="json"), ignore=RESUMABLE_KEYS)
    if diff:
        log.warning("%s was run with other settings (%s); running it again", out, diff)
        shutil.rmtree(out)
        return None
    summary_file = out / SUMMARY_FILE
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    return FinetuneResult(out, summary["epochs"], True, best_epoch=summary["best_epoch"], metrics=summary["metrics"])


def aggregate(results: list[FinetuneResult]) -> dict[str, dict[str, float]]:
    """Mean, sample std (0 for one run) and count of every test metric over runs."""
    keys = sorted(k for k in results[0].metrics if k.startswith("test_"))
    out = {}
    for key in keys:
        values = [r.metrics[key] for r in results]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
    return out


def final_runs(
    cfg: FinetuneConfig, best_params: dict[str, float], seeds: list[int], *, search: SearchResult | None = None
) -> list[FinetuneResult]:
    """Fine-tune ``best_params`` once per seed into ``<out_dir>/final/seed<k>`` and write ``hpo_summary.json``.

    Finished seeds are read back from their ``summary.json``, unfinished ones resumed; a seed folder run
    with other settings (e.g. a new best after more trials) is run again. Workers of one study that share
    ``out_dir`` take turns (a file lock): the first runs the seeds, the others read them back.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"final runs need distinct seeds (got {seeds}); set hpo.final_seeds")
    final_dir = Path(cfg.out_dir) / "final"
    final_dir.mkdir(parents=True, exist_ok=True)
    with open(final_dir / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = []
        for seed in seeds:
            run_cfg = run_config(cfg, final_dir / f"seed{seed}", best_params, seed=seed)
            result = _finished_run(run_cfg)
            if result is None:
                log.info("final run, seed %d: %s", seed, run_cfg.out_dir)
                result = finetune(run_cfg, resume=True)
            results.append(result)
        summary = {
            "stage": "finetune_hpo",
            "best_params": best_params,
            "seeds": seeds,
            "per_seed": [
                {"seed": s, "out_dir": str(r.out_dir), "best_epoch": r.best_epoch, "metrics": r.metrics}
                for s, r in zip(seeds, results, strict=True)
            ],
            "aggregate": aggregate(results),
            "config": cfg.model_dump(mode="json"),
            "environment": environment(),
        }
        if search is not None:
            summary.update(
                study={"name": search.study_name, "storage": search.storage, "metric": f"val_{search.metric}"},
                best_trial=search.best_trial,
                best_value=search.best_value,
                trials=search.trials,
            )
        save_json(summary, Path(cfg.out_dir) / HPO_SUMMARY_FILE)
    return results
