"""The passes over the logits [N, V]: Triton row kernels and their launchers.

One program streams one token row (rows flattened on grid axis 0):
  forward  (1 read):  online max/sum over V in blocks -> lp_t, row statistics (x_max, log s),
                      entropy H_t; in the one-pass mode the same program then writes the row's
                      gradient (re-reading the row it has just read).
  backward (1 read + 1 write): p recomputed from the row statistics; c_t from the epilogue's
                      per-sequence coefficients (epilogue.py) and the upstream gradient;
                      ∂L/∂logits = (1/temperature)·[c_t·(onehot − p) − ∂L/∂H_t·p·(log p + H_t)].
  scale (one-pass backward): grad *= upstream gradient; returns at once when it is exactly 1.
Rows that are not counted are never read: the forward writes zeros for them, the backward (and
the one-pass forward) a zero gradient row.

The small per-token tensors are read as the caller passed them (any integer dtype for labels and
seq_ids, bool or 0/1 mask, float ref_logprobs, through their strides): no device op prepares them.
A token row r is (b, t) = divmod(r, T) of a padded [B, T] layout, or (0, r) of a packed [N] one.

Numerics (all in fp32, fp64 for fp64 logits):
- exponentials are exp2 of d·log2(e)/temperature with d = x − x_max (exact for the row's
  largest logits), which compiles to ``ex2.approx.ftz``;
- log-probs are (x_label − x_max)/temperature − log s, never z − logsumexp, which would lose
  ε·|z| to cancellation on the confident tokens that dominate RL batches;
- the label entry of the gradient, c·(1 − p_label), is c·(−expm1(lp_label)) from the saved,
  accurate log-prob (1 − p_label would be 0 in fp32 once p_label > 1 − 6e−8).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .inputs import compute_dtype
from .triton_math import LOG2E, expm1, log1p
from .utils import new_output

INV_TEMPERATURE = tl.constexpr(11)  # index of 1/temperature in the params tensor (epilogue)

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def row_seq(r, T, sel_ptr, sel_sb, sel_st, num_seqs, PACKED: tl.constexpr,
            HAS_MASK: tl.constexpr):
    """Global token row r -> (b, t, seq): padded rows are (b, t) of [B, T] (seq = b, or −1 where
    mask is 0); packed rows are b = 0, t = r (T = N) with seq = seq_ids[r] (−1 = not counted).
    sel_ptr is the mask (padded) or seq_ids (packed), read through its strides. A seq_id outside
    [0, B) counts as "not counted" here, as in the epilogue (validate=True reports it): no
    per-sequence array is ever read out of bounds."""
    b = r // T
    t = r - b * T
    if PACKED:
        seq = tl.load(sel_ptr + t * sel_st).to(tl.int64)
        seq = tl.where(seq < num_seqs, seq, -1)
    elif HAS_MASK:
        seq = tl.where(tl.load(sel_ptr + b * sel_sb + t * sel_st) != 0, b, -1)
    else:
        seq = b
    return b, t, seq


@triton.jit
def token_coef(seq, lp, ref, coef_ptr, scal_ptr, grad_scale, TOKEN: tl.constexpr,
               RATIO: tl.constexpr):
    """c_t = ∂L/∂lp_t times the upstream gradient, from the epilogue's outputs (epilogue.py):
    coef [B, 2] = (a_s, z_s) and scal[0] = b: c_t = (a_s + b·v_t)·f_t + z_s, with v_t and
    f_t = dv_t/dΔ_t the token-level coordinates of Δ_t = lp − ref (level "token"), and
    c_t = a_s + z_s at the sequence levels."""
    a = tl.load(coef_ptr + 2 * seq)
    z = tl.load(coef_ptr + 2 * seq + 1)
    if TOKEN:
        d = lp - ref
        if RATIO:
            c = (a + tl.load(scal_ptr) * expm1(d)) * tl.exp2(d * LOG2E) + z
        else:
            c = (a + tl.load(scal_ptr) * d) + z
    else:
        c = a + z
    return c * grad_scale


@triton.jit
def _block_offsets(start, stride, BLOCK_V: tl.constexpr, WIDE: tl.constexpr):
    """Element offsets of one block of a row: int64 for the block's start, int32 inside the
    block unless BLOCK_V·stride may reach 2^31 (WIDE, e.g. a transposed view)."""
    offs = tl.arange(0, BLOCK_V)
    start64 = start + tl.zeros([], tl.int64)  # (the interpreter's loop index is a Python int)
    if WIDE:
        return (start64 + offs) * stride
    return start64 * stride + offs * stride


@triton.jit
def _zero_row(grad_base, grad_sv, V, BLOCK_V: tl.constexpr, WIDE: tl.constexpr):
    """A row that is not counted gets a zero gradient (its logits are never read)."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        zero = tl.zeros([BLOCK_V], grad_base.dtype.element_ty)
        tl.store(grad_base + _block_offsets(start, grad_sv, BLOCK_V, WIDE), zero, mask=offs < V)


