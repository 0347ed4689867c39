"""Why does few-shot fine-tuning end below its own linear probe? Per-epoch validation AND test curves of LP-FT.

For one pretrained backbone (``--pretrained DIR``, a pretrain run of ``pipeline_digits``) and each few-shot draw
(``--draws``), fine-tune with ``pipeline_digits``' task settings at each lr (``--lrs``) and record, per epoch, the
validation and the test top-1 (test is read here only, for the measurement: the stage never sees it before
selection); epoch 0 is LP-FT's probe. Prints, per lr, the mean over draws of: the probe's val / test, the epoch
selected on validation (val / test), and the best test any epoch reached (the oracle).

    python benchmarks/probe_vs_finetune.py --threads 1 --pretrained runs/pipeline_digits/pretrain/seed0
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile
from typing import Any

import torch

from bissl.config import PipelineConfig, build_config, read_config_file
from bissl.stages.finetune import finetune

finetune_stage = importlib.import_module("bissl.stages.finetune")  # the module: the package exports the function


def curves(cfg: Any) -> list[tuple[float, float]]:
    """``(val top-1, test top-1)`` after the probe (index 0) and after every fine-tuning epoch."""
    splits: dict[str, Any] = {}
    seen: list[tuple[float, float]] = []
    build_task, evaluate_split = finetune_stage.build_task, finetune_stage.evaluate_split

    def recording_build_task(downstream: Any) -> Any:
        task, found = build_task(downstream)
        splits.update(found)
        return task, found

    def recording_evaluate(task: Any, backbone: Any, head: Any, dataset: Any, *args: Any) -> dict[str, float]:
        scores = evaluate_split(task, backbone, head, dataset, *args)
        if dataset is splits["val"]:
            seen.append((scores["top1"], evaluate_split(task, backbone, head, splits["test"], *args)["top1"]))
        return scores

    finetune_stage.build_task, finetune_stage.evaluate_split = recording_build_task, recording_evaluate
    try:
        finetune(cfg)
    finally:
        finetune_stage.build_task, finetune_stage.evaluate_split = build_task, evaluate_split
    return seen[: cfg.epochs + 1]  # the final re-scoring of the selected model is not an epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--lrs", default="0.003,0.01,0.03")
    parser.add_argument("--draws", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=None, help="default: the study's task setting")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    study = build_config(PipelineConfig, read_config_file("pipeline_digits"))
    task = study.tasks[0]
    base = study.task_finetune(task)
    quiet = base.log.model_copy(update={"progress": False, "tensorboard": False})
    base = base.model_copy(update={"backbone": args.pretrained, "device": "cpu", "log": quiet,
                                   "epochs": args.epochs or base.epochs})  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in (float(x) for x in args.lrs.split(",")):
            per_draw = []
            for draw in (int(x) for x in args.draws.split(",")):
                cfg = base.model_copy(update={
                    "seed": draw, "out_dir": f"{tmp}/lr{lr}_draw{draw}",
                    "optim": base.optim.model_copy(update={"lr": lr}),
                    "downstream": task.downstream.model_copy(update={"few_shot_seed": draw}),
                })  # fmt: skip
                seen = curves(cfg)
                chosen = max(range(len(seen)), key=lambda e: (seen[e][0], -e))  # the stage's rule: first best val
                per_draw.append({"probe_val": seen[0][0], "probe_test": seen[0][1], "sel_val": seen[chosen][0],
                                 "sel_test": seen[chosen][1], "sel_epoch": chosen, "last_test": seen[-1][1],
                                 "oracle_test": max(t for _, t in seen)})  # fmt: skip
            mean = {k: statistics.mean(d[k] for d in per_draw) for k in per_draw[0]}
            rows.append({"lr": lr, **mean, "per_draw": per_draw})
            print(json.dumps({k: round(v, 4) for k, v in rows[-1].items() if k != "per_draw"}), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
