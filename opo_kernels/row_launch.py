"""Launchers of the row kernels (row_kernels.py): the launch table, the per-token inputs as
the kernels read them (``Rows``), and one function per pass over the logits [N, V].

Every launch is one program per token row, grid (R,) (the forward kernel may instead run a
fixed number of programs per SM that loop over the rows: ``LaunchConfig.programs_per_sm``).
The launch config (BLOCK_V, warps, pipelining stages) depends only on the vocabulary size, the
logits' dtype and the pass; tests and the launch-config sweep override it through
``LAUNCH_OVERRIDE``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton.language as tl

from .inputs import compute_dtype
from .launches import Launch
from .row_kernels import _opo_bwd_kernel, _opo_fwd_kernel, _scale_kernel
from .utils import new_output, next_power_of_2

# Launch table: (kind, bytes per logit) -> (BLOCK_V, num_warps), measured on an H200 (sm_90,
# torch 2.11, triton 3.6, 2026-12-04) by benchmarks/sweep.py at N = 16384 rows and
# V = 32000, 128256, 151936 (benchmarks/results/nvidia-h200.sweep.jsonl; reasoning and table in
# benchmarks/NOTES.md). Each entry is the fastest config at every V of the sweep or within 2 %
# of it; pipelining (stages = 2) was slower everywhere. The forward wants small programs
# (many rows in flight per SM); the backward, which also writes, wide ones. fp64 was not swept:
# its entries keep the pre-measurement rule. "scale" (on-policy backward rescale) likewise.
_TABLE = {
    ("fwd", 2): (4096, 2), ("fwd", 4): (8192, 4),         # 96.9 % / 107 % of copy (1 read)
    ("bwd", 2): (16384, 16), ("bwd", 4): (32768, 32),     # 95.2 % / 95.5 % (1 read + 1 write)
    # one-pass: its gradient pass walks each row backwards (``reverse``, see LaunchConfig):
    # 3.555 vs 3.575 ms at bf16 V = 151936 (second H200 run, sweep_focus.jsonl; the fp32
    # entry's direction was not measured). The re-read misses L2 in both directions.
    ("onepass", 2): (4096, 4, 1, 0, True), ("onepass", 4): (8192, 16, 1, 0, True),
}
_MAX_BLOCK = {2: 8192, 4: 4096, 8: 2048}  # the rule for entries not in _TABLE

# Tests and the launch-config sweep (benchmarks/sweep.py) may set this to a function
# (kind, vocab, dtype) -> (BLOCK_V, num_warps[, num_stages[, programs_per_sm[, reverse]]]) or
# None, kind in {"fwd", "onepass", "bwd", "scale"}; None falls back to the table.
LAUNCH_OVERRIDE = None


class LaunchConfig(NamedTuple):
    block: int           # BLOCK_V: logits per program per iteration of the vocabulary loop
    num_warps: int
    # software-pipelining depth of the vocabulary loop (tl.range num_stages): 1 = none, each
    # block's loads issued when the loop reaches it; >= 2 prefetches later blocks into shared
    # memory with cp.async (more registers and shared memory per program: a sweep candidate)
    stages: int = 1
    # forward / one-pass only: 0 = one program per row; k > 0 = k programs per SM (k may be a
    # fraction), each looping over rows (bounds the rows in flight: the one-pass re-read may
    # then hit L2)
    programs_per_sm: float = 0
    # one-pass only: the gradient pass walks the row from its last block to its first, so that
    # it re-reads first the blocks the statistics pass read last, the ones most likely still
    # in L2 (thousands of rows in flight leave each row only its last few blocks there). The
    # values are the same either way: each gradient element depends on its logit and the row's
    # statistics only.
    reverse: bool = False


def launch_config(vocab: int, dtype: torch.dtype, kind: str = "fwd") -> LaunchConfig:
    """The launch config for a row of `vocab` logits of `dtype`, for kernel `kind`."""
    if LAUNCH_OVERRIDE is not None:
        chosen = LAUNCH_OVERRIDE(kind, vocab, dtype)
        if chosen is not None:
            return LaunchConfig(*chosen)
    if type(vocab) is not int:  # symbolic (torch.compile tracing): not a dictionary key
        return _from_table(vocab, dtype, kind)
    key = (vocab, dtype, kind)
    config = _CHOSEN.get(key)
    if config is None:  # remembered: a loss call asks 2-3 times, for the same few shapes
        if len(_CHOSEN) > 1024:
            _CHOSEN.clear()
        config = _CHOSEN[key] = _from_table(vocab, dtype, kind)
    return config


_CHOSEN = {}


def _from_table(vocab: int, dtype: torch.dtype, kind: str) -> LaunchConfig:
    entry = _TABLE.get((kind, dtype.itemsize))
    if entry is None:
        block = min(next_power_of_2(vocab), _MAX_BLOCK[dtype.itemsize])
        return LaunchConfig(block, 16 if block >= 4096 else (8 if block >= 1024 else 4))
    config = LaunchConfig(*entry)
    if vocab < config.block:  # a short row: the next power of two, at least 16 bytes a thread
        block = next_power_of_2(vocab)
        num_warps = max(1, min(config.num_warps, block * dtype.itemsize // (16 * 32)))
        config = config._replace(block=block, num_warps=num_warps)
    return config


_SM_COUNT = {}


def _grid(num_rows: int, programs_per_sm: int, device: torch.device) -> int:
    """Programs of a row launch: one per row, or programs_per_sm per SM (a fraction is fewer
    programs than SMs), at least 1 and at most one per row. Without CUDA (the interpreter) an
    "SM" is one program: any count works, as on a GPU. (The kernel calls its row body from
    two sites, not from one loop whose trip count is 1, so that one program per row, the
    table's default, compiles without a loop around the row.)"""
    if not programs_per_sm:
        return num_rows
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        sms = _SM_COUNT[index]
    else:
        sms = 1
    return max(1, min(num_rows, round(programs_per_sm * sms)))


def acc_type(dtype: torch.dtype):
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def _logits_geometry(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """(rows per "sequence", stride over them, stride over rows, stride over V) of a [B, T, V]
    or [R, V] tensor (R rows are one "sequence" of R rows)."""
    if t.dim() == 3:
        return t.shape[1], t.stride(0), t.stride(1), t.stride(2)
    return max(t.shape[0], 1), 0, t.stride(0), t.stride(1)


def small_geometry(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(stride over sequences, stride over tokens) of a [B, T] or [N] per-token tensor."""
    if t is None:
        return 0, 0
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (0, t.stride(0))


def _wide(block: int, *strides: int) -> bool:
    return any(block * abs(s) >= 2**31 for s in strides)


class Rows:
    """The per-token inputs of the row kernels, as the caller passed them.

    labels: [B, T] or [N] int; mask: [B, T] or None; seq_ids: [N] or None (packed);
    ref_logprobs: [B, T] / [N] or None; num_rows = N; seq_len = T (padded) or None;
    num_seqs = B.
    """

    __slots__ = ("labels", "mask", "seq_ids", "ref", "num_rows", "num_seqs", "packed", "T",
                 "sel")  # made on every call

    def __init__(self, labels, mask, seq_ids, ref_logprobs, num_rows, seq_len, num_seqs):
        self.labels, self.mask, self.seq_ids, self.ref = labels, mask, seq_ids, ref_logprobs
        self.num_rows, self.num_seqs = num_rows, num_seqs
        self.packed = seq_ids is not None
        self.T = num_rows if self.packed else seq_len
        self.sel = seq_ids if self.packed else mask

    @classmethod
    def of(cls, batch) -> Rows:
        return cls(batch.labels, batch.mask, batch.seq_ids, batch.ref_logprobs, batch.num_rows,
                   batch.seq_len, batch.num_seqs)

    def selector(self, fallback: torch.Tensor):
        """(mask or seq_ids, its strides, B); fallback stands in for an absent mask."""
        return (self.sel if self.sel is not None else fallback, *_selector_geometry(self))

    def flags(self):
        return dict(PACKED=self.packed, HAS_MASK=self.mask is not None)

    def versions(self) -> tuple:
        """The version counters of labels, mask, seq_ids, ref_logprobs (``check_unchanged``)."""
        lab, m, s, r = self.labels, self.mask, self.seq_ids, self.ref
        return (None if lab is None else lab._version, None if m is None else m._version,
                None if s is None else s._version, None if r is None else r._version)

    def check_unchanged(self, versions: tuple, call: str) -> None:
        """A backward reads these tensors again, as they are then; autograd's check of saved
        tensors does not see them (they are data, held without save_for_backward). Raises
        RuntimeError naming the one modified in place since ``versions`` were taken: its
        gradient would be another call's."""
        now = self.versions()
        if now != versions:
            name = next(n for n, a, b in zip(_ROW_INPUTS, versions, now) if a != b)
            raise RuntimeError(
                f"{call}: {name} was modified by an in-place operation after the loss's "
                "forward, and its backward reads it (autograd refuses the same for the tensors "
                "it saves): change a copy, or run backward first")


_ROW_INPUTS = ("labels", "mask", "seq_ids", "ref_logprobs")  # the order of Rows.versions


def row_outputs(num_rows: int, dtype: torch.dtype, device, with_entropy: bool):
    """(logprobs [N], stats [N, 2], entropy [N] or None): the per-row outputs that the forward
    kernel (or the vocabulary-parallel combine) writes, in the compute dtype ``dtype``."""
    return (new_output((num_rows,), dtype, device), new_output((num_rows, 2), dtype, device),
            new_output((num_rows,), dtype, device) if with_entropy else None)


def _selector_geometry(rows: Rows) -> Tuple[int, int, int]:
    """(stride over sequences, over tokens) of mask or seq_ids, then B."""
    return (*small_geometry(rows.sel), rows.num_seqs)


class ForwardLaunch:
    """The forward kernel's launch for one geometry: everything but the tensors, so that a
    caller that knows its signature (``call_plan``) builds it once.

    logits: [B, T, V] or [R, V] (only its shape, strides and dtype are used); rows: ``Rows``
    (the same); ggeo: (stride over sequences, over rows, over V) of the gradient tensor that
    the one-pass mode writes (``one_pass``), else None; device: where the launch runs, when
    logits is a metadata-only stand-in (``call_plan``); at: where lp, stats, entropy, coef and
    scal start in the tensors passed for them, in units of 4 elements (``call_plan`` passes
    one workspace for all five; row_kernels._AT_ARGS), else 0. See ``forward_rows`` for the
    modes.
    """

    def __init__(self, logits: torch.Tensor, rows: Rows, with_entropy: bool, *,
                 one_pass: bool = False, ggeo: Optional[Tuple[int, int, int]] = None,
                 partial: bool = False, row_start: int = 0, vocab_start: int = 0,
                 device: Optional[torch.device] = None, at: Tuple[int, ...] = (0,) * 5):
        self.num_local = logits.numel() // max(logits.shape[-1], 1)
        vocab = logits.shape[-1]
        block, num_warps, stages, per_sm, reverse = launch_config(
            vocab, logits.dtype, "onepass" if one_pass else "fwd")
        self.geo = _logits_geometry(logits)
        self.ggeo = ggeo if one_pass else self.geo[1:]
        self.lab_geo, self.sel_geo = small_geometry(rows.labels), _selector_geometry(rows)
        self.at = at
        self.head = (rows.T, row_start, vocab, vocab_start, self.num_local)
        self.tail = (rows.packed, rows.mask is not None, with_entropy, one_pass, partial,
                     acc_type(logits.dtype), block, _wide(block, self.geo[3], self.ggeo[2]),
                     stages, per_sm > 0, one_pass and reverse)
        grid = _grid(self.num_local, per_sm, logits.device if device is None else device)
        self.launch = Launch(_opo_fwd_kernel, (grid,), num_warps) if self.num_local else None

    def __call__(self, logits, rows: Rows, params, lp, stats, entropy=None, grad=None, coef=None,
                 scal=None, partials=None, zero_before: int = 0, zero_after: int = 0) -> None:
        """In the one-pass mode zero_before/zero_after are rows of ``grad`` around each
        sequence's rows that get zeros too (see the kernel)."""
        if self.launch is None:
            return
        sel = rows.sel if rows.sel is not None else logits
        fill = lp if lp is not None else partials  # stands in for the absent tensors
        self.launch(logits, *self.geo, rows.labels, *self.lab_geo, sel, *self.sel_geo,
                    fill, stats if stats is not None else fill,
                    entropy if entropy is not None else fill,
                    grad if grad is not None else logits, *self.ggeo,
                    coef if coef is not None else fill, scal if scal is not None else fill,
                    partials if partials is not None else fill, *self.at, params, *self.head,
                    zero_before, zero_after, *self.tail)


def forward_rows(logits: torch.Tensor, rows: Rows, params: torch.Tensor, with_entropy: bool, *,
                 row_start: int = 0, out=None, grad: Optional[torch.Tensor] = None,
                 coef: Optional[torch.Tensor] = None, scal: Optional[torch.Tensor] = None,
                 partials: Optional[torch.Tensor] = None, vocab_start: int = 0):
    """Forward pass over logits rows [row_start, row_start + R).

    logits: [B, T, V] or [R, V] (any strides); params: the epilogue's hyperparameter tensor
    (``epilogue.params_tensor``; the kernel reads 1/temperature from it).
    ``out`` = (logprobs [N], stats [N, 2], entropy [N] or None) to write into (fresh ones
    otherwise), float32 (float64 for float64 logits); stats[:, 0] is the row's largest logit
    x_max, stats[:, 1] = log Σ exp((x − x_max)/temperature) (see ``logsumexp``). Rows not
    counted get zeros.
    One-pass mode: with ``grad`` (shaped like logits; may be logits itself), ``coef`` [B, 2]
    and ``scal`` [2] from an on-policy epilogue, the same kernel also writes the gradient of
    a unit upstream gradient.
    Vocabulary-parallel mode: with ``partials`` [N, 4], logits are the slice
    [vocab_start, vocab_start + V) of the vocabulary and the kernel writes the slice's
    partials there (``tp_combine.combine_partials``) instead of ``out``.
    """
    partial = partials is not None
    if out is None and not partial:
        out = row_outputs(rows.num_rows, compute_dtype(logits.dtype), logits.device,
                          with_entropy)
    logprobs, stats, entropy = out if out is not None else (None, None, None)
    one_pass = grad is not None
    launch = ForwardLaunch(logits, rows, with_entropy, one_pass=one_pass,
                           ggeo=_logits_geometry(grad)[1:] if one_pass else None,
                           partial=partial, row_start=row_start, vocab_start=vocab_start)
    launch(logits, rows, params, logprobs, stats, entropy, grad, coef, scal, partials)
    return out


def logsumexp(stats: torch.Tensor, temperature: float) -> torch.Tensor:
    """The per-row logsumexp of z = x/temperature [N] from ``forward_rows``' statistics."""
    return stats[:, 0] / temperature + stats[:, 1]


class BackwardLaunch:
    """The backward kernel's launch for one geometry (see ``ForwardLaunch``): logits and
    rows as there, ggeo: (stride over sequences, over rows, over V) of the gradient tensor,
    level and coordinates: the config's, with_entropy: the entropy term is in the gradient,
    at: as for ``ForwardLaunch``."""

    def __init__(self, logits: torch.Tensor, rows: Rows, ggeo: Tuple[int, int, int],
                 with_entropy: bool, level: str, coordinates: str, row_start: int = 0,
                 vocab_start: int = 0, at: Tuple[int, ...] = (0,) * 5):
        self.num_local, vocab = logits.numel() // max(logits.shape[-1], 1), logits.shape[-1]
        block, num_warps, stages = launch_config(vocab, logits.dtype, "bwd")[:3]
        self.geo, self.ggeo = _logits_geometry(logits), ggeo
        self.lab_geo, self.sel_geo = small_geometry(rows.labels), _selector_geometry(rows)
        # level "token" reads ref at the row's (b, t); without ref_logprobs (on-policy) the
        # log-probs [N] stand in, read at b·T + t = the row
        self.token_ref = level == "token" and rows.ref is not None
        self.ref_geo = small_geometry(rows.ref) if self.token_ref else (rows.T, 1)
        self.at = at
        self.head = (rows.T, row_start, vocab, vocab_start)
        self.tail = (rows.packed, rows.mask is not None, with_entropy, level == "token",
                     coordinates == "ratio", acc_type(logits.dtype), block,
                     _wide(block, self.geo[3], ggeo[2]), stages)
        self.launch = Launch(_opo_bwd_kernel, (self.num_local,), num_warps) \
            if self.num_local else None

    def __call__(self, logits, grad, rows: Rows, lp, stats, entropy, coef, scal, grad_loss,
                 params, zero_before: int = 0, zero_after: int = 0) -> None:
        """zero_before/zero_after: rows of ``grad`` around each sequence's rows that get zeros
        too (see the kernel)."""
        if self.launch is None:
            return
        self.launch(logits, *self.geo, grad, *self.ggeo, rows.labels, *self.lab_geo,
                    rows.sel if rows.sel is not None else logits, *self.sel_geo,
                    rows.ref if self.token_ref else lp, *self.ref_geo, lp, stats,
                    entropy if entropy is not None else lp, coef, scal, grad_loss, *self.at,
                    params, *self.head, zero_before, zero_after, *self.tail)


def backward_rows(logits: torch.Tensor, rows: Rows, logprobs: torch.Tensor, stats: torch.Tensor,
                  entropy: Optional[torch.Tensor], coef: torch.Tensor, scal: torch.Tensor,
                  grad_loss: torch.Tensor, params: torch.Tensor, level: str, coordinates: str,
                  inplace: bool, row_start: int = 0, vocab_start: int = 0,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Backward pass over logits rows [row_start, row_start + R): ∂L/∂logits, same shape and
    dtype as logits.

    logprobs [N], stats [N, 2], entropy [N] or None: from ``forward_rows``; coef [B, 2],
    scal [2]: the epilogue's coefficients; grad_loss: 0-dim upstream gradient (read on device).
    With inplace=True the gradient overwrites `logits` (which is returned); else it is written
    into ``out`` (logits-shaped, any strides) or a fresh tensor. vocab_start: the
    first token id of the logits' vocabulary slice (vocabulary-parallel), else 0.
    """
    grad = logits if inplace else out if out is not None else new_output(
        logits.shape, logits.dtype, logits.device)
    launch = BackwardLaunch(logits, rows, _logits_geometry(grad)[1:], entropy is not None,
                            level, coordinates, row_start, vocab_start)
    launch(logits, grad, rows, logprobs, stats, entropy, coef, scal, grad_loss, params)
    return grad


class ScaleLaunch:
    """The on-policy backward's rescale of a gradient tensor of one geometry (``scale_rows_``)."""

    def __init__(self, grad: torch.Tensor, rows: Rows):
        self.num_local, vocab = grad.numel() // max(grad.shape[-1], 1), grad.shape[-1]
        block, num_warps = launch_config(vocab, grad.dtype, "scale")[:2]
        self.geo, self.sel_geo = _logits_geometry(grad), _selector_geometry(rows)
        self.tail = (rows.T, vocab, rows.packed, rows.mask is not None, acc_type(grad.dtype),
                     block, _wide(block, self.geo[3]))
        self.launch = Launch(_scale_kernel, (self.num_local,), num_warps) \
            if self.num_local else None

    def __call__(self, grad, rows: Rows, scale) -> None:
        if self.launch is not None:
            self.launch(grad, *self.geo, rows.sel if rows.sel is not None else grad,
                        *self.sel_geo, scale, *self.tail)


def scale_rows_(grad: torch.Tensor, rows: Rows, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale (0-dim tensor) on counted rows, in place; free when scale == 1."""
    ScaleLaunch(grad, rows)(grad, rows, scale)
    return grad
