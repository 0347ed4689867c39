"""``bissl pipeline``: one study. For every replicate (one entry of ``seeds``): pretrain with its seed, then for every
task x arm: (align ->) score the starting backbone frozen (kNN and linear probe on class labels, else the task's
own head: ``bissl evaluate``) -> fine-tune; then the report.

A replicate is (pretraining seed, few-shot draw, alignment / fine-tuning seed), all its own seed, so the variance a
user meets (which pretraining run, which k images per class are labelled) is inside the paired tests over
replicates. ``replicate: {pretrain: false}`` shares one pretraining run (``pretrain.seed``), ``replicate:
{few_shot: false}`` one draw (``data.seed``); a study given ``pretrained`` pins pretraining to that run.

With ``search.trials > 0`` each arm's fine-tuning lr / weight decay is searched on validation once per task, on the
first replicate's starting backbone, with the same budget for every arm and each arm's own sampler seed; every
replicate of that arm then fine-tunes with its best setting.

Stages meet only through their run folders. A stage whose ``summary.json`` exists is finished and is
skipped, provided its folder was made with the same config (a changed config is an error, never mixed
with old results); an unfinished stage resumes from its checkpoint. So an interrupted study continues
where it stopped when the same command is run again. The study's ``config.yaml`` is written when the folder is
new and again with ``results.json`` and ``report.md``, never by a run that was refused or failed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from bissl.bilevel.rivals import cycle_backward_passes
from bissl.config import (
    AlignConfig,
    ArmSpec,
    EvaluateConfig,
    FinetuneConfig,
    PipelineConfig,
    PretrainConfig,
    TaskSpec,
    deep_merge,
    to_yaml,
)
from bissl.downstream.base import DOWNSTREAM_TASKS
from bissl.engine.checkpoint import read_head_file, resolve_backbone_file
from bissl.engine.data_checks import check_batch_size
from bissl.engine.files import CONFIG_FILE, PRETEXT_HEAD_FILE, RESULTS_FILE, SUMMARY_FILE
from bissl.engine.names import validate_names
from bissl.engine.run import clear_run_dir, make_out_dir
from bissl.engine.run_record import environment, require_same_config
from bissl.pretext.base import PRETEXT_METHODS
from bissl.stages.align import align
from bissl.stages.evaluate import evaluate
from bissl.stages.finetune import finetune
from bissl.stages.hpo import SearchChanged, TrialStart, clear_search, search, with_params
from bissl.stages.pretrain import pretrain
from bissl.utils.errors import ConfigError
from bissl.utils.io import atomic_write, remove_stale_temp_files, save_json
from bissl.utils.seed import derive_seed

log = logging.getLogger("bissl.pipeline")


@dataclass
class RunRecord:
    """One run of a study: (alignment ->) frozen scores of the starting backbone -> fine-tuning."""

    task: str
    arm: str
    seed: int
    finetune_dir: Path
    pretrained: Path  # the pretraining run this replicate starts from
    few_shot_seed: int | None = None  # its draw of the few-shot training subset (None: the task's data.seed)
    align_dir: Path | None = None
    optim: dict[str, float] = field(default_factory=dict)  # the lr / weight decay this run fine-tuned with
    metrics: dict[str, float] = field(default_factory=dict)  # fine-tuning's (val_*, test_*)
    frozen: dict[str, float] = field(default_factory=dict)  # starting backbone's knn_* / linear_probe_* / head_probe_*
    knn_k: int | None = None  # the k of the frozen kNN (None: the task's head was probed)
    align_metrics: dict[str, float] = field(default_factory=dict)
    coupling: dict[str, Any] = field(default_factory=dict)  # the align stage's coupling diagnostics, if it has them
    wall_time_s: dict[str, float] = field(default_factory=dict)
    compute: dict[str, dict[str, int]] = field(default_factory=dict)  # per stage: backbone passes, HVPs, images

    def as_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}


@dataclass
class StudyResult:
    out_dir: Path
    records: list[RunRecord]
    results_path: Path | None  # None: stopped before the runs (``until``)
    report_path: Path | None
    pretrained: dict[int, Path] = field(default_factory=dict)  # each replicate's pretraining run folder, by seed


def run_stage(cfg: BaseModel, runner: Callable[[Any], Any], label: str) -> dict[str, Any]:
    """Run one stage to completion (or reuse its finished folder) and return its summary."""
    out = Path(cfg.out_dir)  # type: ignore[attr-defined]
    summary = out / SUMMARY_FILE
    if summary.is_file():
        require_same_config(out, cfg)
        log.info("%s: finished earlier, reusing %s", label, out)
    else:
        log.info("%s: running in %s", label, out)
        runner(cfg)
    return json.loads(summary.read_text())


def with_data_source(cfg: PipelineConfig, stage: BaseModel, data_keys: tuple[str, ...]) -> BaseModel:
    """``stage`` with the study's data root / download flag set in each of its data sections."""
    if cfg.data.root is None and not cfg.data.download:
        return stage
    updates = {"download": cfg.data.download, **({"root": cfg.data.root} if cfg.data.root is not None else {})}
    dump = stage.model_dump(mode="json")
    for key in data_keys:
        node = dump
        for part in key.split("."):
            node = node[part]
        node.update(updates)
    return type(stage).model_validate(dump)


