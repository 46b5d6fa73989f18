"""Helpers of the multi-process tests (gloo on localhost): a free port for the rendezvous, and
spawning ranks with a deadline, so that a rank left waiting in a collective fails the test
instead of hanging it."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world: int, *args, deadline: float = 300.0):
    """Spawns `world` ranks of fn(rank, world, port, *args); fails on any rank's error or if
    they are not all done by the deadline (a hang)."""
    context = mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=False)
    stop = time.monotonic() + deadline
    while not context.join(timeout=5):
        if time.monotonic() > stop:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"ranks still running after {deadline:.0f} s: a rank is waiting in a "
                        "collective")
