"""Does theta carry the downstream signal? BiSSL on Fashion-MNIST over a grid of lam x cycles (docs/coupling.md).

One pretrained backbone (``--pretrained DIR``, or pretrained here with ``pipeline_fashion_mnist``'s ``pretrain``
section, ``--pretrain-epochs``), then for every (lam, cycles) ``bissl align`` with ``pipeline_fashion_mnist``'s
``align`` section on a Fashion-MNIST k-shot task (``--few-shot``, 16 px), and per run: the coupling numbers
(``summary.json``'s ``coupling``, the last cycle's ``coupling/proximal_share``), the coupling strength kappa of the
run (:func:`~bissl.bilevel.coupling.coupling_strength`, cosine schedule: mean lr factor ``(1 + min_lr_ratio) / 2``)
and the frozen kNN / linear probe of theta and of phi on the task's test split (``bissl evaluate``'s
:func:`~bissl.stages.evaluate.frozen_scores`; the k-shot train split is the memory bank / probe training set).
The pretrained backbone theta0 is scored the same way (the ``pretrained`` row).

    python benchmarks/coupling_sweep.py --threads 1 [--pretrained DIR] [--lams 1e-3,1e-2,1e-1,1] [--cycles 4,12]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bissl.bilevel.coupling import coupling_strength
from bissl.config import AlignConfig, PretrainConfig, build_config, read_config_file
from bissl.data import build_dataset
from bissl.downstream.base import build_task
from bissl.engine.checkpoint import load_backbone, resolve_backbone_file
from bissl.engine.files import BACKBONE_FILE, METRICS_JSONL_FILE, SUMMARY_FILE, UPPER_BACKBONE_FILE
from bissl.engine.logger import read_metrics
from bissl.stages.align import align
from bissl.stages.evaluate import frozen_features, frozen_scores
from bissl.stages.pretrain import pretrain

RESULTS = Path(__file__).parent / "results"
CPU = torch.device("cpu")


def frozen(backbone_file: Path, cfg: AlignConfig) -> dict[str, float]:
    """kNN (k = 20, T = 0.07) and linear-probe (100 epochs) test accuracy of a frozen backbone on the task."""
    backbone, _ = load_backbone(backbone_file)
    backbone.eval()
    _, splits = build_task(cfg.downstream)
    train = frozen_features(backbone, splits["train"], device=CPU)
    test = frozen_features(backbone, splits["test"], device=CPU)
    scores = frozen_scores(train, {"test": test}, knn_k=20, knn_temperature=0.07, probe_epochs=100, seed=0)
    return {"knn_test": scores["knn_test"], "linear_probe_test": scores["linear_probe_test"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, help="a pretrain run folder (default: pretrain one here)")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--lams", default="1e-3,1e-2,1e-1,1")
    parser.add_argument("--cycles", default="4,12")
    parser.add_argument("--few-shot", type=int, default=100, help="labelled training images per class")
    parser.add_argument("--solver-iters", type=int, default=2, help="CG iterations (NOTES: 0.5%% off at 2)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/coupling_sweep"))
    parser.add_argument("--out", type=Path, default=RESULTS / "coupling_sweep-cpu.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    study = read_config_file("pipeline_fashion_mnist")

    pretrained = args.pretrained
    if pretrained is None:
        section = {**study["pretrain"], "epochs": args.pretrain_epochs, "out_dir": str(args.work_dir / "pretrain")}
        section["monitor"] = {"every_epochs": 0, "linear_probe_epochs": 0}
        pretrained = pretrain(build_config(PretrainConfig, section)).out_dir
    downstream = {"task": "classification", "data": {"name": "fashion_mnist", "image_size": 16}, "augment": True}
    downstream["few_shot"] = args.few_shot
    base = {**study["align"], "pretrained": str(pretrained), "downstream": downstream, "device": "cpu"}
    base["log"] = {**base.get("log", {}), "progress": False, "tensorboard": False}
    solver = {"name": "cg", "iters": args.solver_iters, "tol": None}  # a fixed iteration count
    base["bilevel"] = {**base["bilevel"], "solver": solver, "head_warmup_epochs": 20}  # as the study's k-shot tasks
    build_dataset("fashion_mnist", "train", image_size=16)  # fail early if the data is missing

    def config(lam: float, cycles: int) -> AlignConfig:
        bilevel = {**base["bilevel"], "lam": lam, "cycles": cycles}
        return build_config(
            AlignConfig, {**base, "bilevel": bilevel, "out_dir": str(args.work_dir / f"lam{lam:g}_c{cycles}")}
        )

    reference = config(1e-3, 1)
    rows: list[dict[str, Any]] = [{"arm": "pretrained", **frozen(resolve_backbone_file(str(pretrained)), reference)}]
    print(rows[0], flush=True)
    for cycles in (int(c) for c in args.cycles.split(",")):
        for lam in (float(v) for v in args.lams.split(",")):
            cfg = config(lam, cycles)
            start = time.perf_counter()
            result = align(cfg)
            seconds = time.perf_counter() - start
            summary = json.loads((result.out_dir / SUMMARY_FILE).read_text())
            last = read_metrics(result.out_dir / METRICS_JSONL_FILE, "cycle")[-1]
            lower = cfg.lower.optim
            kappa = coupling_strength(
                steps=cycles * cfg.bilevel.n_lower, lr=lower.lr, lam=lam, momentum=lower.momentum,
                lr_scale=(1 + lower.min_lr_ratio) / 2,
            )  # fmt: skip
            theta = frozen(result.out_dir / BACKBONE_FILE, cfg)
            phi = frozen(result.out_dir / UPPER_BACKBONE_FILE, cfg)
            row = {
                "arm": "bissl", "lam": lam, "cycles": cycles, "kappa": kappa, "align_s": seconds,
                **summary["coupling"], "proximal_share": last["coupling/proximal_share"],
                **theta, **{f"phi_{k}": v for k, v in phi.items()},
                "theta_test_top1_head": summary["metrics"]["theta_test_top1"],
            }  # fmt: skip
            rows.append(row)
            print(row, flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            payload = {"settings": {**vars(args), "align": base}, "rows": rows}
            args.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(markdown(rows))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README table: one row per run, the pretrained backbone first."""
    lines = [
        "| lam | cycles | kappa | theta shift | phi shift | cos(dtheta, dphi) | gap | prox. share "
        "| theta kNN | theta probe | phi probe |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["arm"] == "pretrained":
            lines.append(
                f"| pretrained | | | | | | | | {100 * r['knn_test']:.1f} | {100 * r['linear_probe_test']:.1f} | |"
            )
            continue
        lines.append(
            f"| {r['lam']:g} | {r['cycles']} | {r['kappa']:.3g} | {r['theta_shift']:.4f} | {r['phi_shift']:.4f} "
            f"| {r['cosine']:.3f} | {r['gap']:.4f} | {r['proximal_share']:.3f} | {100 * r['knn_test']:.1f} "
            f"| {100 * r['linear_probe_test']:.1f} | {100 * r['phi_linear_probe_test']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
