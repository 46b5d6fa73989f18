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


def _port_taken(err: Exception) -> bool:
    """A rank's rendezvous found its port taken: free_port() closed it before the rank bound
    it, and another process (a test on another xdist worker) took it in between."""
    text = str(err).lower()
    return "eaddrinuse" in text or "address already in use" in text


def run_ranks(fn, world: int, *args, deadline: float = 300.0, attempts: int = 3):
    """Spawns `world` ranks of fn(rank, world, port, *args); fails on any rank's error or if
    they are not all done by the deadline (a hang). A rendezvous port taken in the meantime
    (only that error) is retried on a new port, up to ``attempts`` times in all."""
    for attempt in range(attempts):
        try:
            return _run_once(fn, world, free_port(), args, deadline)
        except mp.ProcessRaisedException as err:
            if not _port_taken(err) or attempt == attempts - 1:
                raise


def _rank_main(rank: int, fn, *args):
    """Each spawned rank: torch._dynamo imported, then fn(rank, *args).

    Why: torch._dynamo imported *after* init_process_group (torch 2.13) keeps the default
    group alive past destroy_process_group, and it is then freed while the interpreter shuts
    down, where gloo aborts the process now and then ("terminate called without an active
    exception", SIGABRT; 2 of 30 runs of a tensor-parallel test here). A TorchDispatchMode
    (the tests' matmul counters) imports it lazily, mid-test. Imported first, it holds no group
    (test_ranks.py checks that the group is freed)."""
    import torch._dynamo  # noqa: F401

    fn(rank, *args)


def _run_once(fn, world: int, port: int, args: tuple, deadline: float):
    context = mp.spawn(_rank_main, args=(fn, world, port, *args), nprocs=world, join=False)
    stop = time.monotonic() + deadline
    while not context.join(timeout=5):
        if time.monotonic() > stop:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"ranks still running after {deadline:.0f} s: a rank is waiting in a "
                        "collective")
