"""The row statistics of the whole vocabulary from every rank's slice partials, in one kernel.

Vocabulary-parallel logits (``tensor_parallel.py``): each rank's forward row kernel writes, per
token row, the partials of its slice [vocab_start, vocab_start + V_local):

    (x_max, x_label or −inf when another rank holds the label,
     others = Σ_{j ≠ label} e^{(x_j − x_max)/t},  w = Σ_j e^{(x_j − x_max)/t}·(x_j − x_max)/t)

``combine_partials`` all-gathers them (ONE collective of [R, 4] per rank, O(R) values) and runs
``_combine_kernel`` on the gathered [world·R, 4]: every rank combines the same values in the same
order (rank 0 first), so every rank gets bitwise the same log-probs, statistics and entropies,
whatever the backend's reduction order. One collective and one launch, where two all-reduces
and ~35 small torch ops did the same before.

``one_pass_chunk``: one chunk of rows of the on-policy one-pass modes (logits in
``vocab_parallel.py``, hidden states in ``linear_chunks.py``): the partials, their combine, then
the chunk's gradient for a unit upstream gradient.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .inputs import compute_dtype
from .row_kernels import INV_TEMPERATURE
from .row_launch import Rows, acc_type, backward_rows, forward_rows, row_outputs
from .triton_math import LOG2E, log1p
from .utils import cdiv

# torch >= 2.13 names it all_gather_single (the old name warns); the GPU image's 2.11 has only
# all_gather_into_tensor. Both take (output [world·R, ...], input [R, ...]).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_BLOCK_ROWS = 128  # rows per program: [world, 128] values, a few registers per thread


@triton.jit(do_not_specialize=["rows", "row_start"])
def _combine_kernel(part_ptr, lp_ptr, stats_ptr, ent_ptr, params_ptr, rows, row_start,
                    WORLD: tl.constexpr, WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr):
    """Rows [pid·BLOCK_ROWS, +BLOCK_ROWS) of the gathered partials [WORLD·rows, 4] (rank k's
    row i at k·rows + i) -> lp, stats (shift, log Σ) and entropy at global row row_start + i.

    Rows not counted hold zeros on every rank (the forward kernel writes them): they combine to
    lp = 0, stats = (0, 0), entropy = 0, as the single-process kernel writes."""
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    valid = i < rows
    inv_t = tl.load(params_ptr + INV_TEMPERATURE).to(ACC)
    c2 = inv_t * LOG2E
    neg_inf = float("-inf")
    g_max = tl.full([BLOCK_ROWS], neg_inf, ACC)
    g_label = tl.full([BLOCK_ROWS], neg_inf, ACC)
    for k in tl.static_range(WORLD):  # pass 1: the global max and the label's logit
        base = part_ptr + 4 * (k * rows + i)
        g_max = tl.maximum(g_max, tl.load(base, mask=valid, other=0.0).to(ACC))
        g_label = tl.maximum(g_label, tl.load(base + 1, mask=valid, other=0.0).to(ACC))
    # a row of only −inf (or a non-finite max, reported by the validation) is shifted by 0
    finite = (g_max > neg_inf) & (g_max < float("inf"))
    shift = tl.where(finite, g_max, 0.0)
    others = tl.zeros([BLOCK_ROWS], ACC)
    w = tl.zeros([BLOCK_ROWS], ACC)
    for k in tl.static_range(WORLD):  # pass 2: each slice's sums, rescaled to the global max
        base = part_ptr + 4 * (k * rows + i)
        x_max = tl.load(base, mask=valid, other=0.0).to(ACC)
        has = x_max > neg_inf  # a slice of only −inf contributes 0
        d = tl.where(has, (x_max - shift) * inv_t, 0.0)
        scale = tl.where(has, tl.exp2(d * LOG2E), 0.0)
        o = tl.load(base + 2, mask=valid, other=0.0).to(ACC)
        others += o * scale
        if WITH_ENTROPY:  # Σ e·(x − M)/t over the slice, re-centred from the slice's max
            x_label = tl.load(base + 1, mask=valid, other=0.0).to(ACC)
            own = tl.where(x_label > neg_inf, tl.exp2((x_label - x_max) * c2), 0.0)
            w += scale * (tl.load(base + 3, mask=valid, other=0.0).to(ACC) + d * (o + own))
    e_label = tl.exp2((g_label - shift) * c2)
    total = others + e_label
    log_sum = tl.log(total)
    # as the single-process kernel: −log1p(others / e_label) keeps a confident token's accuracy
    lp = tl.where(e_label > others, -log1p(others / e_label),
                  (g_label - shift) * inv_t - log_sum)
    r = row_start + i
    tl.store(lp_ptr + r, lp, mask=valid)
    tl.store(stats_ptr + 2 * r, shift, mask=valid)
    tl.store(stats_ptr + 2 * r + 1, log_sum, mask=valid)
    if WITH_ENTROPY:
        tl.store(ent_ptr + r, log_sum - w / total, mask=valid)


def gather_partials(partials: torch.Tensor, group) -> torch.Tensor:
    """[world·R, 4]: every rank's [R, 4] partials, rank-major (one all-gather)."""
    world = dist.get_world_size(group)
    gathered = torch.empty((world * partials.shape[0], 4), dtype=partials.dtype,
                           device=partials.device)
    _ALL_GATHER(gathered, partials.contiguous(), group=group)
    return gathered


