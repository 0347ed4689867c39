"""The ``bissl`` command line: one verb per stage; each parses a config plus overrides and calls one function.

Every verb takes ``--config`` (a YAML path or a shipped config name), dotted ``key=value`` overrides and a
few flags that are shorthands for overrides. Plug-ins (the ``bissl.plugins`` entry points of installed packages and
``--plugin MODULE``, repeatable) are imported before the config is read and added to the config's ``plugins``, so
the run folder records them. Errors on bad input are one line on stderr (exit code 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from bissl import __version__
from bissl.utils.errors import BisslError, RunTerminated, out_of_memory
from bissl.utils.plugins import import_plugins, load_entry_point_plugins, merge_plugins


@dataclass(frozen=True)
class Verb:
    """A stage command: its default config, the config keys its data flags set, and its shorthand flags."""

    run: Callable[[Any, argparse.Namespace], None]
    config_class: str
    default_config: str
    help: str
    data_keys: tuple[str, ...]
    flags: dict[str, tuple[str, str]] = field(default_factory=dict)  # --flag -> (config key, help)


def _print(*lines: str) -> None:
    """Print the result lines on rank 0 only: under torchrun every rank runs the stage and returns its result."""
    from bissl.distributed import is_main

    if is_main():
        print(*lines, sep="\n")


def _print_metrics(metrics: dict[str, float]) -> None:
    _print(*(f"{key}: {value:.4f}" for key, value in metrics.items()))


def run_pretrain(cfg: Any, args: argparse.Namespace) -> None:
    from bissl.stages.pretrain import pretrain

    result = pretrain(cfg, resume=args.resume, overwrite=args.overwrite)
    _print_metrics(result.metrics)
    _print(f"backbone: {result.backbone_path}")
    _print(f"run folder: {result.out_dir} (metrics.csv, summary.json, tb/)")


def run_align(cfg: Any, args: argparse.Namespace) -> None:
    from bissl.stages.align import align

    result = align(cfg, resume=args.resume, overwrite=args.overwrite)
    _print_metrics(result.metrics)
    _print(f"aligned backbone (theta): {result.backbone_path}")
    _print(f"run folder: {result.out_dir} (metrics.csv, summary.json, tb/)")


def run_finetune(cfg: Any, args: argparse.Namespace) -> None:
    if cfg.hpo.trials == 0:
        from bissl.stages.finetune import finetune

        result = finetune(cfg, resume=args.resume, overwrite=args.overwrite)
        _print_metrics(result.metrics)
        _print(f"best epoch (validation): {result.best_epoch}")
        _print(f"run folder: {result.out_dir} (backbone.pt, downstream_head.pt, metrics.csv, summary.json)")
        return
    from bissl.stages.hpo import aggregate, final_runs, search

    found = search(cfg)
    params = " ".join(f"{key}={value:.4g}" for key, value in found.best_params.items())
    _print(f"best trial: {found.best_trial} (val_{found.metric} {found.best_value:.4f}): {params}")
    if not cfg.hpo.final_seeds:
        _print(f"study: {found.storage} (no final runs: hpo.final_seeds is empty)")
        return
    results = final_runs(cfg, found.best_params, cfg.hpo.final_seeds, search=found)
    for key, stats in aggregate(results).items():
        _print(f"{key}: {stats['mean']:.4f} ± {stats['std']:.4f} (mean ± std over {stats['n']} seeds)")
    _print(f"run folder: {cfg.out_dir} (study.db, trials/, final/seed<k>/, hpo_summary.json)")


def run_evaluate(cfg: Any, args: argparse.Namespace) -> None:
    from bissl.stages.evaluate import evaluate

    result = evaluate(cfg, overwrite=args.overwrite)
    _print_metrics(result.metrics)
    if result.knn_k is not None:
        _print(f"kNN k: {result.knn_k} (knn_k={cfg.knn_k}, capped by the training split's mean class size)")
    if result.embedding_path is not None:
        _print(f"embedding: {result.embedding_path}")
    _print(f"summary: {result.summary_path}")


def run_pipeline(cfg: Any, args: argparse.Namespace) -> None:
    from bissl.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise BisslError(
            "bissl pipeline runs as a single process: launch it without torchrun, or run its stages "
            "(bissl pretrain, align, finetune) separately under torchrun"
        )
    from bissl.pipeline import run_study

    result = run_study(cfg, until=args.until, overwrite=args.overwrite)
    if result.report_path is None:
        folders = ", ".join(str(path) for path in dict.fromkeys(result.pretrained.values()))
        _print(f"pretrained: {folders} (backbone.pt); run the same command without --until to continue")
        return
    _print(result.report_path.read_text().split("## Paired")[0].strip())
    _print(f"\nreport: {result.report_path}")
    _print(f"results: {result.results_path}")


_DATA = "downstream dataset (same as downstream.data.name=...)"
VERBS: dict[str, Verb] = {
    "pretrain": Verb(run_pretrain, "PretrainConfig", "pretrain_digits", "self-supervised pretraining of a backbone",
                     ("data",)),
    "align": Verb(run_align, "AlignConfig", "align_digits",
                  "BiSSL: bilevel alignment of a pretrained backbone to a downstream task",
                  ("pretext_data", "downstream.data"),
                  {"--pretrained": ("pretrained", "pretrain run folder or backbone.pt"),
                   "--downstream": ("downstream.task", "downstream task"), "--data": ("downstream.data.name", _DATA)}),
    "finetune": Verb(run_finetune, "FinetuneConfig", "finetune_digits",
                     "fine-tuning, optionally with a search over lr and weight decay", ("downstream.data",),
                     {"--backbone": ("backbone", "pretrain/align run folder or backbone.pt"),
                      "--data": ("downstream.data.name", _DATA)}),
    "evaluate": Verb(run_evaluate, "EvaluateConfig", "evaluate_digits",
                     "kNN / linear-probe accuracy and t-SNE of a frozen backbone", ("downstream.data",),
                     {"--backbone": ("backbone", "run folder or backbone.pt to evaluate"),
                      "--data": ("downstream.data.name", _DATA)}),
    "pipeline": Verb(run_pipeline, "PipelineConfig", "pipeline_digits",
                     "the whole study: pretrain, then conventional and BiSSL arms x tasks x seeds, then a report",
                     ("data",)),
}  # fmt: skip


def _thread_count(text: str) -> int:
    """1 to 4 threads per core: far more makes OpenMP run out of resources (100000 threads crash the process)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    most = 4 * (os.cpu_count() or 1)
    if int(text) > most:
        raise argparse.ArgumentTypeError(f"at most {most} (4 per core), got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bissl", description="Bilevel self-supervised learning (BiSSL).")
    parser.add_argument("--version", action="version", version=f"bissl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", required=True)
    for name, verb in VERBS.items():
        sub = subparsers.add_parser(name, help=verb.help, description=verb.help)
        sub.add_argument("--config", default=verb.default_config, help="YAML file or shipped config name")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.05")
        sub.add_argument("--out-dir", help="run folder (same as out_dir=...)")
        sub.add_argument("--data-root", help="folder holding the datasets")
        sub.add_argument("--download", action="store_true", help="allow torchvision to download missing data")
        sub.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
        sub.add_argument(
            "--overwrite", action="store_true", help="replace the earlier run's files in --out-dir (never others)"
        )
        sub.add_argument(
            "--plugin", action="append", default=[], metavar="MODULE",
            help="import a module (name or .py file) registering backbones, methods, tasks or datasets; repeatable",
        )  # fmt: skip
        sub.add_argument(
            "--threads", type=_thread_count, metavar="N",
            help="torch CPU threads (default: torch's, one per core); 1 where other jobs share the cores",
        )  # fmt: skip
        if name == "pipeline":
            sub.add_argument("--quick", action="store_true", help="apply the config's `quick` preset (smoke test)")
            sub.add_argument(
                "--until", choices=["pretrain"],
                help="stop after this stage (resuming as usual); the same command without it continues the study",
            )  # fmt: skip
        for flag, (key, help_text) in verb.flags.items():
            sub.add_argument(flag, dest=key.replace(".", "_"), help=f"{help_text} (same as {key}=...)")
    return parser


