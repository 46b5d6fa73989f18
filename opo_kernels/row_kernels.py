"""The passes over the logits [N, V]: the Triton row kernels (launched by row_launch.py).

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

import triton
import triton.language as tl

from .triton_math import LOG2E, expm1, log1p

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
def _zero_outside(grad_ptr, lb, lt, l_T, g_sb, g_st, g_sv, V, zero_before, zero_after,
                  BLOCK_V: tl.constexpr, WIDE: tl.constexpr):
    """Zeros at the zero_before gradient rows before the first of a sequence's l_T rows (by
    its program, lt = 0) and the zero_after rows after its last (lt = l_T − 1): the rest of a
    base tensor whose slice the l_T rows are (fused_opo.RowSlice), written by the programs
    that write the slice, so that no fill runs of its own."""
    if zero_before > 0:
        if lt == 0:
            for k in range(1, zero_before + 1):  # (lt - k): int64, as lt is
                _zero_row(grad_ptr + lb * g_sb + (lt - k) * g_st, g_sv, V, BLOCK_V, WIDE)
    if zero_after > 0:
        if lt == l_T - 1:
            for k in range(1, zero_after + 1):
                _zero_row(grad_ptr + lb * g_sb + (lt + k) * g_st, g_sv, V, BLOCK_V, WIDE)


@triton.jit
def _grad_block(base, sv, grad_base, grad_sv, start, V, label, x_max, c2, k2, one_minus_p_label,
                coef, entropy, d_entropy, inv_t, log_sum, WITH_ENTROPY: tl.constexpr,
                ACC: tl.constexpr, BLOCK_V: tl.constexpr, WIDE: tl.constexpr):
    """The gradient of one block [start, start + BLOCK_V) of a row (``_row_gradient``)."""
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


@triton.jit
def _row_gradient(base, sv, grad_base, grad_sv, V, label, x_max, log_sum, lp_label, coef,
                  entropy, d_entropy, inv_t, WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_V: tl.constexpr, WIDE: tl.constexpr, STAGES: tl.constexpr,
                  REVERSE: tl.constexpr):
    """Writes (1/temperature)·[c·(onehot − p) − ∂L/∂H·p·(log p + H)] for one row (docs/spec.md
    "Gradient"), log p = (x − x_max)/temperature − log s from the saved row statistics.
    grad_base may alias base (in place): each block is read before it is written, by this
    program only. REVERSE walks the blocks from the row's end: in the one-pass mode the blocks
    that the statistics pass read last are re-read first, while they may still be in L2."""
    c2 = inv_t * LOG2E
    k2 = log_sum * LOG2E
    one_minus_p_label = -expm1(lp_label)  # 1 − p_label, accurate for confident tokens
    if REVERSE:
        last = tl.cdiv(V, BLOCK_V) - 1
        for i in tl.range(0, last + 1, num_stages=STAGES):
            _grad_block(base, sv, grad_base, grad_sv, (last - i) * BLOCK_V, V, label, x_max,
                        c2, k2, one_minus_p_label, coef, entropy, d_entropy, inv_t, log_sum,
                        WITH_ENTROPY, ACC, BLOCK_V, WIDE)
    else:
        for start in tl.range(0, V, BLOCK_V, num_stages=STAGES):
            _grad_block(base, sv, grad_base, grad_sv, start, V, label, x_max, c2, k2,
                        one_minus_p_label, coef, entropy, d_entropy, inv_t, log_sum,
                        WITH_ENTROPY, ACC, BLOCK_V, WIDE)


# Integers that follow the batch's shape (B, T, and the strides over sequences of the [B, T]
# labels / mask / ref_logprobs, which are T or T + 1) are not specialized: an RL loop's B and T
# change every step, and Triton would compile a new variant whenever T % 16 or B % 16 changes
# (tools/gpu/jit_keys.py counts it). Only scalars per row are read through them, so
# specializing them buys nothing. The logits' strides (multiples of V) stay specialized: they
# decide the 16-byte accesses of the vocabulary loop.
_SHAPE_ARGS = ["T", "row_start", "l_T", "vocab_start", "lab_sb", "sel_sb", "num_seqs"]
# Where the small per-row and per-sequence tensors start in the tensor passed for them, in
# units of 4 elements (16 bytes or more, so that the compiler still knows them aligned): the
# call plan (call_plan.py) passes its one workspace allocation for all of them, with their
# offsets, instead of a view per piece (a view is a tensor object made and freed on every
# call, ~1 µs of host time each); a caller with tensors of their own passes 0. Not
# specialized: they follow N and B.
_AT_ARGS = ["lp_at", "stats_at", "ent_at", "coef_at", "scal_at"]


@triton.jit(do_not_specialize=_SHAPE_ARGS + _AT_ARGS + ["num_local", "zero_before",
                                                        "zero_after"])
def _opo_fwd_kernel(
    logits_ptr, l_T, l_sb, l_st, l_sv,      # logits rows, indexed by the local row pid
    labels_ptr, lab_sb, lab_st,             # [B, T] or [N] (any integer dtype)
    sel_ptr, sel_sb, sel_st, num_seqs,      # mask [B, T] (padded) or seq_ids [N] (packed); B
    lp_ptr, stats_ptr, ent_ptr,             # outputs [N], [N, 2], [N] at the global row
    grad_ptr, g_sb, g_st, g_sv,             # one-pass mode (WRITE_GRAD): gradient rows
    coef_ptr, scal_ptr,                     # one-pass mode: epilogue coefficients (on-policy)
    part_ptr,                               # vocabulary-parallel mode: partials [N, 4]
    lp_at, stats_at, ent_at, coef_at, scal_at,  # where lp ... scal start in their tensors
    params_ptr, T, row_start, V, vocab_start, num_local, zero_before, zero_after,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    WRITE_GRAD: tl.constexpr, PARTIAL: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
    WIDE: tl.constexpr, STAGES: tl.constexpr, PERSISTENT: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """One program per row (``_fwd_row``), or with PERSISTENT fewer programs than the
    num_local rows, program p taking rows p, p + programs, p + 2·programs, ...: this bounds
    the rows in flight, so that the one-pass mode's re-read of a row can still find it in L2
    (rows in flight × row bytes under the L2 size; a launch-config candidate). zero_before,
    zero_after: in the one-pass mode, gradient rows around each sequence's rows that get
    zeros too (as in ``_opo_bwd_kernel``). lp_at ... scal_at: see ``_AT_ARGS``."""
    lp_ptr += 4 * lp_at
    stats_ptr += 4 * stats_at
    ent_ptr += 4 * ent_at
    coef_ptr += 4 * coef_at
    scal_ptr += 4 * scal_at
    if PERSISTENT:
        for local in range(tl.program_id(0), num_local, tl.num_programs(0)):
            _fwd_row(local, logits_ptr, l_T, l_sb, l_st, l_sv, labels_ptr, lab_sb, lab_st,
                     sel_ptr, sel_sb, sel_st, num_seqs, lp_ptr, stats_ptr, ent_ptr, grad_ptr,
                     g_sb, g_st, g_sv, coef_ptr, scal_ptr, part_ptr, params_ptr, T, row_start,
                     V, vocab_start, zero_before, zero_after, PACKED, HAS_MASK, WITH_ENTROPY,
                     WRITE_GRAD, PARTIAL, ACC, BLOCK_V, WIDE, STAGES, REVERSE)
    else:
        _fwd_row(tl.program_id(0), logits_ptr, l_T, l_sb, l_st, l_sv, labels_ptr, lab_sb,
                 lab_st, sel_ptr, sel_sb, sel_st, num_seqs, lp_ptr, stats_ptr, ent_ptr,
                 grad_ptr, g_sb, g_st, g_sv, coef_ptr, scal_ptr, part_ptr, params_ptr, T,
                 row_start, V, vocab_start, zero_before, zero_after, PACKED, HAS_MASK,
                 WITH_ENTROPY, WRITE_GRAD, PARTIAL, ACC, BLOCK_V, WIDE, STAGES, REVERSE)


@triton.jit
def _fwd_row(
    local, logits_ptr, l_T, l_sb, l_st, l_sv, labels_ptr, lab_sb, lab_st,
    sel_ptr, sel_sb, sel_st, num_seqs, lp_ptr, stats_ptr, ent_ptr,
    grad_ptr, g_sb, g_st, g_sv, coef_ptr, scal_ptr, part_ptr,
    params_ptr, T, row_start, V, vocab_start, zero_before, zero_after,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    WRITE_GRAD: tl.constexpr, PARTIAL: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
    WIDE: tl.constexpr, STAGES: tl.constexpr, REVERSE: tl.constexpr,
):
    """One row: online logsumexp (and entropy) over V in blocks. The global row is
    r = row_start + local (a chunk of rows in the fused-linear path); the logits row is local
    of a [*, l_T, V] (or [l_T, V]) tensor. With WRITE_GRAD (on-policy: c_t known before the
    pass, Δ ≡ 0) the program then writes the row's gradient for a unit upstream gradient.
    PARTIAL (vocabulary-parallel): the row is this rank's slice [vocab_start, vocab_start + V)
    of the vocabulary; the program writes the slice's partials (x_max, x_label or −inf,
    others, w) for ``tp_combine.combine_partials`` instead of lp / stats / entropy."""
    pid = local + tl.zeros([], tl.int64)  # (the interpreter's loop index is a Python int)
    r = row_start + pid
    b, t, seq = row_seq(r, T, sel_ptr, sel_sb, sel_st, num_seqs, PACKED, HAS_MASK)
    lb = pid // l_T
    lt = pid - lb * l_T
    base = logits_ptr + lb * l_sb + lt * l_st
    grad_base = grad_ptr + lb * g_sb + lt * g_st
    if WRITE_GRAD:
        _zero_outside(grad_ptr, lb, lt, l_T, g_sb, g_st, g_sv, V, zero_before, zero_after,
                      BLOCK_V, WIDE)
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
        # the slice's max itself: −inf for a slice of only −inf (a masked vocabulary), which
        # the combine leaves out of the global max (its sums, 0, are relative to a shift of 0)
        tl.store(part_ptr + 4 * r, x_max)
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
                      entropy, d_entropy, inv_t, WITH_ENTROPY, ACC, BLOCK_V, WIDE, STAGES,
                      REVERSE)


@triton.jit(do_not_specialize=_SHAPE_ARGS + _AT_ARGS + ["ref_sb", "zero_before", "zero_after"])
def _opo_bwd_kernel(
    logits_ptr, l_T, l_sb, l_st, l_sv,      # grad_ptr may equal logits_ptr (in place)
    grad_ptr, g_sb, g_st, g_sv,
    labels_ptr, lab_sb, lab_st, sel_ptr, sel_sb, sel_st, num_seqs,
    ref_ptr, ref_sb, ref_st,                # ref_logprobs (token level only)
    lp_ptr, stats_ptr, ent_ptr, coef_ptr, scal_ptr, grad_loss_ptr,
    lp_at, stats_at, ent_at, coef_at, scal_at,  # where lp ... scal start (``_AT_ARGS``)
    params_ptr, T, row_start, V, vocab_start, zero_before, zero_after,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    TOKEN: tl.constexpr, RATIO: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
    WIDE: tl.constexpr, STAGES: tl.constexpr,
):
    """One program per row: c_t from the epilogue's coefficients and the upstream gradient
    (read from device memory: no host sync), then the row's gradient.

    zero_before, zero_after: rows of the gradient tensor just before the first and after the
    last of the l_T rows of each "sequence" that get zeros (the rest of a base whose slice
    these rows are, fused_opo.RowSlice: no fill launch of their own); 0 for none."""
    lp_ptr += 4 * lp_at
    stats_ptr += 4 * stats_at
    ent_ptr += 4 * ent_at
    coef_ptr += 4 * coef_at
    scal_ptr += 4 * scal_at
    pid = tl.program_id(0).to(tl.int64)
    r = row_start + pid
    b, t, seq = row_seq(r, T, sel_ptr, sel_sb, sel_st, num_seqs, PACKED, HAS_MASK)
    lb = pid // l_T
    lt = pid - lb * l_T
    grad_base = grad_ptr + lb * g_sb + lt * g_st
    _zero_outside(grad_ptr, lb, lt, l_T, g_sb, g_st, g_sv, V, zero_before, zero_after,
                  BLOCK_V, WIDE)
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
                  WITH_ENTROPY, ACC, BLOCK_V, WIDE, STAGES, False)


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
