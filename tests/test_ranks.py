"""tests/ranks.py, the multi-process tests' launcher: a rendezvous port that another process
took between free_port() and the rank's bind is retried on a new port; any other rank error
still fails at once; destroy_process_group frees the group in a rank that imports
torch._dynamo mid-test (through a TorchDispatchMode)."""

import datetime
import gc
import socket
import sys
import weakref

import pytest
import ranks
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode


def _barrier(rank, world, port):
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30),
                            init_method=f"tcp://127.0.0.1:{port}")
    dist.barrier()
    dist.destroy_process_group()


def _fails(rank, world, port):
    raise ValueError("a rank's own error")


def test_a_taken_port_is_retried_and_other_errors_are_not(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        fresh = ranks.free_port
        monkeypatch.setattr(ranks, "free_port",
                            lambda: ports.pop() if ports else fresh())
        ranks.run_ranks(_barrier, 2, deadline=120)
        assert not ports  # the taken port was tried first
        with pytest.raises(mp.ProcessRaisedException, match="a rank's own error"):
            ranks.run_ranks(_fails, 2, deadline=120)


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _group_freed(rank, world, port):
    """A collective under a TorchDispatchMode (which imports torch._dynamo when it is not yet
    imported), then destroy_process_group: is the group object freed?"""
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30),
                            init_method=f"tcp://127.0.0.1:{port}")
    with _PassThrough():
        dist.all_reduce(torch.ones(3))
    assert "torch._dynamo" in sys.modules
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()
    assert group() is None, f"rank {rank}: the process group outlived destroy_process_group"


def test_destroy_process_group_frees_the_group_in_a_rank():
    """What ranks._rank_main's early import of torch._dynamo is for (with torch 2.13, a rank
    spawned without it keeps the group past destroy_process_group, to be freed, or to abort
    the process, at interpreter exit)."""
    ranks.run_ranks(_group_freed, 2, deadline=120)