@triton.jit
def _row_gradient(base, sv, grad_base, grad_sv, V, label, x_max, log_sum, lp_label, coef,
                  entropy, d_entropy, inv_t, WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_V: tl.constexpr, WIDE: tl.constexpr, STAGES: tl.constexpr):
    """Writes (1/temperature)·[c·(onehot − p) − ∂L/∂H·p·(log p + H)] for one row (SPEC
    "Gradient"), log p = (x − x_max)/temperature − log s from the saved row statistics.
    grad_base may alias base (in place): each block is read before it is written, by this
    program only."""
    c2 = inv_t * LOG2E
    k2 = log_sum * LOG2E
    one_minus_p_label = -expm1(lp_label)  # 1 − p_label, accurate for confident tokens
    for start in tl.range(0, V, BLOCK_V, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < V
        x = tl.load(base + _block_offsets(start, sv, BLOCK_V, WIDE), mask=in_row,
                    other=float("-inf")).to(ACC)
        d = x - x_max
        p = tl.exp2(d * c2 - k2)
        g = tl.where(offs == label, coef * one_minus_p_label, -coef * p)
        if WITH_ENTROPY:  # ∂H/∂z = −p·(log p + H); p = 0 contributes 0 (no 0·−inf)
            log_p = d * inv_t - log_sum
            g -= d_entropy * p * tl.where(p > 0, log_p + entropy, 0.0)
        tl.store(grad_base + _block_offsets(start, grad_sv, BLOCK_V, WIDE),
                 (g * inv_t).to(grad_base.dtype.element_ty), mask=in_row)


# Integers that follow the batch's shape (B, T, and the strides over sequences of the [B, T]
# labels / mask / ref_logprobs, which are T or T + 1) are not specialized: an RL loop's B and T
# change every step, and Triton would compile a new variant whenever T % 16 or B % 16 changes
# (benchmarks/jit_keys.py counts it). Only scalars per row are read through them, so
# specializing them buys nothing. The logits' strides (multiples of V) stay specialized: they
# decide the 16-byte accesses of the vocabulary loop.
_SHAPE_ARGS = ["T", "row_start", "l_T", "vocab_start", "lab_sb", "sel_sb", "num_seqs"]


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _opo_fwd_kernel(
    logits_ptr, l_T, l_sb, l_st, l_sv,      # logits rows, indexed by the local row pid
    labels_ptr, lab_sb, lab_st,             # [B, T] or [N] (any integer dtype)
    sel_ptr, sel_sb, sel_st, num_seqs,      # mask [B, T] (padded) or seq_ids [N] (packed); B
    lp_ptr, stats_ptr, ent_ptr,             # outputs [N], [N, 2], [N] at the global row
    grad_ptr, g_sb, g_st, g_sv,             # one-pass mode (WRITE_GRAD): gradient rows
    coef_ptr, scal_ptr,                     # one-pass mode: epilogue coefficients (on-policy)
    part_ptr,                               # vocabulary-parallel mode: partials [N, 4]
    params_ptr, T, row_start, V, vocab_start,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    WRITE_GRAD: tl.constexpr, PARTIAL: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
    WIDE: tl.constexpr, STAGES: tl.constexpr,
):
    """One program per row: online logsumexp (and entropy) over V in blocks. The global row is
    r = row_start + pid (a chunk of rows in the fused-linear path); the logits row is pid of a
    [*, l_T, V] (or [l_T, V]) tensor. With WRITE_GRAD (on-policy: c_t known before the pass,
    Δ ≡ 0) the program then writes the row's gradient for a unit upstream gradient.
    PARTIAL (vocabulary-parallel): the row is this rank's slice [vocab_start, vocab_start + V)
    of the vocabulary; the program writes the slice's partials (x_max, x_label or −inf,
    others, w) for ``tp_combine.combine_partials`` instead of lp / stats / entropy."""
    pid = tl.program_id(0).to(tl.int64)
    r = row_start + pid
    b, t, seq = row_seq(r, T, sel_ptr, sel_sb, sel_st, num_seqs, PACKED, HAS_MASK)
    lb = pid // l_T
    lt = pid - lb * l_T
    base = logits_ptr + lb * l_sb + lt * l_st
    grad_base = grad_ptr + lb * g_sb + lt * g_st
    if seq < 0:  # not counted: the row is not read
        if PARTIAL:
            for k in tl.static_range(4):
                tl.store(part_ptr + 4 * r + k, 0.0)
        else:
            tl.store(lp_ptr + r, 0.0)
            tl.store(stats_ptr + 2 * r, 0.0)
            tl.store(stats_ptr + 2 * r + 1, 0.0)
            if WITH_ENTROPY:
                tl.store(ent_ptr + r, 0.0)
        if WRITE_GRAD:
            _zero_row(grad_base, g_sv, V, BLOCK_V, WIDE)
        return
    # the label's logit is fetched before the loop, so its latency overlaps the stream
    label = tl.load(labels_ptr + b * lab_sb + t * lab_st).to(tl.int64) - vocab_start
    in_vocab = (label >= 0) & (label < V)
    # out of range: NaN, reported by the validation; on a vocabulary slice: not this rank's
    x_label = tl.load(base + tl.where(in_vocab, label, 0) * l_sv, mask=in_vocab,
                      other=float("-inf") if PARTIAL else float("nan")).to(ACC)
    inv_t = tl.load(params_ptr + INV_TEMPERATURE).to(ACC)
    c2 = inv_t * LOG2E

    # s = Σ exp((x − x_max)/temperature) is summed WITHOUT the label's term (added at the end
    # from x_label), so that lp = −log1p(others / label's term) keeps its relative accuracy for
    # a confident token, whose lp and 1 − p are far below fp32's 6e−8 next to 1 (where
    # log Σ would round to 0). Only the label's block pays for the exclusion.
    x_max = tl.full([], float("-inf"), ACC)  # running max of the raw logits
    others = tl.zeros([], ACC)               # Σ over j ≠ label of exp((x_j − x_max)/temp.)
    s = tl.zeros([], ACC)                    # Σ over all j (entropy only)
    w = tl.zeros([], ACC)                    # Σ exp(·)·(x − x_max)/temperature (entropy)
    for start in tl.range(0, V, BLOCK_V, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + _block_offsets(start, l_sv, BLOCK_V, WIDE), mask=offs < V,
                    other=float("-inf")).to(ACC)
        m_new = tl.maximum(x_max, tl.max(x, 0))
        # a block (or row prefix) of only −inf keeps the max at −inf: shift by 0, not inf − inf
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        scale = tl.exp2((x_max - shift) * c2)
        e = tl.exp2((x - shift) * c2)
        if WITH_ENTROPY:
            # kept relative to the running max, so H = log s − w/s has no cancellation between
            # two O(|z|) terms (H of a confident row is tiny next to |z|); re-centred as it moves
            w = scale * (w + tl.where(s > 0, (x_max - shift) * inv_t, 0.0) * s) \
                + tl.sum(e * tl.where(e > 0, (x - shift) * inv_t, 0.0), 0)  # 0·(−inf) -> 0
            s = s * scale + tl.sum(e, 0)
        if (label >= start) & (label < start + BLOCK_V):
            e = tl.where(offs == label, 0.0, e)
        others = others * scale + tl.sum(e, 0)
        x_max = m_new
    shift = tl.where(x_max == float("-inf"), 0.0, x_max).to(ACC)
    if PARTIAL:
        tl.store(part_ptr + 4 * r, shift)
        tl.store(part_ptr + 4 * r + 1, x_label)
        tl.store(part_ptr + 4 * r + 2, others)
        tl.store(part_ptr + 4 * r + 3, w)
        return
    e_label = tl.exp2((x_label - shift) * c2)
    log_sum = tl.log(others + e_label)
    # the label dominates: lp = −log1p(others/e_label), accurate however close to 0 it is;
    # otherwise lp <= −log 2 and the plain difference is accurate (and stays finite where
    # e_label underflows; x_label = −inf gives −inf, reported by the validation)
    lp = tl.where(e_label > others, -log1p(others / e_label),
                  (x_label - shift) * inv_t - log_sum)
    tl.store(lp_ptr + r, lp)
    tl.store(stats_ptr + 2 * r, shift)  # logsumexp = shift/temperature + log_sum
    tl.store(stats_ptr + 2 * r + 1, log_sum)
    entropy = tl.zeros([], ACC)
    if WITH_ENTROPY:
        entropy = log_sum - w / s
        tl.store(ent_ptr + r, entropy)
    if WRITE_GRAD:
        d_entropy = tl.zeros([], ACC)
        if WITH_ENTROPY:
            d_entropy = tl.load(scal_ptr + 1).to(ACC)
        coef = token_coef(seq, lp, lp, coef_ptr, scal_ptr, 1.0, False, False).to(ACC)
        _row_gradient(base, l_sv, grad_base, g_sv, V, label, shift, log_sum, lp, coef,
                      entropy, d_entropy, inv_t, WITH_ENTROPY, ACC, BLOCK_V, WIDE, STAGES)


@triton.jit(do_not_specialize=_SHAPE_ARGS + ["ref_sb"])
def _opo_bwd_kernel(
    logits_ptr, l_T, l_sb, l_st, l_sv,      # grad_ptr may equal logits_ptr (in place)
    grad_ptr, g_sb, g_st, g_sv,
    labels_ptr, lab_sb, lab_st, sel_ptr, sel_sb, sel_st, num_seqs,
    ref_ptr, ref_sb, ref_st,                # ref_logprobs (token level only)
    lp_ptr, stats_ptr, ent_ptr, coef_ptr, scal_ptr, grad_loss_ptr,
    params_ptr, T, row_start, V, vocab_start,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    TOKEN: tl.constexpr, RATIO: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
    WIDE: tl.constexpr, STAGES: tl.constexpr,
):
    """One program per row: c_t from the epilogue's coefficients and the upstream gradient
    (read from device memory: no host sync), then the row's gradient."""
    pid = tl.program_id(0).to(tl.int64)
    r = row_start + pid
    b, t, seq = row_seq(r, T, sel_ptr, sel_sb, sel_st, num_seqs, PACKED, HAS_MASK)
    lb = pid // l_T
    lt = pid - lb * l_T
    grad_base = grad_ptr + lb * g_sb + lt * g_st
    if seq < 0:  # not counted: zero gradient, logits not read
        _zero_row(grad_base, g_sv, V, BLOCK_V, WIDE)
        return
    g_up = tl.load(grad_loss_ptr).to(ACC)
    lp = tl.load(lp_ptr + r).to(ACC)
    ref = lp
    if TOKEN:
        ref = tl.load(ref_ptr + b * ref_sb + t * ref_st).to(ACC)
    coef = token_coef(seq, lp, ref, coef_ptr, scal_ptr, g_up, TOKEN, RATIO).to(ACC)
    entropy = tl.zeros([], ACC)
    d_entropy = tl.zeros([], ACC)
    if WITH_ENTROPY:
        entropy = tl.load(ent_ptr + r).to(ACC)
        d_entropy = tl.load(scal_ptr + 1).to(ACC) * g_up
    _row_gradient(logits_ptr + lb * l_sb + lt * l_st, l_sv, grad_base, g_sv, V,
                  tl.load(labels_ptr + b * lab_sb + t * lab_st).to(tl.int64) - vocab_start,
                  tl.load(stats_ptr + 2 * r).to(ACC), tl.load(stats_ptr + 2 * r + 1).to(ACC),
                  lp, coef, entropy, d_entropy, tl.load(params_ptr + INV_TEMPERATURE).to(ACC),
                  WITH_ENTROPY, ACC, BLOCK_V, WIDE, STAGES)


@triton.jit(do_not_specialize=["T", "l_T", "sel_sb", "num_seqs"])
def _scale_kernel(grad_ptr, l_T, g_sb, g_st, g_sv, sel_ptr, sel_sb, sel_st, num_seqs, scale_ptr,
                  T, V,
                  PACKED: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_V: tl.constexpr, WIDE: tl.constexpr):
    """grad_row *= upstream gradient, for the one-pass mode whose forward wrote the gradient of
    a unit upstream gradient. Every program returns at once when the scale is exactly 1 (the
    usual ``loss.backward()``), so that case costs no pass over [N, V] and no host sync."""
    pid = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr).to(ACC)
    if scale == 1.0:
        return
    b, t, seq = row_seq(pid, T, sel_ptr, sel_sb, sel_st, num_seqs, PACKED, HAS_MASK)
    if seq < 0:
        return
    lb = pid // l_T
    base = grad_ptr + lb * g_sb + (pid - lb * l_T) * g_st
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ptrs = base + _block_offsets(start, g_sv, BLOCK_V, WIDE)
        g = tl.load(ptrs, mask=offs < V)
        tl.store(ptrs, (g.to(ACC) * scale).to(g.dtype), mask=offs < V)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Launch table (block over V, warps). One program streams one row, so the block only has to be
