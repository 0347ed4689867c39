"""Shared fixtures: tiny, fast configurations of every stage on the embedded digits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "downstream"))
import fake_detection  # noqa: F401 - registers `synthetic_detection` until the shared dataset does

TINY_PRETRAIN = [
    "epochs=2",
    "data.image_size=8",
    "data.batch_size=128",
    "backbone.kwargs.width=8",
    "optim.warmup_epochs=1",
    "monitor.every_epochs=0",
    "monitor.linear_probe_epochs=0",
    "log.progress=false",
    "log.tensorboard=false",
    "log.every_steps=1",
]


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


TINY_ALIGN = [
    "pretext_data.image_size=8",
    "downstream.data.image_size=8",
    "lower.batch_size=64",
    "upper.batch_size=32",
    "bilevel.cycles=2",
    "bilevel.n_lower=2",
    "bilevel.n_upper=2",
    "bilevel.head_warmup_epochs=1",
    "checkpoint_every_cycles=1",
    "log.progress=false",
    "log.tensorboard=false",
]


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
