"""When a call's value checks are read: ``validate=True`` (at the call), ``"deferred"`` (later,
without a host stall) or ``False`` (never).

The checks themselves run on the device in every mode but False: the epilogue counts the bad
values of docs/spec.md "Bad input" (labels outside [0, V), seq_ids outside [-1, B), non-finite
logits on counted rows, non-finite rewards, ref_logprobs, weights, log-probs or entropy, mask
values other than 0/1) into a small integer tensor. What differs is when the host reads it:

- ``validate=True``: at the end of the call. Reading it waits for the GPU to finish the work
  queued so far: one stall per call, during which the GPU then waits for the host to queue
  the rest of the step. The error is raised by the call that got the bad input.
- ``validate="deferred"``: the counts are copied to host memory asynchronously (CUDA: a pinned
  buffer and an event; no wait). They are read
    1. at the backward of the same call, if the copy has finished by then (never waits): the
       error is raised by ``loss.backward()``, before an optimizer step can use the gradient;
    2. otherwise at the next call that validates (any ``opo_loss``,
       ``opo_loss_from_logprobs`` or ``fused_linear_opo_loss`` call with validate=True or
       "deferred" in the process, on any backend), which
       waits for the earlier call's copy only: an event queued a whole call earlier, which
       the GPU has normally passed, so the GPU's queue does not drain;
    3. or when ``check_deferred()`` is called (it waits), e.g. at the end of an epoch.
  The error is the same ValueError as with validate=True, prefixed with the failing call's
  number (calls counted per process) and its input's shape and dtype. Each failing call
  raises once. On the CPU the counts are ready at once, so the backward of the same call
  always raises. When the error is raised at a later call, an optimizer step may already
  have used the failing call's gradient: skip that step's update, or validate=True.
- ``validate=False``: nothing is counted or read.

Under torch.compile and during CUDA graph capture nothing is read (a traced or captured call
cannot wait or raise); the fused-linear and vocabulary-parallel paths and the torch backend
read "deferred" like True. Every validating call first reads what earlier deferred calls left
(``read_pending``, in the input checks); with a process group the error it raises is agreed,
so every rank stops.
"""

from __future__ import annotations

import itertools
from typing import List, NamedTuple, Optional

import torch

from .epilogue import NUM_ERR, raise_bad_values

_CALLS = itertools.count(1)


class _Layout(NamedTuple):
    """What the error message needs of the failing call's batch (no tensor is kept)."""

    vocab: int
    num_seqs: int


class Deferred:
    """One call's value checks waiting to be read: counts (a host tensor, or the device one
    on the CPU), event (CUDA: the copy's), the call's number and the input it describes."""

    __slots__ = ("counts", "event", "call", "layout", "source")

    def __init__(self, counts, event, layout: _Layout, source):
        self.counts, self.event, self.layout = counts, event, layout
        self.call, self.source = next(_CALLS), source

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def raise_if_bad(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        try:
            raise_bad_values(self.counts, self.layout)
        except ValueError as err:
            name, shape, dtype = self.source
            raise ValueError(f"validate='deferred': the value checks of call {self.call} "
                             f"({name} {list(shape)} {str(dtype).replace('torch.', '')}) "
                             f"found bad input: {err}") from None


_PENDING: List[Deferred] = []


def _source(batch):
    for name in ("logits", "logprobs"):
        t = getattr(batch, name, None)
        if t is not None:
            return name, tuple(t.shape), t.dtype
    return "rewards", tuple(batch.rewards.shape), batch.rewards.dtype


def check_values_of(cfg, errs: torch.Tensor, batch) -> Optional[Deferred]:
    """Reads (validate=True) or defers (validate="deferred") the value-check counts ``errs``
    of a call on ``batch`` (their first NUM_ERR entries: a call plan passes its whole int
    workspace, which starts with them). Earlier deferred calls were read before this call's
    kernels ran (``read_pending``, by its input checks or its plan). Returns the call's
    ``Deferred`` (to read at its backward: ``check_at_backward``) or None."""
    validate = cfg.validate
    if not validate or torch.compiler.is_compiling():
        return None
    if validate is True:
        raise_bad_values(errs, batch)
        return None
    event = None
    if errs.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None
        counts = torch.empty(NUM_ERR, dtype=errs.dtype, pin_memory=True)
        counts.copy_(errs[:NUM_ERR], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        counts = errs
    entry = Deferred(counts, event, _Layout(batch.vocab, batch.num_seqs), _source(batch))
    _PENDING.append(entry)
    return entry


def read_pending() -> None:
    """At the start of every validating call, before its kernels run (in the input checks,
    ``inputs.prepare`` and its kin, and on a call plan's hit): raises for an earlier deferred
    call's bad input. Vocabulary-parallel and fused-linear calls with a process group run it
    inside their agreed checks, so that an error pending on one rank stops every rank."""
    if _PENDING and not torch.compiler.is_compiling():
        check_deferred()


def check_at_backward(entry: Optional[Deferred]) -> None:
    """At the backward of the call that made ``entry``: raises for its bad input if its
    counts are on the host already (never waits)."""
    if entry is not None and entry in _PENDING and entry.ready():
        _PENDING.remove(entry)
        entry.raise_if_bad()


def check_deferred() -> None:
    """Reads the value checks of every deferred call not read yet (waiting for them) and
    raises for the first one that found bad input (the others are dropped: one error at a
    time, as a call with validate=True raises for its first bad argument). The checks and
    when ``validate="deferred"`` reads them: docs/spec.md "Options" (validate) and "Bad input
    and edge cases". Calls inside torch.compile run no checks, so leave nothing here.

    Example::

        for step, batch in enumerate(loader):
            loss = opo_loss(..., validate="deferred")
            loss.backward()
            optimizer.step()
        opo_kernels.check_deferred()   # the last calls' checks
    """
    pending = list(_PENDING)
    _PENDING.clear()
    for entry in pending:
        entry.raise_if_bad()