# wide enough to keep loads 16 bytes wide and enough bytes in flight; reductions per block are
# amortized over BLOCK_V elements. Starting point, NOT yet measured on a GPU (see
# benchmarks/NOTES.md): 8192 elements for 16-bit logits, 4096 for 32/64-bit, 16 warps.
_MAX_BLOCK = {2: 8192, 4: 4096, 8: 2048}

# Tests and the launch-config sweep (benchmarks/sweep.py) may set this to a function
# (kind, vocab, dtype) -> (BLOCK_V, num_warps[, num_stages]) or None, kind in {"fwd",
# "onepass", "bwd", "scale"}; None falls back to the table.
LAUNCH_OVERRIDE = None


class LaunchConfig(NamedTuple):
    block: int           # BLOCK_V: logits per program per iteration of the vocabulary loop
    num_warps: int
    # software-pipelining depth of the vocabulary loop (tl.range num_stages): 1 = none, each
    # block's loads issued when the loop reaches it; >= 2 prefetches later blocks into shared
    # memory with cp.async (more registers and shared memory per program: a sweep candidate)
    stages: int = 1


def launch_config(vocab: int, dtype: torch.dtype, kind: str = "fwd") -> LaunchConfig:
    """The launch config for a row of `vocab` logits of `dtype`, for kernel `kind`."""
    if LAUNCH_OVERRIDE is not None:
        chosen = LAUNCH_OVERRIDE(kind, vocab, dtype)
        if chosen is not None:
            return LaunchConfig(*chosen)
    block = min(triton.next_power_of_2(vocab), _MAX_BLOCK[dtype.itemsize])
    num_warps = 16 if block >= 4096 else (8 if block >= 1024 else 4)
    return LaunchConfig(block, num_warps)


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

    def args(self, fallback: torch.Tensor):
        """(labels, its strides, selector, its strides, B) for a launch."""
        return (self.labels, *small_geometry(self.labels), *self.selector(fallback))

    def selector(self, fallback: torch.Tensor):
        """(mask or seq_ids, its strides, B); fallback stands in for an absent mask."""
        sel = self.sel if self.sel is not None else fallback
        return (sel, *small_geometry(self.sel), self.num_seqs)

    def flags(self):
        return dict(PACKED=self.packed, HAS_MASK=self.mask is not None)