def load_verb_config(verb: Verb, args: argparse.Namespace, plugins: Sequence[str] = ()) -> Any:
    """The verb's config: file, then ``quick`` preset (pipeline; it wins over a task's own values:
    :func:`bissl.config.apply_preset`), then flags, then explicit overrides; the imported ``plugins`` (entry points
    and ``--plugin``) are added to its ``plugins``."""
    from bissl import config
    from bissl.engine.names import validate_names

    cls = getattr(config, verb.config_class)
    flags = [f"out_dir={args.out_dir}"] if args.out_dir else []
    for key in verb.data_keys:
        flags += [f"{key}.root={args.data_root}"] if args.data_root else []
        flags += [f"{key}.download=true"] if args.download else []
    flags += [f"{key}={value}" for key, _ in verb.flags.values() if (value := getattr(args, key.replace(".", "_")))]
    preset = config.load_config(cls, args.config).quick if getattr(args, "quick", False) else []
    cfg = config.load_config(cls, args.config, [*flags, *args.overrides], preset=preset)
    if plugins:
        cfg = config.build_config(cls, {**cfg.model_dump(mode="json"), "plugins": merge_plugins(cfg.plugins, plugins)})
    validate_names(cfg)
    return cfg


def _stop(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside a stage's loop (which checkpoints first): between the stages of a study, between trials."""
    raise RunTerminated("terminated (SIGTERM) between stages; finished stages are kept: run the same command to go on")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``key=value`` overrides may also follow options (argparse takes them only before)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    verb = VERBS[args.verb]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        plugins = [*load_entry_point_plugins(), *args.plugin]
        import_plugins(args.plugin)
        verb.run(load_verb_config(verb, args, plugins), args)
    except RunTerminated as exc:
        print(f"bissl {args.verb}: {exc}", file=sys.stderr)
        return 143
    except BisslError as exc:
        print(f"bissl {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if (line := out_of_memory(exc)) is None:
            raise
        print(f"bissl {args.verb}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bissl {args.verb}: interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
