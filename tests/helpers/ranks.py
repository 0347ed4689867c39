"""Run a function on several gloo processes on loopback, each set up the way ``torchrun`` sets up its workers, or a
command under ``torchrun`` itself, and read back what the ranks returned."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
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
    from bissl.distributed import cleanup

    try:
        fn(rank, world, *args)
    finally:
        cleanup()


def spawn_ranks(fn: Callable[..., None], world: int, *args: Any) -> None:
    """``fn(rank, world, *args)`` in ``world`` fresh processes (spawned: forking a process that holds torch's
    threads can hang); torchrun's environment variables are set, so ``init_from_env`` joins a gloo group. ``fn``
    must be a module-level function; it reports back through files."""
    mp.start_processes(_rank_main, args=(fn, world, free_port(), args), nprocs=world, start_method="spawn", join=True)


def _json_rank(rank: int, world: int, fn: Callable[..., Any], root: str, args: tuple[Any, ...]) -> None:
    results = fn(Path(root), *args)
    (Path(root) / f"results_rank{rank}.json").write_text(json.dumps(results))


def spawn_ranks_json(fn: Callable[..., Any], world: int, root: Path, *args: Any) -> None:
    """:func:`spawn_ranks` for ``fn(root, *args)`` returning JSON-able results, which each rank writes to
    ``root/results_rank<r>.json`` (read back by :func:`read_results`)."""
    spawn_ranks(_json_rank, world, fn, str(root), args)


def read_results(root: Path, world: int) -> dict[str, Any]:
    """What a run in ``root`` returned: ``results.json`` of a single process, else the ranks' results (which must
    be equal)."""
    if (root / "results.json").is_file():
        return json.loads((root / "results.json").read_text())
    ranks = [json.loads((root / f"results_rank{r}.json").read_text()) for r in range(world)]
    assert all(other == ranks[0] for other in ranks[1:]), "ranks returned different results"
    return ranks[0]


def run_torchrun(world: int, args: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node=<world> <args>`` as a user runs it (one thread
    per process); fails with the end of its stderr unless it exits with 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *args]
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
