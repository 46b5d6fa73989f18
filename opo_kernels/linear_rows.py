"""The counted rows of a fused-linear call (``fused_linear_opo.py``): only the token rows that
count are multiplied by the LM head.

A padded call's rows with mask == 0 and a packed call's rows with seq_ids == −1 take no part
in the loss (docs/spec.md, "Inputs"), so their logits are never needed. ``counted_rows`` finds
the M counted rows once per call (``torch.nonzero``: ONE device-to-host sync, for the count M
that sizes every later buffer and launch; none when a padded call has no mask) and describes
them as a packed batch of M rows: every later step — the chunked matmuls, the row kernels, the
epilogue — runs on those rows only, so the time is proportional to the counted tokens and an
uncounted row of ``hidden`` is never read (a NaN there cannot reach the loss or the weight's
gradient through 0·NaN in a matmul). ``hidden``'s gradient is written back to the counted
positions, zeros elsewhere.

The packed batch keeps every per-sequence input (rewards, groups, weights) as passed, and the
per-token ones (labels, ref_logprobs, the sequence of each row) of the counted rows, in the
caller's row order: the loss and gradients are those of the caller's layout. The one check
that the packed batch cannot make itself — a padded mask value other than 0/1 — is counted
here (``mask_errors``) and reported with the epilogue's own checks.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from .inputs import Batch


@dataclasses.dataclass
class CountedRows:
    """The counted rows of one call.

    where:       the index tensors that select them from hidden ([B, T, H] padded: (b, t),
                 each [M]; [N, H] packed: (row,)), in row-major order; None when every row
                 counts (then ``batch`` is the caller's own batch and nothing is copied);
    batch:       the ``inputs.Batch`` of the M rows (packed: seq_ids = each row's sequence;
                 num_rows = M);
    mask_errors: 0-dim count of padded mask values other than 0/1 (with validate=True, when
                 rows were dropped), else None.
    """

    where: Optional[Tuple[torch.Tensor, ...]]
    batch: Batch
    mask_errors: Optional[torch.Tensor] = None

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, H]: the counted rows of hidden [B, T, H] or [N, H] (a new tensor; a view of
        hidden, or a copy for a layout that cannot be viewed as [N, H], when every row
        counts). Autograd flows through it (the torch backend uses that)."""
        if self.where is None:
            return hidden.reshape(-1, hidden.shape[-1])
        return hidden[self.where]

    def scatter(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A tensor of ``shape`` (hidden's) holding grad [M, H] at the counted rows and zeros
        elsewhere (grad itself, viewed, when every row counts)."""
        if self.where is None:
            return grad.view(shape)
        out = grad.new_zeros(shape)
        out[self.where] = grad
        return out


def counted_rows(batch: Batch, validate: bool) -> CountedRows:
    """The counted rows of ``batch`` (an ``inputs.Batch`` of the caller's layout, checked).

    Counted: mask != 0 (padded) or seq_ids != −1 (packed; a value below −1 is kept, so that
    the epilogue reports it as out of range). ONE host sync (``torch.nonzero``) unless a
    padded call has no mask."""
    if batch.mask is None and batch.seq_ids is None:  # padded, every row counts: no sync
        return CountedRows(None, batch)
    if batch.seq_ids is None:
        where = torch.nonzero(batch.mask, as_tuple=True)  # (b, t); the host sync
        seq = where[0]
    else:
        where = torch.nonzero(batch.seq_ids != -1, as_tuple=True)  # (row,); the host sync
        seq = batch.seq_ids[where]
    num_rows = where[0].shape[0]
    if num_rows == batch.num_rows:  # nothing to drop: the caller's batch (its own checks)
        return CountedRows(None, batch)
    mask_errors = None
    if validate and batch.mask is not None:
        mask_errors = ((batch.mask != 0) & (batch.mask != 1)).sum()
    compact = dataclasses.replace(
        batch, logits=None, labels=batch.labels[where], mask=None, seq_ids=seq,
        ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[where],
        seq_len=None, num_rows=num_rows)
    return CountedRows(where, compact, mask_errors)


def explain_nonfinite(hidden_rows: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], bad_rows: int, group=None) -> str:
    """The message for ``bad_rows`` counted rows whose logits hidden @ weight.T + bias were
    found non-finite: which argument holds a NaN/inf (hidden's counted rows [M, H], weight's
    rows, bias), or, when all are finite, that the logits overflow. Error path only (one more
    host sync). group: the vocabulary-parallel process group (weight and bias are this rank's
    slice: the ranks' counts are summed, one all-reduce; every rank is on this path, since
    every rank sees the same row statistics)."""
    counts = torch.stack([
        (~torch.isfinite(hidden_rows)).any(-1).sum(),
        (~torch.isfinite(weight)).any(-1).sum(),
        (~torch.isfinite(bias)).sum() if bias is not None
        else torch.zeros((), dtype=torch.int64, device=weight.device)])
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts[1:], group=group)  # the slices' counts (hidden: replicated)
    n_hidden, n_weight, n_bias = counts.tolist()
    parts = []
    if n_hidden:
        parts.append(f"hidden: {n_hidden} counted row(s) with a non-finite value (NaN/inf)")
    if n_weight:
        parts.append(f"weight: {n_weight} row(s) (vocabulary entries) with a non-finite value")
    if n_bias:
        parts.append(f"bias: {n_bias} non-finite value(s)")
    if parts:
        return ("; ".join(parts) + f" (the logits hidden @ weight.T of {bad_rows} counted "
                "row(s) are not finite)")
    return (f"hidden: the logits hidden @ weight.T (+ bias) of {bad_rows} counted row(s) are "
            f"not finite although hidden, weight and bias are: they overflow "
            f"{hidden_rows.dtype} (scale the hidden states or the weight)")
