"""How a fused-linear call cuts its work (``fused_linear_opo.py``): rows per chunk, the rows
whose logits are kept from forward to backward (``logits_budget``), rows per chunk of the
on-policy one-phase loop. Host-side integers only: no device op, no sync.

Rows here are the M counted rows (``linear_rows.py``); V is the vocabulary of the weight this
process holds (vocabulary-parallel: the widest rank's slice, the same on every rank, whose
on-policy chunks each run a collective).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .utils import cdiv, host_int, next_power_of_2

# Default chunk: the largest power of two of rows whose logits fit in _CHUNK_BYTES, at least
# _MIN_CHUNK rows (so each chunk's matmuls still amortize one read of the weight; only binds for
# V·itemsize > 2 MiB) and at most N. Not measured on a GPU: a starting point, e.g.
# V = 151,936 in bf16 -> 512 rows (148 MiB of logits), V = 32,000 -> 4096.
_CHUNK_BYTES = 256 * 2**20
_MIN_CHUNK = 128

# Default logits_budget: 1 GiB, reasoned from memory and byte counts, NOT measured (to be
# confirmed or replaced by the GPU benchmark's ``opo_kernels_fused_linear_budget`` rows).
# - Memory: about the size of the weight gradient the call returns anyway at V = 128,256,
#   H = 4096 in bf16 (1.05 GB), and ~1/3 of what the materialized path holds for the logits
#   alone at the 11,469 counted rows of a 16 × 1024 batch (2.9 GB, + their gradient); a fixed
#   amount, not a fraction of the batch, so that a longer batch does not raise the peak.
# - On-policy, the budget sets the chunk (below): each chunk reads and writes the fp32 [V, H]
#   weight-gradient accumulator once, 8·V·H bytes (12 for 16-bit inputs off CUDA, whose
#   product is added separately; linear_chunks._add_product): 4.2 GB (6.3) at V = 128,256,
#   H = 4096, whatever the chunk's rows C.
#   Against the chunk's 3 matmuls (6·C·H·V flops) that is 1.3/C byte per flop (2/C): at the
#   ~4190 rows that 1 GiB holds at that V in bf16, 3.2e-4 B/flop. An H100 / H200 does 295 /
#   206 dense bf16 flops per byte of memory bandwidth (data-sheet peaks), so the accumulator
#   costs ~7-9 % of the matmuls' time at peak rates if nothing overlaps it; the 256 MiB
#   chunk (1024 rows) would cost 4x as much.
# - General mode: the logits of the first ~4190 counted rows are not recomputed in backward
#   (a third of the 4th matmul at the batch above).
DEFAULT_LOGITS_BUDGET = 2**30


def default_chunk_size(num_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: largest power of two with rows·V·itemsize <= 256 MiB, clamped to
    [128, N] (N = number of token rows; at least 1).

    The hidden size H does not enter: a chunk's transient memory is its [C, V] logits buffer
    (the gradient is written into it in place; the backward's blocks of columns hold as many
    logits); the [C, H] slices are views of the inputs and outputs, and the fp32 accumulator
    ([N, H] or [V, H], see ``linear_chunks.backward_chunks``) does not depend on C.
    """
    rows = max(_CHUNK_BYTES // max(vocab * dtype.itemsize, 1), 1)
    rows = max(next_power_of_2(rows + 1) // 2, _MIN_CHUNK)  # power of two <= rows
    return max(min(rows, num_rows), 1)


def check_logits_budget(logits_budget) -> Optional[int]:
    """logits_budget: None (the default) or an int >= 0 of bytes (a NumPy integer too);
    returned as an int or None."""
    if logits_budget is None:
        return None
    budget = host_int(logits_budget, 0)
    if budget is None:
        raise ValueError(f"logits_budget must be an int >= 0 (bytes of logits kept from "
                         f"forward to backward) or None for the default, got {logits_budget!r}")
    return budget


class LinearPlan(NamedTuple):
    """chunk_rows: rows per chunk of the loop over rows (the forward's; the backward's when it
    cuts rows; the one-phase loop's); held_rows: K, the counted rows [0, K) whose logits the
    general mode keeps from forward to backward (0: all recomputed); one_phase: the on-policy
    one-phase loop (``linear_chunks.on_policy_chunks``) runs."""

    chunk_rows: int
    held_rows: int
    one_phase: bool


def plan_chunks(num_rows: int, vocab: int, dtype: torch.dtype, chunk_size, logits_budget,
                one_phase: bool, wants_grad: bool) -> LinearPlan:
    """The plan of a call over ``num_rows`` = M counted rows of [V = vocab] logits of
    ``dtype`` (chunk_size, logits_budget: the caller's, None = the defaults).

    General mode: chunks of ``chunk_size`` rows, and when gradients are wanted, the first
    K = min(M, ⌊budget / (V·itemsize)⌋) rows' logits kept (K·V·itemsize <= budget).
    One phase: the budget enlarges the chunks (nothing is kept past the forward, and each
    chunk costs one read and write of the [V, H] accumulator): chunks of
    max(chunk_size, ⌊budget / (V·itemsize)⌋) rows at most, balanced (⌈M / that⌉ chunks of
    equal size but the last), so that the logits buffer holds <= max(chunk, budget) bytes."""
    row_bytes = max(vocab * dtype.itemsize, 1)
    budget = DEFAULT_LOGITS_BUDGET if logits_budget is None else logits_budget
    budget_rows = min(budget // row_bytes, num_rows)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(num_rows, vocab, dtype)
    if one_phase:
        rows = max(min(max(chunk, budget_rows), num_rows), 1)
        rows = cdiv(num_rows, cdiv(num_rows, rows)) if num_rows else 1  # balanced chunks
        return LinearPlan(rows, 0, True)
    return LinearPlan(max(chunk, 1), budget_rows if wants_grad else 0, False)
