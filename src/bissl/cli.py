"""The ``bissl`` command line: one verb per stage; each parses a config plus overrides and calls one function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from bissl import __version__
from bissl.utils.errors import BisslError

log = logging.getLogger("bissl")


def _common(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument(
        "--config", default=default_config, help=f"YAML file or shipped config name (default: {default_config})"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.05")
    parser.add_argument("--out-dir", help="run folder (same as out_dir=...)")
    parser.add_argument("--data-root", help="folder holding the datasets (same as data.root=...)")
    parser.add_argument("--download", action="store_true", help="allow torchvision to download missing data")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")


def _overrides(args: argparse.Namespace, data_key: str = "data") -> list[str]:
    extra = list(args.overrides)
    if args.out_dir:
        extra.append(f"out_dir={args.out_dir}")
    if args.data_root:
        extra.append(f"{data_key}.root={args.data_root}")
    if args.download:
        extra.append(f"{data_key}.download=true")
    return extra


def cmd_pretrain(args: argparse.Namespace) -> None:
    from bissl.config import PretrainConfig, load_config
    from bissl.train.pretrain import pretrain

    cfg = load_config(PretrainConfig, args.config, _overrides(args))
    result = pretrain(cfg, resume=args.resume)
    for key, value in result.metrics.items():
        print(f"{key}: {value:.4f}")
    print(f"backbone: {result.backbone_path}")
    print(f"run folder: {result.out_dir} (metrics.csv, summary.json, tb/)")


def cmd_align(args: argparse.Namespace) -> None:
    from bissl.config import AlignConfig, load_config
    from bissl.train.align import align

    extra = _overrides(args)
    if args.pretrained:
        extra.append(f"pretrained={args.pretrained}")
    if args.downstream:
        extra.append(f"downstream.task={args.downstream}")
    if args.data:
        extra.append(f"downstream.data.name={args.data}")
    cfg = load_config(AlignConfig, args.config, extra)
    result = align(cfg, resume=args.resume)
    for key, value in result.metrics.items():
        print(f"{key}: {value:.4f}")
    print(f"aligned backbone (theta): {result.backbone_path}")
    print(f"run folder: {result.out_dir} (metrics.csv, summary.json, tb/)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from bissl.config import EvaluateConfig, load_config
    from bissl.train.evaluate import evaluate

    extra = _overrides(args)
    if args.backbone:
        extra.append(f"backbone={args.backbone}")
    if args.data:
        extra.append(f"downstream.data.name={args.data}")
    cfg = load_config(EvaluateConfig, args.config, extra)
    result = evaluate(cfg)
    for key, value in result.metrics.items():
        print(f"{key}: {value:.4f}")
    if result.embedding_path is not None:
        print(f"embedding: {result.embedding_path}")
    print(f"summary: {result.summary_path}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from bissl.config import FinetuneConfig, load_config

    extra = _overrides(args, data_key="downstream.data")
    if args.backbone:
        extra.append(f"backbone={args.backbone}")
    if args.data:
        extra.append(f"downstream.data.name={args.data}")
    cfg = load_config(FinetuneConfig, args.config, extra)
    if cfg.hpo.trials == 0:
        from bissl.train.finetune import finetune

        result = finetune(cfg, resume=args.resume)
        for key, value in result.metrics.items():
            print(f"{key}: {value:.4f}")
        print(f"best epoch (validation): {result.best_epoch}")
        print(f"run folder: {result.out_dir} (backbone.pt, downstream_head.pt, metrics.csv, summary.json)")
        return
    from bissl.train.hpo import aggregate, final_runs, search

    found = search(cfg)
    params = " ".join(f"{key}={value:.4g}" for key, value in found.best_params.items())
    print(f"best trial: {found.best_trial} (val_{found.metric} {found.best_value:.4f}): {params}")
    if not cfg.hpo.final_seeds:
        print(f"study: {found.storage} (no final runs: hpo.final_seeds is empty)")
        return
    results = final_runs(cfg, found.best_params, cfg.hpo.final_seeds, search=found)
    for key, stats in aggregate(results).items():
        print(f"{key}: {stats['mean']:.4f} ± {stats['std']:.4f} (mean ± std over {stats['n']} seeds)")
    print(f"run folder: {cfg.out_dir} (study.db, trials/, final/seed<k>/, hpo_summary.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bissl", description="Bilevel self-supervised learning (BiSSL).")
    parser.add_argument("--version", action="version", version=f"bissl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], None], str, str]] = {
        "pretrain": (cmd_pretrain, "pretrain_digits", "self-supervised pretraining of a backbone"),
        "align": (cmd_align, "align_digits", "BiSSL: bilevel alignment of a pretrained backbone to a downstream task"),
        "finetune": (cmd_finetune, "finetune_digits", "fine-tuning, optionally with a search over lr and weight decay"),
        "evaluate": (cmd_evaluate, "evaluate_digits", "kNN / linear-probe accuracy and t-SNE of a frozen backbone"),
    }
    for name, (func, default_config, help_text) in commands.items():
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        _common(sub, default_config)
        sub.set_defaults(func=func)
        if name == "align":
            sub.add_argument("--pretrained", help="pretrain run folder or backbone.pt (same as pretrained=...)")
            sub.add_argument("--downstream", help="downstream task (same as downstream.task=...)")
            sub.add_argument("--data", help="downstream dataset (same as downstream.data.name=...)")
        if name == "finetune":
            sub.add_argument("--backbone", help="pretrain/align run folder or backbone.pt (same as backbone=...)")
            sub.add_argument("--data", help="downstream dataset (same as downstream.data.name=...)")
        if name == "evaluate":
            sub.add_argument("--backbone", help="run folder or backbone.pt to evaluate (same as backbone=...)")
            sub.add_argument("--data", help="labelled dataset (same as downstream.data.name=...)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except BisslError as exc:
        print(f"bissl {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"bissl {args.verb}: interrupted; re-run with --resume to continue from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
