"""Shared fixtures: tiny, fast configurations of every stage on the embedded digits."""

from __future__ import annotations

import contextlib
import multiprocessing.process
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "downstream"))
import fake_detection  # noqa: F401 - registers `synthetic_detection` until the shared dataset does

from helpers.stages import TINY_ALIGN, TINY_PRETRAIN

# fixtures (here and in test modules) that run a stage or start processes: every test using one is end-to-end, so
# `pytest -m "not e2e"` never sets them up (the guard below would fail such a test only after its fixture ran)
STAGE_FIXTURES = {"tiny_pretrained", "quick_study", "pretrained", "runs", "ddp", "single", "results", "start_worker"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a fixture which runs a stage is ``e2e`` like one that runs a stage itself."""
    for item in items:
        if STAGE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@contextlib.contextmanager
def _watch_for_e2e_work(item: pytest.Item) -> Iterator[None]:
    """Fail a test not marked ``e2e`` that runs a stage (builds a :class:`bissl.engine.run.Run`) or starts a
    process, in its body or in a fixture it sets up: ``pytest -m "not e2e"`` (the editing loop) stays fast."""
    if item.get_closest_marker("e2e") is not None:
        yield
        return
    from bissl.engine.run import Run

    seen: list[str] = []

    def record(what: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(what)
            return original(self, *args, **kwargs)

        return wrapper

    def popen(self: Any, args: Any, *rest: Any, **kwargs: Any) -> Any:
        # a Python process (a bissl command, torchrun, a worker); libraries' own probes (`lscpu` from joblib's CPU
        # count, say) are not a test's end-to-end work
        command = [args] if isinstance(args, str | Path) else list(args)
        if command and Path(str(command[0]).split()[0]).name.startswith(("python", "bissl", "torchrun")):
            seen.append("starts a process")
        return original_popen(self, args, *rest, **kwargs)

    process, original_popen = multiprocessing.process.BaseProcess, subprocess.Popen.__init__
    with (
        mock.patch.object(Run, "__init__", record("runs a stage", Run.__init__)),
        mock.patch.object(subprocess.Popen, "__init__", popen),
        mock.patch.object(process, "start", record("starts a process", process.start)),
    ):
        yield
    if seen:
        pytest.fail(f"this test {seen[0]}: mark it @pytest.mark.e2e (pytest -m 'not e2e' is the editing loop)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _watch_for_e2e_work(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _watch_for_e2e_work(item):
        return (yield)


@pytest.fixture(autouse=True)
def _fast_torch():
    """Tests run on 2 cores beside other work: one thread is faster and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_pretrain_overrides(tmp_path):
    return [*TINY_PRETRAIN, f"out_dir={tmp_path / 'pretrain'}"]


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """A finished tiny pretraining run (digits, 8 px, small_cnn width 8), shared by the stage tests."""
    from bissl.config import PretrainConfig, load_config
    from bissl.stages.pretrain import pretrain

    out = tmp_path_factory.mktemp("pretrained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pretrain(load_config(PretrainConfig, "pretrain_digits", [*TINY_PRETRAIN, f"out_dir={out}"]))
    torch.set_num_threads(threads)
    return out


@pytest.fixture
def tiny_align_overrides(tmp_path, tiny_pretrained):
    return [*TINY_ALIGN, f"pretrained={tiny_pretrained}", f"out_dir={tmp_path / 'align'}"]