def row_outputs(num_rows: int, dtype: torch.dtype, device, with_entropy: bool):
    """(logprobs [N], stats [N, 2], entropy [N] or None): the per-row outputs that the forward
    kernel (or the vocabulary-parallel combine) writes, in the compute dtype ``dtype``."""
    return (new_output((num_rows,), dtype, device), new_output((num_rows, 2), dtype, device),
            new_output((num_rows,), dtype, device) if with_entropy else None)


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
    num_local = logits.numel() // max(logits.shape[-1], 1)
    vocab = logits.shape[-1]
    partial = partials is not None
    if out is None and not partial:
        out = row_outputs(rows.num_rows, compute_dtype(logits.dtype), logits.device,
                          with_entropy)
    logprobs, stats, entropy = out if out is not None else (partials, partials, None)
    write_grad = grad is not None
    if num_local:
        block, num_warps, stages = launch_config(vocab, logits.dtype,
                                                 "onepass" if write_grad else "fwd")
        geo = _logits_geometry(logits)
        g = grad if write_grad else logits
        ggeo = _logits_geometry(g)
        _opo_fwd_kernel[(num_local,)](
            logits, *geo, *rows.args(logits), logprobs, stats,
            entropy if entropy is not None else logprobs, g, *ggeo[1:],
            coef if write_grad else logprobs, scal if write_grad else logprobs,
            partials if partial else logprobs, params, rows.T, row_start, vocab, vocab_start,
            WITH_ENTROPY=with_entropy, WRITE_GRAD=write_grad, PARTIAL=partial,
            ACC=acc_type(logits.dtype), BLOCK_V=block, WIDE=_wide(block, geo[3], ggeo[3]),
            STAGES=stages, num_warps=num_warps, **rows.flags(),
        )
    return out


