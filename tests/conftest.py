"""Shared fixtures: tiny, fast configurations of every stage on the embedded digits."""

from __future__ import annotations

import pytest
import torch

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
