"""The chunk loops of the fused-linear OPO loss (``fused_linear_opo.py`` has the autograd
function and the API): per chunk of C token rows, the [C, V] logits in the input dtype, the
row kernels of ``row_kernels.py`` on them, and the chunk's share of the three gradients.

    forward_chunks    phase 1: row statistics of every row (or, vocabulary-parallel, the
                      slice partials, combined once)
    backward_chunks   phase 2: logits recomputed, gradient written over them, matmuls
    on_policy_chunks  the one phase of the on-policy mode (also vocabulary-parallel)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from .config import OPOLossConfig
from .epilogue import Mode, run_epilogue
from .inputs import Batch, compute_dtype
from .row_kernels import Rows, backward_rows, forward_rows, row_outputs
from .tp_combine import combine_partials, one_pass_chunk
from .utils import new_output

# Default chunk: the largest power of two of rows whose logits fit in _CHUNK_BYTES, at least
# _MIN_CHUNK rows (so each chunk's matmuls still amortize one read of the weight; only binds for
# V·itemsize > 2 MiB) and at most N. Not measured on a GPU here (no GPU in this session): a
# starting point, e.g. V = 151,936 in bf16 -> 512 rows (148 MiB of logits), V = 32,000 -> 4096.
_CHUNK_BYTES = 256 * 2**20
_MIN_CHUNK = 128


def default_chunk_size(num_rows: int, vocab: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Rows per chunk: largest power of two with rows·V·itemsize <= 256 MiB, clamped to
    [128, N] (N = number of token rows; at least 1).

    The hidden size H does not enter: a chunk's transient memory is its [C, V] logits buffer
    (the gradient is written into it in place); the [C, H] slices are views of the inputs and
    outputs, and the fp32 weight-gradient accumulator is [V, H] whatever C is.
    """
    del hidden_size  # see the docstring: H does not change the chunk's transient memory
    rows = max(_CHUNK_BYTES // max(vocab * dtype.itemsize, 1), 1)
    rows = max(triton.next_power_of_2(rows + 1) // 2, _MIN_CHUNK)  # power of two <= rows
    return max(min(rows, num_rows), 1)


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[C, V] logits of one chunk in the input dtype (a fresh buffer the backward overwrites)."""
    return torch.nn.functional.linear(hidden_c, weight, bias)


def _accumulate(grad_logits: torch.Tensor, hidden_c: torch.Tensor, weight: torch.Tensor,
                grad_hidden_c: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor],
                grad_bias: Optional[torch.Tensor]) -> None:
    """One chunk's contribution to the three gradients (accumulators in fp32 / fp64)."""
    if grad_hidden_c is not None:
        torch.mm(grad_logits, weight, out=grad_hidden_c)
    if grad_weight is not None:
        if grad_weight.dtype == grad_logits.dtype:
            grad_weight.addmm_(grad_logits.t(), hidden_c)
        else:  # 16-bit: the chunk's product (fp32 inside the matmul) is summed in fp32
            grad_weight.add_(grad_logits.t() @ hidden_c)
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0, dtype=grad_bias.dtype))


def _chunks(num_rows: int, chunk_size: int):
    for start in range(0, num_rows, chunk_size):
        yield start, min(start + chunk_size, num_rows)


def forward_chunks(hidden2d, weight, bias, batch: Batch, cfg: OPOLossConfig, params,
                   chunk_size: int, tp=None):
    """Phase 1: per-row (logprobs [N], stats [N, 2], entropy [N] or None) over all rows, chunk
    by chunk (stats: the row statistics of ``forward_rows``). tp = (group, vocab_start): the
    weight is this rank's vocabulary slice; the chunks write partials, combined once."""
    rows = Rows.of(batch)
    if tp is None:
        out = row_outputs(batch.num_rows, batch.compute_dtype, batch.device, cfg.with_entropy)
        for start, end in _chunks(hidden2d.shape[0], chunk_size):
            logits = _chunk_logits(hidden2d[start:end], weight, bias)
            forward_rows(logits, rows, params, cfg.with_entropy, row_start=start, out=out)
        return out
    group, vocab_start = tp
    partials = new_output((batch.num_rows, 4), batch.compute_dtype, batch.device)
    for start, end in _chunks(hidden2d.shape[0], chunk_size):
        logits = _chunk_logits(hidden2d[start:end], weight, bias)
        forward_rows(logits, rows, params, cfg.with_entropy, row_start=start,
                     partials=partials, vocab_start=vocab_start)
    return combine_partials(partials, params, cfg.with_entropy, group)