def logsumexp(stats: torch.Tensor, temperature: float) -> torch.Tensor:
    """The per-row logsumexp of z = x/temperature [N] from ``forward_rows``' statistics."""
    return stats[:, 0] / temperature + stats[:, 1]


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
    num_local, vocab = logits.numel() // max(logits.shape[-1], 1), logits.shape[-1]
    grad = logits if inplace else out if out is not None else new_output(
        logits.shape, logits.dtype, logits.device)
    if num_local:
        block, num_warps, stages = launch_config(vocab, logits.dtype, "bwd")
        geo, ggeo = _logits_geometry(logits), _logits_geometry(grad)
        token = level == "token"
        ref = rows.ref if token and rows.ref is not None else logprobs
        _opo_bwd_kernel[(num_local,)](
            logits, *geo, grad, *ggeo[1:], *rows.args(logits), ref, *small_geometry(ref),
            logprobs, stats, entropy if entropy is not None else logprobs, coef, scal,
            grad_loss, params, rows.T, row_start, vocab, vocab_start,
            WITH_ENTROPY=entropy is not None, TOKEN=token, RATIO=coordinates == "ratio",
            ACC=acc_type(logits.dtype), BLOCK_V=block, WIDE=_wide(block, geo[3], ggeo[3]),
            STAGES=stages, num_warps=num_warps, **rows.flags(),
        )
    return grad


def scale_rows_(grad: torch.Tensor, rows: Rows, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale (0-dim tensor) on counted rows, in place; free when scale == 1."""
    num_local, vocab = grad.numel() // max(grad.shape[-1], 1), grad.shape[-1]
    if num_local:
        block, num_warps, _ = launch_config(vocab, grad.dtype, "scale")
        geo = _logits_geometry(grad)
        _scale_kernel[(num_local,)](grad, *geo, *rows.selector(grad), scale, rows.T,
                                    vocab, ACC=acc_type(grad.dtype), BLOCK_V=block,
                                    WIDE=_wide(block, geo[3]), num_warps=num_warps,
                                    **rows.flags())
    return grad
