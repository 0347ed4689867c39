"""Run a function on several gloo processes on loopback, each set up the way ``torchrun`` sets up its workers."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for ``MASTER_PORT``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple[Any, ...]) -> None:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ.update({**env, "WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    from bissl.train.distributed import cleanup

    try:
        fn(rank, world, *args)
    finally:
        cleanup()


def spawn_ranks(fn: Callable[..., None], world: int, *args: Any) -> None:
    """``fn(rank, world, *args)`` in ``world`` fresh processes (spawned: forking a process that holds torch's
    threads can hang); torchrun's environment variables are set, so ``init_from_env`` joins a gloo group. ``fn``
    must be a module-level function; it reports back through files."""
    mp.start_processes(_rank_main, args=(fn, world, free_port(), args), nprocs=world, start_method="spawn", join=True)
