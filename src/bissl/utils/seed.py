"""Seeding of every random source, and derivation of independent per-step seeds."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. ``derive_seed(seed, "augment", step)``).

    Drawing each step's randomness from its own derived seed makes a resumed run identical to an
    uninterrupted one without saving generator states.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed NumPy/Python from the worker's torch seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
