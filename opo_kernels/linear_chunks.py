"""The chunk loops of the fused-linear OPO loss (``fused_linear_opo.py`` has the autograd
function and the API): over the M counted rows of hidden (``linear_rows.py``), per chunk of C
rows (or, in the backward, per block of columns over the rows), the logits in the input dtype,
the row kernels (``row_launch.py``) on them, and the chunk's share of the three gradients.
How the rows are cut (chunk rows, rows whose logits are kept): ``linear_plan.py``.

    forward_chunks    phase 1: row statistics of every row (or, vocabulary-parallel, the
                      slice partials, combined once); the first K rows' logits kept
    backward_chunks   phase 2: the kept logits' gradient written over them, the other rows'
                      logits recomputed; over blocks of the vocabulary when the recomputed
                      rows are fewer than V, else over chunks of rows
    on_policy_chunks  the one phase of the on-policy mode (also vocabulary-parallel)

Matmuls, counted in units of one [M, H] x [H, V] product (2·M·H·V flops): the forward 1 (the
logits), the backward 2 (∂hidden, ∂W) + 1 for the recomputed logits of the rows not kept:
4 − K/M in all; the one phase 3.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .config import OPOLossConfig
from .epilogue import Mode, run_epilogue
from .inputs import Batch, compute_dtype
from .row_launch import Rows, backward_rows, forward_rows, row_outputs
from .tp_combine import combine_partials, one_pass_chunk
from .utils import new_output

# A 16-bit matmul with an fp32 output (``torch.mm/addmm(..., out_dtype=torch.float32)``):
# CUDA only, torch >= 2.8, where these overloads exist.
_MM_OUT_DTYPE = all("dtype_out" in op.overloads()
                    for op in (torch.ops.aten.mm, torch.ops.aten.addmm))
# Whether addmm's out_dtype overload takes an fp32 ``self`` with 16-bit factors, by device
# type (``_addmm_sums_in_place``): some versions of its CUDA source require ``self`` in the
# factors' dtype ("self and mat2 must have the same dtype"; none of PyPI's 2.8-2.11 wheels
# carries that message), others allow out_dtype (2.10 and 2.11 say so).
_ADDMM_SUMS: Dict[str, bool] = {}


def _addmm_sums_in_place(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` works on
    ``device`` for fp32 acc and 16-bit a, b: tried once per device type on 1 x 1 tensors (two
    tiny launches, no sync) and remembered."""
    known = _ADDMM_SUMS.get(device.type)
    if known is None:
        one = torch.ones((1, 1), dtype=torch.bfloat16, device=device)
        acc = torch.zeros((1, 1), dtype=torch.float32, device=device)
        try:
            torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
            known = True
        except RuntimeError:  # (NotImplementedError too: a device without the kernel)
            known = False
        _ADDMM_SUMS[device.type] = known
    return known


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[C, V] logits of one chunk in the input dtype (a fresh buffer the backward overwrites)."""
    return torch.nn.functional.linear(hidden_c, weight, bias)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc = a @ b (first) or acc += a @ b: one part of a sum split over chunks. acc in a's
    dtype (a matmul into it, accumulating in place) or, for 16-bit a and b, fp32. On CUDA the
    16-bit product goes into the fp32 acc inside the matmul (``out_dtype``, torch >= 2.8): no
    rounding of each part to 16 bits, and per element of acc 8 bytes moved (read, write)
    instead of 12 (the 16-bit product written and read back, acc read and written); where
    this torch's addmm refuses an fp32 acc (``_addmm_sums_in_place``), the part is an fp32
    product added to acc (unrounded still; one acc-sized temporary, 16 bytes moved). Elsewhere
    the product is rounded to 16 bits, then written or added in fp32. The first part writes
    instead of adding to zeros: one write of acc, not a zero fill, a read and a write."""
    if acc.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif acc.is_cuda and _MM_OUT_DTYPE:
        if first:
            torch.mm(a, b, out_dtype=acc.dtype, out=acc)
        elif _addmm_sums_in_place(acc.device):
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        else:
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    elif first:
        acc.copy_(a @ b)
    else:
        acc.add_(a @ b)


def _add_sum(acc: torch.Tensor, grad_logits: torch.Tensor, first: bool) -> None:
    """acc = (first) or += Σ over the rows of grad_logits, in acc's dtype (∂bias)."""
    if first:
        torch.sum(grad_logits, 0, dtype=acc.dtype, out=acc)
    else:
        acc.add_(grad_logits.sum(0, dtype=acc.dtype))


