"""``bissl pipeline``: one study. Pretrain once -> (align ->) fine-tune for every task x arm x seed -> report.

Stages meet only through their run folders. A stage whose ``summary.json`` exists is finished and is
skipped, provided its folder was made with the same config (a changed config is an error, never mixed
with old results); an unfinished stage resumes from its checkpoint. So an interrupted study continues
where it stopped when the same command is run again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bissl.config import AlignConfig, ArmSpec, FinetuneConfig, PipelineConfig, PretrainConfig, TaskSpec, to_yaml
from bissl.engine.checkpoint import resolve_backbone_file
from bissl.engine.names import validate_names
from bissl.engine.runtime import SUMMARY_FILE, environment, require_same_config
from bissl.stages.align import align
from bissl.stages.finetune import finetune
from bissl.stages.pretrain import pretrain
from bissl.utils.io import atomic_write, save_json

log = logging.getLogger("bissl.pipeline")

RESULTS_FILE = "results.json"


@dataclass
class RunRecord:
    """One fine-tuning run of a study (and the alignment before it, for BiSSL arms)."""

    task: str
    arm: str
    seed: int
    finetune_dir: Path
    align_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    align_metrics: dict[str, float] = field(default_factory=dict)
    wall_time_s: dict[str, float] = field(default_factory=dict)


@dataclass
class StudyResult:
    out_dir: Path
    records: list[RunRecord]
    results_path: Path
    report_path: Path


def run_stage(cfg: BaseModel, runner: Callable[..., Any], label: str) -> dict[str, Any]:
    """Run one stage to completion (or reuse its finished folder) and return its summary."""
    out = Path(cfg.out_dir)  # type: ignore[attr-defined]
    summary = out / SUMMARY_FILE
    if summary.is_file():
        require_same_config(out, cfg)
        log.info("%s: finished earlier, reusing %s", label, out)
    else:
        log.info("%s: running in %s", label, out)
        runner(cfg, resume=True)
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


def pretrain_config(cfg: PipelineConfig) -> PretrainConfig:
    stage = cfg.pretrain.model_copy(update={"out_dir": str(Path(cfg.out_dir) / "pretrain"), "device": cfg.device})
    return with_data_source(cfg, stage, ("data",))  # type: ignore[return-value]


def run_dir(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int) -> Path:
    return Path(cfg.out_dir) / task.name / arm.name / f"seed{seed}"


def _run_fields(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, stage: str) -> dict[str, Any]:
    """The config fields the study sets on every stage of one run: seed, device, folder and task."""
    return {
        "seed": seed,
        "device": cfg.device,
        "out_dir": str(run_dir(cfg, task, arm, seed) / stage),
        "downstream": task.downstream,
    }


def align_config(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, pretrained: Path) -> AlignConfig:
    update = {**_run_fields(cfg, task, arm, seed, "align"), "pretrained": str(pretrained)}
    return with_data_source(
        cfg, cfg.arm_align(arm, task).model_copy(update=update), ("pretext_data", "downstream.data")
    )  # type: ignore[return-value]


def finetune_config(cfg: PipelineConfig, task: TaskSpec, arm: ArmSpec, seed: int, backbone: Path) -> FinetuneConfig:
    update = {**_run_fields(cfg, task, arm, seed, "finetune"), "backbone": str(backbone)}
    return with_data_source(cfg, cfg.task_finetune(task).model_copy(update=update), ("downstream.data",))  # type: ignore[return-value]


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
    atomic_write(out / "config.yaml", lambda f: f.write(to_yaml(cfg)), mode="w")
    stage_times: dict[str, float] = {}
    if cfg.pretrained is not None:
        pretrained = resolve_backbone_file(cfg.pretrained).parent
    else:
        summary = run_stage(pretrain_config(cfg), pretrain, "pretrain")
        pretrained = Path(summary["backbone"]).parent
        stage_times["pretrain"] = summary["wall_time_s"]

    records: list[RunRecord] = []
    for task in cfg.tasks:
        for seed in cfg.seeds:
            for arm in cfg.arms:
                label = f"{task.name}/{arm.name}/seed{seed}"
                record = RunRecord(task.name, arm.name, seed, run_dir(cfg, task, arm, seed) / "finetune", None)
                backbone = pretrained
                if arm.bissl:
                    align_cfg = align_config(cfg, task, arm, seed, pretrained)
                    summary = run_stage(align_cfg, align, f"{label}: align")
                    record.align_dir = Path(align_cfg.out_dir)
                    record.align_metrics = summary["metrics"]
                    record.wall_time_s["align"] = summary["wall_time_s"]
                    backbone = record.align_dir
                summary = run_stage(finetune_config(cfg, task, arm, seed, backbone), finetune, f"{label}: finetune")
                record.metrics = summary["metrics"]
                record.wall_time_s["finetune"] = summary["wall_time_s"]
                records.append(record)

    results = {
        "config": cfg.model_dump(mode="json"),
        "environment": environment(),
        "seeds": cfg.seeds,
        "pretrained": str(pretrained),
        "stage_wall_time_s": stage_times,
        "runs": [
            {
                "task": r.task,
                "arm": r.arm,
                "seed": r.seed,
                "finetune_dir": str(r.finetune_dir),
                "align_dir": str(r.align_dir) if r.align_dir else None,
                "metrics": r.metrics,
                "align_metrics": r.align_metrics,
                "wall_time_s": r.wall_time_s,
            }
            for r in records
        ],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    report_path = write_report(cfg, results, pretrained)
    save_json(results, out / RESULTS_FILE)
    return StudyResult(out, records, out / RESULTS_FILE, report_path)