def _grad_buffers(hidden2d, weight, bias, needs: Tuple[bool, bool, bool]):
    acc = compute_dtype(hidden2d.dtype)
    grad_hidden = (new_output(hidden2d.shape, hidden2d.dtype, hidden2d.device)
                   if needs[0] else None)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
    grad_bias = (torch.zeros(bias.shape, dtype=acc, device=bias.device)
                 if needs[2] and bias is not None else None)
    return grad_hidden, grad_weight, grad_bias


def backward_chunks(hidden2d, weight, bias, rows: Rows, saved, grad_loss, params,
                    cfg: OPOLossConfig, chunk_size: int, needs: Tuple[bool, bool, bool],
                    vocab_start: int = 0):
    """Phase 2: (grad_hidden [N, H] in hidden's dtype, grad_weight [V, H], grad_bias [V]) in
    fp32 (fp64 for fp64 inputs), each None when not needed. saved = (logprobs, stats,
    entropy or None, coef, scal) of phase 1 and the epilogue; grad_loss: 0-dim (on device)."""
    logprobs, stats, entropy, coef, scal = saved
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden2d, weight, bias, needs)
    for start, end in _chunks(hidden2d.shape[0], chunk_size):
        hidden_c = hidden2d[start:end]
        logits = _chunk_logits(hidden_c, weight, bias)
        grad_logits = backward_rows(logits, rows, logprobs, stats, entropy, coef, scal,
                                    grad_loss, params, cfg.level, cfg.coordinates, inplace=True,
                                    row_start=start, vocab_start=vocab_start)
        _accumulate(grad_logits, hidden_c, weight,
                    None if grad_hidden is None else grad_hidden[start:end],
                    grad_weight, grad_bias)
    return grad_hidden, grad_weight, grad_bias


def on_policy_chunks(hidden2d, weight, bias, batch: Batch, cfg: OPOLossConfig, params, counter,
                     chunk_size: int, needs: Tuple[bool, bool, bool], tp=None):
    """One phase (ref_logprobs=None): forward statistics AND the gradients for a unit upstream
    gradient, in one pass over the chunks. Returns ((logprobs, stats, entropy), grads).

    tp = (group, vocab_start): the weight is this rank's vocabulary slice. A row's gradient
    needs the row's global normalization, so each chunk's slice partials are combined (one
    all-gather of the chunk's rows, O(C) values, and one kernel) before the backward kernel
    writes the chunk's gradient over its logits — still one matmul per chunk instead of the general
    path's two (the logits are not recomputed in backward)."""
    mode = Mode.of(cfg, batch.weights is not None)
    unit = run_epilogue(batch, mode, params, counter, logprobs=None)  # c_t without log-probs
    rows = Rows.of(batch)
    out = row_outputs(batch.num_rows, batch.compute_dtype, batch.device, cfg.with_entropy)
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden2d, weight, bias, needs)
    if tp is not None:
        group, vocab_start = tp
        partials = new_output((batch.num_rows, 4), batch.compute_dtype, batch.device)
        unit_grad = torch.ones((), dtype=batch.compute_dtype, device=batch.device)
    for start, end in _chunks(hidden2d.shape[0], chunk_size):
        hidden_c = hidden2d[start:end]
        logits = _chunk_logits(hidden_c, weight, bias)
        if tp is None:  # one kernel: statistics, then the row's gradient over its logits
            forward_rows(logits, rows, params, cfg.with_entropy, row_start=start, out=out,
                         grad=logits, coef=unit.coef, scal=unit.scal)
        else:
            one_pass_chunk(logits, logits, rows, params, cfg, partials, out, unit, unit_grad,
                           group, vocab_start, start)
        _accumulate(logits, hidden_c, weight,
                    None if grad_hidden is None else grad_hidden[start:end],
                    grad_weight, grad_bias)
    return out, (grad_hidden, grad_weight, grad_bias)