def _accumulate(grad_logits: torch.Tensor, hidden_c: torch.Tensor, weight: torch.Tensor,
                grad_hidden_c: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor],
                grad_bias: Optional[torch.Tensor], first: bool) -> None:
    """One chunk of rows' gradients: its rows of ∂hidden (written), its part of ∂W and ∂b
    (``_add_product``, ``_add_sum``)."""
    if grad_hidden_c is not None:
        torch.mm(grad_logits, weight, out=grad_hidden_c)
    if grad_weight is not None:
        _add_product(grad_weight, grad_logits.t(), hidden_c, first)
    if grad_bias is not None:
        _add_sum(grad_bias, grad_logits, first)


def _chunks(num_rows: int, chunk_size: int, first_row: int = 0):
    for start in range(first_row, num_rows, chunk_size):
        yield start, min(start + chunk_size, num_rows)


def kept_logits(hidden_c, weight, bias, held_rows: int) -> torch.Tensor:
    """[K, V]: the logits of rows [0, K) that the general mode keeps, in one matmul (the
    forward's; and a retained graph's second backward, whose first wrote over them: the same
    values bit for bit)."""
    return _chunk_logits(hidden_c[:held_rows], weight, bias)


def forward_chunks(hidden_c, weight, bias, batch: Batch, cfg: OPOLossConfig, params,
                   chunk_size: int, held_rows: int = 0, tp=None):
    """Phase 1 over the M counted rows hidden_c [M, H] (``batch``: their packed batch).
    Returns ((logprobs [M], stats [M, 2], entropy [M] or None), held): stats are the row
    statistics of ``forward_rows``; held = the logits [K, V] of rows [0, K), K = held_rows,
    computed in one matmul and kept for the backward (None when K = 0); the other rows in
    chunks of ``chunk_size``, each chunk's logits dropped after its kernel. tp = (group,
    vocab_start): the weight is this rank's vocabulary slice; the chunks write partials,
    combined once."""
    rows = Rows.of(batch)
    num_rows = hidden_c.shape[0]
    if tp is None:
        out = row_outputs(num_rows, batch.compute_dtype, batch.device, cfg.with_entropy)
        target = dict(out=out)
    else:
        partials = new_output((num_rows, 4), batch.compute_dtype, batch.device)
        target = dict(partials=partials, vocab_start=tp[1])
    held = None
    if held_rows:
        held = kept_logits(hidden_c, weight, bias, held_rows)
        forward_rows(held, rows, params, cfg.with_entropy, row_start=0, **target)
    for start, end in _chunks(num_rows, chunk_size, held_rows):
        logits = _chunk_logits(hidden_c[start:end], weight, bias)
        forward_rows(logits, rows, params, cfg.with_entropy, row_start=start, **target)
        del logits  # freed before the next chunk's is allocated: one chunk at a time
    if tp is not None:
        out = combine_partials(partials, params, cfg.with_entropy, tp[0])
    return out, held


def _grad_buffers(hidden_c, weight, bias, needs: Tuple[bool, bool, bool],
                  weight_sums: bool = True):
    """(∂hidden [M, H] in hidden's dtype, ∂W [V, H] and ∂b [V] accumulators in fp32 / fp64 —
    ∂W in the weight's dtype when not ``weight_sums``, written once), None where not needed;
    unwritten (the first chunk writes, ``_add_product``)."""
    acc = compute_dtype(hidden_c.dtype)
    grad_hidden = (new_output(hidden_c.shape, hidden_c.dtype, hidden_c.device)
                   if needs[0] else None)
    grad_weight = (new_output(weight.shape, acc if weight_sums else weight.dtype,
                              weight.device) if needs[1] else None)
    grad_bias = (new_output(bias.shape, acc, bias.device)
                 if needs[2] and bias is not None else None)
    return grad_hidden, grad_weight, grad_bias


def _zero_if_unwritten(written: bool, *grads) -> None:
    """No counted row: no chunk wrote the sums, which are then zero."""
    if not written:
        for g in grads:
            if g is not None:
                g.zero_()


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


