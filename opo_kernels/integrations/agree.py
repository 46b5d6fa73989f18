"""An error on one process of a data-parallel job, raised on every process.

A loss call that raises on one rank (bad input in its micro-batch) would leave the other ranks
waiting in the next collective (the gradient all-reduce or reduce-scatter) until its timeout.
``raise_together`` turns the error into one on every rank: one all-reduce of one int per
process over torch.distributed's default group, at a point every process reaches the same
number of times.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.distributed as dist


def distributed() -> bool:
    """torch.distributed's default group is up, with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where the default process group's backend takes tensors (gloo: CPU, nccl: the GPU; a
    backend string with a CPU part, "cpu:gloo,cuda:nccl", takes CPU tensors)."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def failed_ranks(failed: bool) -> List[int]:
    """The ranks whose ``failed`` is True: one all-reduce of a [world] int32 vector under
    torch.distributed (collective: every process calls it at the same point); without it,
    [0] or []."""
    if not distributed():
        return [0] if failed else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=collective_device())
    flags[dist.get_rank()] = int(failed)
    dist.all_reduce(flags)
    return flags.nonzero().flatten().tolist()


def raise_together(error: Optional[Exception],
                   others: Callable[[List[int]], Exception]) -> None:
    """Raises ``error`` on the process that has one, and ``others(failed ranks)`` on every
    other process when any has one; returns when none has. Collective (``failed_ranks``)."""
    failed = failed_ranks(error is not None)
    if error is not None:
        raise error
    if failed:
        raise others(failed)
