"""tests/ranks.py, the multi-process tests' launcher: a rendezvous port that another process
took between free_port() and the rank's bind is retried on a new port; any other rank error
still fails at once."""

import datetime
import socket

import pytest
import ranks
import torch.distributed as dist
import torch.multiprocessing as mp


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