def pretrain_config(cfg: PipelineConfig, seed: int) -> PretrainConfig:
    """Pretraining with seed ``seed``, in ``pretrain/seed<seed>``."""
    out = Path(cfg.out_dir) / "pretrain" / f"seed{seed}"
    stage = cfg.pretrain.model_copy(update={"seed": seed, "out_dir": str(out), "device": cfg.device})
    return with_data_source(cfg, stage, ("data",))  # type: ignore[return-value]


def pretrain_runs(cfg: PipelineConfig, stage_times: dict[str, float]) -> dict[int, Path]:
    """Each replicate's pretraining run folder (run here unless ``cfg.pretrained`` pins one), by replicate seed."""
    if cfg.pretrained is not None:
        pinned = resolve_backbone_file(cfg.pretrained).parent
        return dict.fromkeys(cfg.seeds, pinned)
    by_seed = {seed: cfg.pretrain_seed(seed) for seed in cfg.seeds}
    folders: dict[int, Path] = {}
    for pre_seed in dict.fromkeys(by_seed.values()):
        summary = run_stage(pretrain_config(cfg, pre_seed), partial(pretrain, resume=True), f"pretrain seed{pre_seed}")
        folders[pre_seed] = Path(summary["backbone"]).parent
        stage_times[f"pretrain/seed{pre_seed}"] = summary["wall_time_s"]
    return {seed: folders[pre_seed] for seed, pre_seed in by_seed.items()}


def arm_dir(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec) -> Path:
    return Path(cfg.out_dir) / task.name / arm.name


def run_dir(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int) -> Path:
    return arm_dir(cfg, task, arm) / f"seed{seed}"


def _run_fields(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, stage: str) -> dict[str, Any]:
    """The config fields the study sets on every stage of one run: seed, device, folder and task."""
    return {
        "seed": seed,
        "device": cfg.device,
        "out_dir": str(run_dir(cfg, task, arm, seed) / stage),
        "downstream": task.downstream.model_copy(update={"few_shot_seed": cfg.few_shot_seed(seed)}),
    }


def align_config(
    cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, pretrained: Path, cycles: int | None = None
) -> AlignConfig:
    """The align stage of one run (``cycles``: the number of cycles an equal-compute rival was given)."""
    stage = cfg.arm_align(arm, task)
    if cycles is not None:
        stage = stage.model_copy(update={"bilevel": stage.bilevel.model_copy(update={"cycles": cycles})})
    update = {**_run_fields(cfg, task, arm, seed, "align"), "pretrained": str(pretrained)}
    return with_data_source(cfg, stage.model_copy(update=update), ("pretext_data", "downstream.data"))  # type: ignore[return-value]


def equal_compute_cycles(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, pretrained: Path) -> int | None:
    """The cycles that give rival ``arm`` the backbone backward passes + Hessian-vector products (each weighing
    ``arm.hvp_passes`` passes) its BiSSL arm measured on this task and seed (that arm's align is run first, or
    reused); ``None``: its own cycles.

    The rival's cost per cycle is its rule's count (:func:`~bissl.bilevel.rivals.cycle_backward_passes`), with the
    pretrained pretext method's views per batch.
    """
    target = cfg.budget_arm(arm)
    if target is None:
        return None
    label = f"{task.name}/{target.name}/seed{seed}: align (compute budget of {arm.name})"
    spent = run_stage(align_config(cfg, task, target, seed, pretrained), partial(align, resume=True), label)["compute"]
    n_views = PRETEXT_METHODS.get(read_head_file(pretrained / PRETEXT_HEAD_FILE, "pretext")["name"]).n_views
    return matched_cycles(spent, cycle_backward_passes(cfg.arm_align(arm, task).bilevel, n_views), arm.hvp_passes)


