"""The chunk loops of the fused-linear OPO loss (``fused_linear_opo.py`` has the autograd
function and the API): per chunk of C token rows (or, in the backward, per block of columns
over all rows), the logits in the input dtype, the row kernels (``row_launch.py``) on them,
and the chunk's share of the three gradients.

    forward_chunks    phase 1: row statistics of every row (or, vocabulary-parallel, the
                      slice partials, combined once)
    backward_chunks   phase 2: logits recomputed, gradient written over them, matmuls; over
                      blocks of the vocabulary when N < V, else over chunks of rows
    on_policy_chunks  the one phase of the on-policy mode (also vocabulary-parallel)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import OPOLossConfig
from .epilogue import Mode, run_epilogue
from .inputs import Batch, compute_dtype
from .row_launch import Rows, backward_rows, forward_rows, row_outputs
from .tp_combine import combine_partials, one_pass_chunk
from .utils import new_output, next_power_of_2

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
    (the gradient is written into it in place; the backward's blocks of columns hold as many
    logits); the [C, H] slices are views of the inputs and outputs, and the fp32 accumulator
    ([N, H] or [V, H], see ``backward_chunks``) does not depend on C.
    """
    del hidden_size  # see the docstring: H does not change the chunk's transient memory
    rows = max(_CHUNK_BYTES // max(vocab * dtype.itemsize, 1), 1)
    rows = max(next_power_of_2(rows + 1) // 2, _MIN_CHUNK)  # power of two <= rows
    return max(min(rows, num_rows), 1)


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[C, V] logits of one chunk in the input dtype (a fresh buffer the backward overwrites)."""
    return torch.nn.functional.linear(hidden_c, weight, bias)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in fp32 / fp64 (the accumulator of a sum split over chunks)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:  # 16-bit: the product (fp32 inside the matmul, rounded on store) is summed in fp32
        acc.add_(a @ b)


def _accumulate(grad_logits: torch.Tensor, hidden_c: torch.Tensor, weight: torch.Tensor,
                grad_hidden_c: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor],
                grad_bias: Optional[torch.Tensor]) -> None:
    """One chunk's contribution to the three gradients (accumulators in fp32 / fp64)."""
    if grad_hidden_c is not None:
        torch.mm(grad_logits, weight, out=grad_hidden_c)
    if grad_weight is not None:
        _add_product(grad_weight, grad_logits.t(), hidden_c)
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


def vocab_block_size(num_rows: int, vocab: int, chunk_size: int) -> int:
    """Columns per block of the vocabulary-blocked backward: as many logits per block as a
    chunk of ``chunk_size`` rows holds (num_rows · block <= chunk_size · V), rounded down to a
    multiple of 256 from 4096 columns (whole matmul tiles, at most 6 % fewer columns) or of 16
    from 16 (16-byte rows for 16-bit logits); at least 1; V when one block holds them all."""
    block = max(chunk_size * vocab // max(num_rows, 1), 1)
    if block >= vocab:  # one block: no rounding
        return vocab
    align = 256 if block >= 4096 else 16 if block >= 16 else 1
    return block - block % align


def blocks_over_vocab(num_rows: int, vocab: int) -> bool:
    """Which dimension the backward cuts (see ``backward_chunks``): the vocabulary when there
    are fewer token rows than vocabulary entries (then the split reduction's accumulator, the
    [N, H] hidden gradient, is the smaller one), else the rows ([V, H] weight gradient)."""
    return num_rows < vocab


def backward_chunks(hidden2d, weight, bias, rows: Rows, saved, grad_loss, params,
                    cfg: OPOLossConfig, chunk_size: int, needs: Tuple[bool, bool, bool],
                    vocab_start: int = 0):
    """Phase 2: (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]), each None when not
    needed; grad_weight and grad_bias in fp32 (fp64 for fp64 inputs) or already in the
    weight's dtype, grad_hidden in hidden's dtype or fp32 — the caller casts. saved =
    (logprobs, stats, entropy or None, coef, scal) of phase 1 and the epilogue; grad_loss:
    0-dim (on device).

    Each gradient sums over one dimension of the logits: ∂hidden over V, ∂W over the rows. A
    loop over blocks of one dimension splits the other's sum, which then needs an fp32
    accumulator that every block reads and writes. So the loop cuts the smaller of N and V
    (``blocks_over_vocab``): blocks of columns when N < V (the usual case: 4k–64k tokens per
    call, 32k–152k vocabulary), with an [N, H] accumulator instead of a [V, H] one."""
    if blocks_over_vocab(hidden2d.shape[0], weight.shape[0]):
        return _vocab_blocks(hidden2d, weight, bias, rows, saved, grad_loss, params, cfg,
                             chunk_size, needs, vocab_start)
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


def _vocab_blocks(hidden2d, weight, bias, rows: Rows, saved, grad_loss, params,
                  cfg: OPOLossConfig, chunk_size: int, needs: Tuple[bool, bool, bool],
                  vocab_start: int):
    """``backward_chunks`` over blocks of columns [v0, v1) of the vocabulary, all N rows each:
    a row's gradient needs only its saved statistics, so a block of columns is computed alone
    (the vocabulary-parallel backward kernel, vocab_start = the block's first id). Per block:
        logits_b          = hidden @ weight[v0:v1].T + bias[v0:v1]   [N, Vb], input dtype
        grad_weight[v0:v1] = grad_b.T @ hidden      one matmul over all N rows: written once,
                                                    in the weight's dtype (fp32 inside it)
        grad_hidden      += grad_b @ weight[v0:v1]  [N, H] accumulator (fp32 for 16-bit)
        grad_bias[v0:v1]  = grad_b.sum(0)
    Memory beyond the outputs: the [N, Vb] block, the [N, H] accumulator and, for 16-bit
    inputs, one [N, H] product per block (one block: ∂hidden is written directly, no
    accumulator). No [V, H] accumulator, which the row loop reads and writes once per chunk
    (at N = 16,384, H = 4096, V = 128,256 bf16: 16 chunks × 6.3 GB)."""
    logprobs, stats, entropy, coef, scal = saved
    num_rows, vocab = hidden2d.shape[0], weight.shape[0]
    block = vocab_block_size(num_rows, vocab, chunk_size)
    acc = compute_dtype(hidden2d.dtype)
    one_block = block == vocab  # then ∂hidden is one matmul too, written in hidden's dtype
    grad_hidden = None
    if needs[0]:
        grad_hidden = (new_output(hidden2d.shape, hidden2d.dtype, hidden2d.device) if one_block
                       else torch.zeros(hidden2d.shape, dtype=acc, device=hidden2d.device))
    grad_weight = new_output(weight.shape, weight.dtype, weight.device) if needs[1] else None
    grad_bias = (new_output(bias.shape, acc, bias.device)
                 if needs[2] and bias is not None else None)
    for v0, v1 in _chunks(vocab, block):
        weight_b = weight[v0:v1]
        logits = _chunk_logits(hidden2d, weight_b, None if bias is None else bias[v0:v1])
        grad_b = backward_rows(logits, rows, logprobs, stats, entropy, coef, scal, grad_loss,
                               params, cfg.level, cfg.coordinates, inplace=True,
                               vocab_start=vocab_start + v0)
        if grad_weight is not None:
            torch.mm(grad_b.t(), hidden2d, out=grad_weight[v0:v1])
        if grad_hidden is not None:
            if one_block:
                torch.mm(grad_b, weight_b, out=grad_hidden)
            else:
                _add_product(grad_hidden, grad_b, weight_b)
        if grad_bias is not None:
            torch.sum(grad_b, 0, dtype=acc, out=grad_bias[v0:v1])
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