def backward_chunks(hidden_c, weight, bias, rows: Rows, saved, grad_loss, params,
                    cfg: OPOLossConfig, chunk_size: int, needs: Tuple[bool, bool, bool],
                    vocab_start: int = 0, held: Optional[torch.Tensor] = None):
    """Phase 2 over the M counted rows hidden_c [M, H]: (grad_hidden [M, H] in hidden's dtype,
    grad_weight [V, H] in the weight's dtype or fp32, grad_bias [V] in fp32), each None when
    not needed (fp64 for fp64 inputs; the caller casts). saved = (logprobs, stats, entropy or
    None, coef, scal) of phase 1 and the epilogue; grad_loss: 0-dim (on device); held: the
    logits [K, V] of rows [0, K) kept by phase 1, or None. vocab_start: the slice's first id
    (vocabulary-parallel).

    The kept logits' gradient is written over them (one kernel) and multiplied: ∂hidden of
    rows [0, K) and the first part of ∂W, ∂b. The other M − K rows' logits are recomputed,
    after the kept ones are freed, in blocks of max(chunk_size, K) rows' worth of logits.
    Each gradient sums over one dimension of the logits: ∂hidden over V, ∂W over the rows. A
    loop over blocks of one dimension splits the other's sum, which then needs an fp32
    accumulator that every block reads and writes. So the loop cuts the smaller of M − K and
    V (``blocks_over_vocab``): blocks of columns when M − K < V (the usual case: 4k–64k tokens
    per call, 32k–152k vocabulary), with an [M − K, H] accumulator and ∂W in the weight's
    dtype (the kept rows' product written first, each block's added in place: one more
    rounding for 16-bit weights when K > 0); chunks of rows otherwise, with the [V, H] one
    (none when ∂W is one product: all rows kept, or one chunk)."""
    logprobs, stats, entropy, coef, scal = saved
    num_rows, vocab = hidden_c.shape[0], weight.shape[0]
    kept = 0 if held is None else held.shape[0]
    # the kept logits are freed before the others are recomputed: their blocks may hold as
    # many (fewer, larger blocks: fewer passes over the fp32 accumulator, larger matmuls)
    chunk_size = max(chunk_size, kept)
    by_vocab = num_rows > kept and blocks_over_vocab(num_rows - kept, vocab)
    row_parts = int(kept > 0) + (0 if by_vocab else len(range(kept, num_rows, chunk_size)))
    # ∂W written once (per block), in the weight's dtype, unless the row loop sums parts
    grad_hidden, grad_weight, grad_bias = _grad_buffers(
        hidden_c, weight, bias, needs, weight_sums=not by_vocab and row_parts > 1)

    def gradient(logits, row_start, v0=0):  # written over the logits
        return backward_rows(logits, rows, logprobs, stats, entropy, coef, scal, grad_loss,
                             params, cfg.level, cfg.coordinates, inplace=True,
                             row_start=row_start, vocab_start=vocab_start + v0)

    if kept:
        _accumulate(gradient(held, 0), hidden_c[:kept], weight,
                    None if grad_hidden is None else grad_hidden[:kept], grad_weight,
                    grad_bias, first=True)
        del held  # (the caller dropped its reference: the buffer goes now)
    if by_vocab:
        _vocab_blocks(hidden_c[kept:], weight, bias, gradient, kept, chunk_size,
                      None if grad_hidden is None else grad_hidden[kept:], grad_weight,
                      grad_bias, first=not kept)
    else:
        for start, end in _chunks(num_rows, chunk_size, kept):
            hidden_r = hidden_c[start:end]
            logits = _chunk_logits(hidden_r, weight, bias)
            _accumulate(gradient(logits, start), hidden_r, weight,
                        None if grad_hidden is None else grad_hidden[start:end], grad_weight,
                        grad_bias, first=start == 0)
            del logits  # (one chunk at a time)
    _zero_if_unwritten(num_rows > 0, grad_weight, grad_bias)
    return grad_hidden, grad_weight, grad_bias