def matched_cycles(spent: dict[str, int], per_cycle: int, hvp_passes: float) -> int:
    """Whole cycles of ``per_cycle`` backward passes nearest to ``spent``'s backward passes + ``hvp_passes`` x HVPs."""
    return max(1, round((spent["backward"] + hvp_passes * spent["hvp"]) / per_cycle))


def evaluate_config(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, backbone: Path) -> EvaluateConfig:
    """Frozen scores of the backbone a run starts fine-tuning from (the report draws the t-SNE)."""
    update = {**_run_fields(cfg, task, arm, seed, "evaluate"), "backbone": str(backbone), "embedding": False}
    return with_data_source(cfg, cfg.evaluate.model_copy(update=update), ("downstream.data",))  # type: ignore[return-value]


def finetune_config(
    cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, backbone: Path, params: dict[str, float]
) -> FinetuneConfig:
    """Fine-tuning of one run, with ``params`` (e.g. the searched lr / weight decay / l2sp) set on the task's
    settings."""
    stage = with_params(cfg.task_finetune(task), params)
    update = {**_run_fields(cfg, task, arm, seed, "finetune"), "backbone": str(backbone)}
    return with_data_source(cfg, stage.model_copy(update=update), ("downstream.data",))  # type: ignore[return-value]


def check_tasks(cfg: PipelineConfig) -> None:
    """Build every task's splits before the first stage, so a bad task setting (classes, few_shot, a batch larger
    than the training split) is refused before pretraining runs."""
    for task in cfg.tasks:
        splits = DOWNSTREAM_TASKS.get(task.downstream.task).splits(task.downstream)
        train, data = len(splits["train"]), task.downstream.data.name
        check_batch_size(train, cfg.task_finetune(task).batch_size, data, f"task {task.name}: finetune.batch_size")
        for arm in (arm for arm in cfg.arms if arm.aligns):
            key = f"task {task.name}, arm {arm.name}: align.upper.batch_size"
            check_batch_size(train, cfg.arm_align(arm, task).upper.batch_size, data, key)


#: a ``multitask`` arm's search draws this too: the w of its align (``search.multitask_weight_range``)
MULTITASK_WEIGHT = "multitask_weight"


def with_multitask_weight(arm: ArmSpec, weight: float) -> ArmSpec:
    """``arm`` aligning with ``weight`` as the w of its ``L_P + w L_D`` (a multitask arm's searched w)."""
    return arm.model_copy(update={"align": deep_merge(arm.align, {"bilevel": {MULTITASK_WEIGHT: weight}})})


def searches_weight(cfg: PipelineConfig, arm: ArmSpec) -> bool:
    """Whether ``arm``'s search draws its w too (a ``multitask`` arm of a study with ``search.trials > 0``)."""
    return arm.kind == "multitask" and cfg.search.trials > 0


def multitask_start(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, pretrained: Path) -> TrialStart:
    """A multitask arm's trials' start: align the first replicate's pretrained backbone with the trial's w at the
    arm's equal-compute cycles, in the trial's ``align/`` folder."""
    seed = cfg.seeds[0]

    def trial_align(weight: float, folder: Path) -> AlignConfig:
        weighted = with_multitask_weight(arm, weight)
        cycles = equal_compute_cycles(cfg, task, weighted, seed, pretrained)
        stage = align_config(cfg, task, weighted, seed, pretrained, cycles)
        return stage.model_copy(update={"out_dir": str(folder / "align")})

    def run(params: dict[str, float], folder: Path) -> Path:
        stage = trial_align(params[MULTITASK_WEIGHT], folder)
        log.info(
            "%s/%s: search trial in %s aligns with w = %.4g", task.name, arm.name, folder, params[MULTITASK_WEIGHT]
        )
        align(stage)
        return Path(stage.out_dir)

    bounds = cfg.search.multitask_weight_range
    record = trial_align(bounds[0], Path()).model_dump(mode="json", exclude={"out_dir", "log", "device"})
    del record["bilevel"][MULTITASK_WEIGHT]  # drawn per trial
    return TrialStart({MULTITASK_WEIGHT: bounds}, run, record)


