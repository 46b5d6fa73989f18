"""OPOTrainer's reading of the loss's deferred value checks at the ends of training and
evaluation and before a save.

OPOTrainer's loss calls validate with ``validate="deferred"`` (``opo_kernels/validation.py``):
a call's checks are read at its backward if its counts are on the host by then, else at the
next loss call. The last calls of a training run, and the calls of an evaluation (no
backward), have no next call: without a read at these points their bad input would go
unraised. ``check_deferred_agreed`` reads them (it waits for their counts: once per
training run, evaluation or save) and raises on every process when any process found bad
input, so that no process is left waiting in the next collective (a save under FSDP or
DeepSpeed gathers the weights).
"""

from __future__ import annotations

from ...validation import check_deferred
from ..agree import raise_together


def check_deferred_agreed(when: str) -> None:
    """Reads the deferred value checks of this process's loss calls (``check_deferred``) and,
    under torch.distributed, agrees with the other processes (one all-reduce of one int per
    process): raises ValueError on every process if any found bad input. The failing
    process's error is check_deferred's (the call's number, its input's shape and dtype, the
    bad argument), prefixed by ``when`` ("at the end of training", ...); the others name the
    failing processes. Collective: every process calls it at the same point."""
    error = None
    try:
        check_deferred()
    except ValueError as err:
        error = ValueError(f"OPOTrainer, {when}: {err}")
    raise_together(error, lambda failed: ValueError(
        f"OPOTrainer, {when}: the deferred value checks of the loss found bad input on "
        f"process(es) {failed} (their error names the loss call and the bad argument); "
        "stopping here too"))