def _vocab_blocks(hidden_r, weight, bias, gradient, row_start: int, chunk_size: int,
                  grad_hidden_r, grad_weight, grad_bias, first: bool) -> None:
    """``backward_chunks`` over blocks of columns [v0, v1) of the vocabulary, for the rows
    hidden_r [R, H] (counted rows [row_start, row_start + R)): a row's gradient needs only
    its saved statistics, so a block of columns is computed alone (the vocabulary-parallel
    backward kernel, vocab_start = the block's first id). Per block:
        logits_b           = hidden_r @ weight[v0:v1].T + bias[v0:v1]   [R, Vb], input dtype
        grad_weight[v0:v1] (+)= grad_b.T @ hidden_r   one matmul over the R rows, in the
                                                      weight's dtype (fp32 inside it)
        grad_hidden_r     += grad_b @ weight[v0:v1]   [R, H] accumulator (fp32 for 16-bit)
        grad_bias[v0:v1]  (+)= grad_b.sum(0)
    (+)=: written when ``first`` (no kept rows wrote their part before), else added.
    Memory beyond the outputs: the [R, Vb] block, the [R, H] accumulator for 16-bit inputs
    and, off CUDA, one [R, H] product per block (one block: ∂hidden is written directly). No [V, H]
    accumulator, which the row loop reads and writes once per chunk (at 16,384 rows, H = 4096,
    V = 128,256 bf16: 16 chunks × 6.3 GB)."""
    num_rows, vocab = hidden_r.shape[0], weight.shape[0]
    block = vocab_block_size(num_rows, vocab, chunk_size)
    acc_hidden = grad_hidden_r
    if grad_hidden_r is not None and block < vocab:
        acc = compute_dtype(hidden_r.dtype)
        if acc != grad_hidden_r.dtype:
            acc_hidden = new_output(hidden_r.shape, acc, hidden_r.device)
    for v0, v1 in _chunks(vocab, block):
        weight_b = weight[v0:v1]
        logits = _chunk_logits(hidden_r, weight_b, None if bias is None else bias[v0:v1])
        grad_b = gradient(logits, row_start, v0)
        if grad_weight is not None:
            _add_product(grad_weight[v0:v1], grad_b.t(), hidden_r, first)
        if acc_hidden is not None:
            _add_product(acc_hidden, grad_b, weight_b, v0 == 0)
        if grad_bias is not None:
            _add_sum(grad_bias[v0:v1], grad_b, first)
        del logits, grad_b  # (one block at a time)
    if acc_hidden is not grad_hidden_r:
        grad_hidden_r.copy_(acc_hidden)


def on_policy_chunks(hidden_c, weight, bias, batch: Batch, cfg: OPOLossConfig, params, counter,
                     chunk_size: int, needs: Tuple[bool, bool, bool], tp=None):
    """One phase (ref_logprobs=None) over the M counted rows hidden_c [M, H]: forward
    statistics AND the gradients for a unit upstream gradient, in one pass over chunks of
    ``chunk_size`` rows. Returns ((logprobs, stats, entropy), (grad_hidden [M, H] in hidden's
    dtype, grad_weight [V, H] in fp32 — in the weight's dtype when one chunk holds all the
    rows: one product, written once — and grad_bias [V] in fp32), each None when not needed).

    The coefficients c_t need no logits (Δ ≡ 0): the counts-only epilogue runs first, then
    per chunk ONE kernel writes the statistics and the gradient over the chunk's logits, and
    three matmuls in all: the logits, ∂hidden of the chunk's rows (written once) and its part
    of ∂W (with more than one chunk, the [V, H] fp32 accumulator: written by the first chunk,
    then read and written once per chunk, 8·V·H bytes; 12 for 16-bit inputs off CUDA,
    ``_add_product``: fewer, larger chunks, ``linear_plan.plan_chunks``, keep that traffic
    down).

    tp = (group, vocab_start): the weight is this rank's vocabulary slice. A row's gradient
    needs the row's global normalization, so each chunk's slice partials are combined (one
    all-gather of the chunk's rows, O(C) values, and one kernel) before the backward kernel
    writes the chunk's gradient over its logits."""
    mode = Mode.of(cfg, batch.weights is not None)
    unit = run_epilogue(batch, mode, params, counter, logprobs=None)  # c_t without log-probs
    rows = Rows.of(batch)
    num_rows = hidden_c.shape[0]
    out = row_outputs(num_rows, batch.compute_dtype, batch.device, cfg.with_entropy)
    # ∂W summed over chunks in fp32; one chunk writes it once, in the weight's dtype
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden_c, weight, bias, needs,
                                                        weight_sums=num_rows > chunk_size)
    if tp is not None:
        group, vocab_start = tp
        partials = new_output((num_rows, 4), batch.compute_dtype, batch.device)
        unit_grad = torch.ones((), dtype=batch.compute_dtype, device=batch.device)
    for start, end in _chunks(num_rows, chunk_size):
        hidden_r = hidden_c[start:end]
        logits = _chunk_logits(hidden_r, weight, bias)
        if tp is None:  # one kernel: statistics, then the row's gradient over its logits
            forward_rows(logits, rows, params, cfg.with_entropy, row_start=start, out=out,
                         grad=logits, coef=unit.coef, scal=unit.scal)
        else:
            one_pass_chunk(logits, logits, rows, params, cfg, partials, out, unit, unit_grad,
                           group, vocab_start, start)
        _accumulate(logits, hidden_r, weight,
                    None if grad_hidden is None else grad_hidden[start:end],
                    grad_weight, grad_bias, first=start == 0)
        del logits  # (one chunk at a time)
    _zero_if_unwritten(num_rows > 0, grad_weight, grad_bias)
    return out, (grad_hidden, grad_weight, grad_bias)