def search_settings(
    cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, backbone: Path, start: TrialStart | None = None
) -> dict[str, Any]:
    """Search ``arm``'s fine-tuning lr / weight decay on validation, from the first replicate's starting backbone
    (with ``start``: from each trial's own, e.g. a multitask arm's alignment with the trial's w); the trials' seed
    (which seeds the sampler) is the arm's own, so arms do not share one draw of candidates. ``best_params``: the
    fine-tuning settings; ``best_start``: the start's (e.g. ``multitask_weight``)."""
    stage = finetune_config(cfg, task, arm, cfg.seeds[0], backbone, {})
    own_seed = derive_seed(cfg.seeds[0], "search", task.name, arm.name) % 2**31
    stage = stage.model_copy(update={"out_dir": str(arm_dir(cfg, task, arm) / "search"), "seed": own_seed})
    try:
        result = search(stage, cfg.search.hpo(), start)
    except SearchChanged as exc:  # its fix names hpo keys, which a study does not have
        raise ConfigError(
            f"the search in {stage.out_dir} was run with another config ({exc.diff}); restore it, or pass "
            "--overwrite to run the study afresh"
        ) from None
    log.info("%s/%s: best of %d trials %s (val %s %.4f)", task.name, arm.name, cfg.search.trials,
             result.best_params, result.metric, result.best_value)  # fmt: skip
    own = start.ranges if start is not None else {}
    return {
        "best_params": {k: v for k, v in result.best_params.items() if k not in own},
        "best_start": {k: v for k, v in result.best_params.items() if k in own},
        "best_val": result.best_value,
        "metric": f"val_{result.metric}",
        "trials": [{"params": t["params"], "value": t["value"], "state": t["state"]} for t in result.trials],
        # the trials' durations, of this call and of the earlier ones a resumed study continues
        "wall_time_s": sum(t["duration_s"] or 0.0 for t in result.trials),
    }


def start_backbone(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, record: RunRecord) -> Path:
    """The backbone ``record``'s run fine-tunes from: its pretrained one, or theta of its alignment (BiSSL's or a
    rival rule's, run here)."""
    if not arm.aligns:
        return record.pretrained
    cycles = equal_compute_cycles(cfg, task, arm, record.seed, record.pretrained)
    align_cfg = align_config(cfg, task, arm, record.seed, record.pretrained, cycles)
    summary = run_stage(align_cfg, partial(align, resume=True), f"{task.name}/{arm.name}/seed{record.seed}: align")
    record.align_dir = Path(align_cfg.out_dir)
    record.align_metrics = summary["metrics"]
    record.coupling = summary.get("coupling", {}) if arm.kind in ("bissl", "penalty") else {}
    record.wall_time_s["align"] = summary["wall_time_s"]
    record.compute["align"] = summary["compute"]
    return record.align_dir


def probe_result(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, record: RunRecord, summary: dict[str, Any]) -> None:
    """A ``probe`` arm's result: the frozen linear probe's val / test accuracy stands for fine-tuning's top-1."""
    if not record.frozen or "top1" not in [m.key for m in DOWNSTREAM_TASKS.get(task.downstream.task).metrics]:
        raise ConfigError(
            f"arm {arm.name!r} (kind probe) needs a single-label classification task scored by top1; "
            f"{task.name!r} is not one: remove the arm from the study or give it another kind"
        )
    record.metrics = {f"{split}_top1": record.frozen[f"linear_probe_{split}"] for split in ("val", "test")}
    record.optim = {"lr": cfg.evaluate.linear_probe_lr, "weight_decay": cfg.evaluate.linear_probe_weight_decay}
    record.wall_time_s["probe"] = summary["wall_time_s"]
    record.compute["probe"] = summary["compute"]


