"""``bissl pipeline``: one study. For every replicate (one entry of ``seeds``): pretrain with its seed, then for every
task x arm: (align ->) score the starting backbone frozen (kNN, linear probe) -> fine-tune; then the report.

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
from typing import Any

from pydantic import BaseModel

from bissl.config import (
    AlignConfig,
    ArmSpec,
    EvaluateConfig,
    FinetuneConfig,
    PipelineConfig,
    PretrainConfig,
    TaskSpec,
    to_yaml,
)
from bissl.downstream.base import DOWNSTREAM_TASKS
from bissl.engine.checkpoint import resolve_backbone_file
from bissl.engine.names import validate_names
from bissl.engine.runtime import SUMMARY_FILE, environment, require_same_config
from bissl.stages.align import align
from bissl.stages.evaluate import evaluate, single_label
from bissl.stages.finetune import finetune
from bissl.stages.hpo import search
from bissl.stages.pretrain import pretrain
from bissl.utils.io import atomic_write, save_json
from bissl.utils.seed import derive_seed

log = logging.getLogger("bissl.pipeline")

RESULTS_FILE = "results.json"


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
    frozen: dict[str, float] = field(default_factory=dict)  # starting backbone's knn_* / linear_probe_*
    align_metrics: dict[str, float] = field(default_factory=dict)
    coupling: dict[str, Any] = field(default_factory=dict)  # the align stage's coupling diagnostics, if it has them
    wall_time_s: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}


@dataclass
class StudyResult:
    out_dir: Path
    records: list[RunRecord]
    results_path: Path
    report_path: Path


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


def align_config(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, pretrained: Path) -> AlignConfig:
    update = {**_run_fields(cfg, task, arm, seed, "align"), "pretrained": str(pretrained)}
    return with_data_source(
        cfg, cfg.arm_align(arm, task).model_copy(update=update), ("pretext_data", "downstream.data")
    )  # type: ignore[return-value]


def evaluate_config(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, backbone: Path) -> EvaluateConfig:
    """Frozen kNN / linear probe of the backbone a run starts fine-tuning from (the report draws the t-SNE)."""
    update = {**_run_fields(cfg, task, arm, seed, "evaluate"), "backbone": str(backbone), "embedding": False}
    return with_data_source(cfg, cfg.evaluate.model_copy(update=update), ("downstream.data",))  # type: ignore[return-value]


def finetune_config(
    cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, backbone: Path, optim: dict[str, float]
) -> FinetuneConfig:
    """Fine-tuning of one run, with ``optim`` (e.g. the searched lr / weight decay) set on the task's settings."""
    stage = cfg.task_finetune(task)
    update = {
        **_run_fields(cfg, task, arm, seed, "finetune"),
        "backbone": str(backbone),
        "optim": stage.optim.model_copy(update=optim),
    }
    return with_data_source(cfg, stage.model_copy(update=update), ("downstream.data",))  # type: ignore[return-value]


def has_class_labels(task: TaskSpec) -> bool:
    """Whether the task's data has single-label classes (``info.kind``: what frozen kNN and linear probes need)."""
    return single_label(DOWNSTREAM_TASKS.get(task.downstream.task).splits(task.downstream)["test"].info)


def search_settings(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, backbone: Path) -> dict[str, Any]:
    """Search ``arm``'s fine-tuning lr / weight decay on validation, from the first replicate's starting backbone;
    the trials' seed (which seeds the sampler) is the arm's own, so arms do not share one draw of candidates."""
    start = time.perf_counter()
    stage = finetune_config(cfg, task, arm, cfg.seeds[0], backbone, {})
    own_seed = derive_seed(cfg.seeds[0], "search", task.name, arm.name) % 2**31
    stage = stage.model_copy(update={"out_dir": str(arm_dir(cfg, task, arm) / "search"), "seed": own_seed})
    result = search(stage, cfg.search.hpo())
    log.info("%s/%s: best of %d trials %s (val %s %.4f)", task.name, arm.name, cfg.search.trials,
             result.best_params, result.metric, result.best_value)  # fmt: skip
    return {
        "best_params": result.best_params,
        "best_val": result.best_value,
        "metric": f"val_{result.metric}",
        "trials": [{"params": t["params"], "value": t["value"], "state": t["state"]} for t in result.trials],
        "wall_time_s": time.perf_counter() - start,  # this call only: ~0 when the search finished earlier
    }


def start_backbone(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, record: RunRecord) -> Path:
    """The backbone ``record``'s run fine-tunes from: its pretrained one, or theta of its alignment (run here)."""
    if not arm.bissl:
        return record.pretrained
    align_cfg = align_config(cfg, task, arm, record.seed, record.pretrained)
    summary = run_stage(align_cfg, partial(align, resume=True), f"{task.name}/{arm.name}/seed{record.seed}: align")
    record.align_dir = Path(align_cfg.out_dir)
    record.align_metrics = summary["metrics"]
    record.coupling = summary.get("coupling", {})
    record.wall_time_s["align"] = summary["wall_time_s"]
    return record.align_dir


def run_arm(
    cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, pretrained: dict[int, Path], labelled: bool
) -> tuple[list[RunRecord], dict[str, Any] | None]:
    """Every replicate of one arm on one task (and, with ``search.trials``, its search first); the runs and the
    search. ``pretrained``: each replicate's pretraining run, by seed."""
    records, searched = [], None
    for seed in cfg.seeds:
        label = f"{task.name}/{arm.name}/seed{seed}"
        record = RunRecord(task.name, arm.name, seed, run_dir(cfg, task, arm, seed) / "finetune", pretrained[seed],
                           cfg.few_shot_seed(seed) if task.downstream.few_shot else None)  # fmt: skip
        backbone = start_backbone(cfg, task, arm, record)
        if labelled:
            summary = run_stage(evaluate_config(cfg, task, arm, seed, backbone), evaluate, f"{label}: frozen scores")
            record.frozen = summary["metrics"]
        if cfg.search.trials > 0 and searched is None:
            searched = search_settings(cfg, task, arm, backbone)
        finetune_cfg = finetune_config(cfg, task, arm, seed, backbone, searched["best_params"] if searched else {})
        summary = run_stage(finetune_cfg, partial(finetune, resume=True), f"{label}: finetune")
        record.optim = {"lr": finetune_cfg.optim.lr, "weight_decay": finetune_cfg.optim.weight_decay}
        record.metrics = summary["metrics"]
        record.wall_time_s["finetune"] = summary["wall_time_s"]
        records.append(record)
    return records, searched


def write_config(cfg: PipelineConfig) -> None:
    atomic_write(Path(cfg.out_dir) / "config.yaml", lambda f: f.write(to_yaml(cfg)), mode="w")


def run_study(cfg: PipelineConfig) -> StudyResult:
    """Run (or resume) every stage of the study, then write ``results.json``, ``report.md`` and plots."""
    from bissl.pipeline.report import write_report

    validate_names(cfg)
    for task in cfg.tasks:
        validate_names(cfg.task_finetune(task))
        for arm in cfg.arms:
            validate_names(cfg.arm_align(arm, task))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.yaml").is_file():
        write_config(cfg)
    stage_times: dict[str, float] = {}
    pretrained = pretrain_runs(cfg, stage_times)

    records: list[RunRecord] = []
    searches: dict[str, dict[str, Any]] = {}
    for task in cfg.tasks:
        labelled = has_class_labels(task)
        for arm in cfg.arms:
            arm_records, searched = run_arm(cfg, task, arm, pretrained, labelled)
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
    return StudyResult(out, records, out / RESULTS_FILE, report_path)
