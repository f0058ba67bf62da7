"""Run a function on N gloo ranks in fresh processes, with a deadline.

Why a deadline: the behaviour under test includes collectives (the amax reduction); a rank that skips one leaves the
others waiting forever. Here that fails the test with a message instead of hanging the suite.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable[[int, int], Any], world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size)
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def run_ranks(fn: Callable[[int, int], Any], tmp_path: Path, world_size: int = 2, timeout_s: float = 120) -> list[Any]:
    """``fn(rank, world_size)`` on every rank of a fresh gloo group (``fn`` must be importable: a module-level
    function); returns the ranks' return values in rank order."""
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), str(tmp_path)), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"the {world_size} ranks did not finish within {timeout_s} s: a collective was not "
                                 "joined by every rank")
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