def run_arm(
    cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, pretrained: dict[int, Path]
) -> tuple[list[RunRecord], dict[str, Any] | None]:
    """Every replicate of one arm on one task (and, with ``search.trials``, its search first); the runs and the
    search. ``pretrained``: each replicate's pretraining run, by seed."""
    records, searched = [], None
    if searches_weight(cfg, arm):  # w is searched with the fine-tuning settings; every replicate aligns with the best
        first = pretrained[cfg.seeds[0]]
        searched = search_settings(cfg, task, arm, first, multitask_start(cfg, task, arm, first))
        arm = with_multitask_weight(arm, searched["best_start"][MULTITASK_WEIGHT])
    for seed in cfg.seeds:
        label = f"{task.name}/{arm.name}/seed{seed}"
        record = RunRecord(task.name, arm.name, seed, run_dir(cfg, task, arm, seed) / "finetune", pretrained[seed],
                           cfg.few_shot_seed(seed) if task.downstream.few_shot else None)  # fmt: skip
        backbone = start_backbone(cfg, task, arm, record)
        summary = run_stage(evaluate_config(cfg, task, arm, seed, backbone), evaluate, f"{label}: frozen scores")
        record.frozen, record.knn_k = summary["metrics"], summary.get("knn_k")
        if arm.kind == "probe":
            probe_result(cfg, task, arm, record, summary)
            records.append(record)
            continue
        if cfg.search.trials > 0 and searched is None:
            searched = search_settings(cfg, task, arm, backbone)
        finetune_cfg = finetune_config(cfg, task, arm, seed, backbone, searched["best_params"] if searched else {})
        summary = run_stage(finetune_cfg, partial(finetune, resume=True), f"{label}: finetune")
        record.optim = {"lr": finetune_cfg.optim.lr, "weight_decay": finetune_cfg.optim.weight_decay}
        if arm.kind == "multitask":  # the w it aligned with (searched, or the configured one)
            record.optim[MULTITASK_WEIGHT] = cfg.arm_align(arm, task).bilevel.multitask_weight
        record.metrics = summary["metrics"]
        record.wall_time_s["finetune"] = summary["wall_time_s"]
        record.compute["finetune"] = summary["compute"]
        records.append(record)
    return records, searched


def write_config(cfg: PipelineConfig) -> None:
    atomic_write(Path(cfg.out_dir) / CONFIG_FILE, lambda f: f.write(to_yaml(cfg)), mode="w")


STAGES = ("align", "evaluate", "finetune")  # the stage folders of one run of a study (align only in BiSSL arms)


def clear_study(cfg: PipelineConfig) -> None:
    """Delete what earlier runs of the study wrote into its stage folders and searches (never other files)."""
    pre_seeds = dict.fromkeys(cfg.pretrain_seed(seed) for seed in cfg.seeds)
    folders = [] if cfg.pretrained is not None else [Path(pretrain_config(cfg, s).out_dir) for s in pre_seeds]
    for task in cfg.tasks:
        for arm in cfg.arms:
            clear_search(arm_dir(cfg, task, arm) / "search")
            folders += [run_dir(cfg, task, arm, seed) / stage for seed in cfg.seeds for stage in STAGES]
    for folder in folders:
        if folder.is_dir():
            clear_run_dir(folder)
    (Path(cfg.out_dir) / CONFIG_FILE).unlink(missing_ok=True)


def run_study(cfg: PipelineConfig, until: Literal["pretrain"] | None = None, *, overwrite: bool = False) -> StudyResult:
    """Run (or resume) every stage of the study, then write ``results.json``, ``report.md`` and plots; with
    ``until="pretrain"`` stop once the pretrained backbone is there (a later call without it continues);
    ``overwrite``: first delete what earlier runs of the study wrote (:func:`clear_study`), to run it afresh."""
    from bissl.pipeline.report import write_report

    validate_names(cfg)
    for task in cfg.tasks:
        validate_names(cfg.task_finetune(task))
        for arm in cfg.arms:
            validate_names(cfg.arm_align(arm, task))
    out = Path(cfg.out_dir)
    make_out_dir(out)
    remove_stale_temp_files(out)  # a report or results file torn by a kill
    if overwrite:
        clear_study(cfg)
    if not (out / CONFIG_FILE).is_file():
        write_config(cfg)
    check_tasks(cfg)
    stage_times: dict[str, float] = {}
    pretrained = pretrain_runs(cfg, stage_times)
    if until == "pretrain":
        return StudyResult(out, [], None, None, pretrained)

    records: list[RunRecord] = []
    searches: dict[str, dict[str, Any]] = {}
    for task in cfg.tasks:
        for arm in cfg.arms:
            arm_records, searched = run_arm(cfg, task, arm, pretrained)
            records += arm_records
            if searched is not None:
                searches.setdefault(task.name, {})[arm.name] = searched

    results = {
        "config": cfg.model_dump(mode="json"),
        "environment": environment(),
        "seeds": cfg.seeds,
        "pretrained": {str(seed): str(path) for seed, path in pretrained.items()},
        "stage_wall_time_s": stage_times,
        "search": searches,
        "runs": [r.as_json() for r in records],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    report_path = write_report(cfg, results)
    save_json(results, out / RESULTS_FILE)
    write_config(cfg)
    return StudyResult(out, records, out / RESULTS_FILE, report_path, pretrained)