def combine_partials(partials: torch.Tensor, params: torch.Tensor, with_entropy: bool, group,
                     out: Optional[Tuple] = None, row_start: int = 0):
    """The exact per-row statistics of the whole vocabulary, the same on every rank.

    partials: [R, 4] (x_max, x_label or −inf, others, w) of this rank's slice for rows
    [row_start, row_start + R) (``row_launch.forward_rows(..., partials=)``); params: the
    epilogue's parameter tensor (1/temperature). ``out`` = (logprobs [N], stats [N, 2],
    entropy [N] or None) to write rows [row_start, row_start + R) of (fresh [R]-row ones when
    None). Returns out: stats = (global x_max, log Σ e^{(x − x_max)/t}) as ``forward_rows``
    writes them; zeros on rows not counted.
    """
    rows = partials.shape[0]
    if out is None:
        out = row_outputs(rows, compute_dtype(partials.dtype), partials.device, with_entropy)
    gathered = gather_partials(partials, group)
    combine_gathered(gathered, dist.get_world_size(group), params, with_entropy, out, row_start)
    return out


def combine_gathered(gathered: torch.Tensor, world: int, params: torch.Tensor,
                     with_entropy: bool, out: Tuple, row_start: int = 0) -> None:
    """The launch of ``_combine_kernel`` on gathered partials [world·R, 4] (see
    ``combine_partials``), writing rows [row_start, row_start + R) of ``out``."""
    rows = gathered.shape[0] // world
    if not rows:
        return
    logprobs, stats, entropy = out
    _combine_kernel[(cdiv(rows, _BLOCK_ROWS),)](
        gathered, logprobs, stats, entropy if entropy is not None else logprobs, params, rows,
        row_start, WORLD=world, WITH_ENTROPY=with_entropy, ACC=acc_type(gathered.dtype),
        BLOCK_ROWS=_BLOCK_ROWS)


def one_pass_chunk(logits: torch.Tensor, grad: torch.Tensor, rows: Rows, params: torch.Tensor,
                   cfg, partials: torch.Tensor, out: Tuple, unit, unit_grad: torch.Tensor,
                   group, vocab_start: int, row_start: int) -> None:
    """One chunk of the vocabulary-parallel on-policy one-pass mode: rows [row_start,
    row_start + R) of this rank's slice ``logits`` ([b, T, V_local] or [R, V_local]).

    The forward kernel writes the slice's partials (into ``partials`` [N, 4]), the all-gather
    and combine write the rows' lp / stats / entropy into ``out``, then the backward kernel
    re-reads the chunk and writes its gradient into ``grad`` (logits-shaped; ``logits`` itself:
    in place), with c_t from the on-policy epilogue ``unit`` (Δ ≡ 0: no per-token term at any
    level) and ``unit_grad`` = 1 as the upstream gradient. cfg: ``OPOLossConfig``."""
    end = row_start + math.prod(logits.shape[:-1])
    forward_rows(logits, rows, params, cfg.with_entropy, row_start=row_start,
                 partials=partials, vocab_start=vocab_start)
    combine_partials(partials[row_start:end], params, cfg.with_entropy, group, out=out,
                     row_start=row_start)
    inplace = grad is logits
    backward_rows(logits, rows, out[0], out[1], out[2] if cfg.entropy_in_gradient else None,
                  unit.coef, unit.scal, unit_grad, params, "sequence", "log", inplace=inplace,
                  out=None if inplace else grad, row_start=row_start, vocab_start=vocab_start)
