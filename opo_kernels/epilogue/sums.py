"""Phase 1 of the epilogue: every program sums its block of sequences over their counted
tokens into the workspace, and counts the bad values it meets (docs/spec.md, "Bad input and
edge cases")."""

import triton
import triton.language as tl

from ..triton_math import expm1
from .layout import W_COUNT, W_DELTA, W_ENT, W_KL, W_LP, W_REF, W_V, W_V2


@triton.jit
def _token_terms(lp, ref, counted, ON_POLICY, RATIO):
    """(Δ, k3, v_t) of tokens, 0 where not counted."""
    if ON_POLICY:
        d = tl.zeros_like(lp)
    else:
        d = tl.where(counted, lp - ref, 0.0)
    kl = expm1(-d) + d  # exp(−Δ) − 1 + Δ without cancellation
    if RATIO:
        v = expm1(d)
    else:
        v = d
    return d, kl, v


@triton.jit
def _err_counts(errs, cond, K: tl.constexpr, NUM_ERR: tl.constexpr):
    """errs [NUM_ERR] += (number of true entries of cond) at index K."""
    n = tl.sum(tl.sum(cond.to(tl.int32), 1), 0)
    return errs + tl.where(tl.arange(0, NUM_ERR) == K, n, 0)


@triton.jit
def _zero_sums(BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """The eight per-sequence accumulators that _store_sums writes, at zero."""
    zero = tl.zeros([BLOCK_S], ACC)
    return zero, zero, zero, zero, zero, zero, zero, zero


@triton.jit
def _phase1_padded(
    s0, t_lo, t_hi, B, T, V, ws_ptr, errs,
    lp_ptr, lp_sb, lp_st, ref_ptr, ref_sb, ref_st, ent_ptr, ent_sb, ent_st,
    mask_ptr, m_sb, m_st, labels_ptr, lab_sb, lab_st, stats_ptr, inv_temperature,
    HAS_MASK: tl.constexpr, HAS_LP: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr, FROM_LOGITS: tl.constexpr, ON_POLICY,
    RATIO, VALIDATE, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr, NUM_ERR: tl.constexpr,
):
    """Sums over tokens [t_lo, t_hi) of sequences [s0, s0 + BLOCK_S) (sequence s is row s of
    [B, T]) into ws rows 0..7. The per-token loads are masked by the block's bounds only, not
    by the mask values, so that they are issued together with the mask's load: one memory
    round trip per iteration, not two (the serial chain is this loop's latency)."""
    s = s0 + tl.arange(0, BLOCK_S)
    s_in = s < B
    n, sum_d, sum_lp, sum_ref, sum_kl, sum_h, sum_v, sum_v2 = _zero_sums(BLOCK_S, ACC)
    s64 = s.to(tl.int64)[:, None]
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)[None, :]
        inside = s_in[:, None] & (t < t_hi)
        if HAS_MASK:
            m = tl.load(mask_ptr + s64 * m_sb + t * m_st, mask=inside, other=0)
            counted = inside & (m != 0)
            if VALIDATE:
                errs = _err_counts(errs, inside & (m != 0) & (m != 1), 6, NUM_ERR)
        else:
            counted = inside
        if HAS_LP:
            lp = tl.load(lp_ptr + s64 * lp_sb + t * lp_st, mask=inside, other=0.0).to(ACC)
            lp = tl.where(counted, lp, 0.0)
        else:  # counts only (the on-policy pre-pass: c_t needs n_s, not the log-probs)
            lp = tl.zeros([BLOCK_S, BLOCK_T], ACC)
        if HAS_REF:
            ref = tl.load(ref_ptr + s64 * ref_sb + t * ref_st, mask=inside, other=0.0).to(ACC)
            if VALIDATE:
                errs = _err_counts(errs, counted & ((ref != ref) | (tl.abs(ref) == float("inf"))),
                                   3, NUM_ERR)
            ref = tl.where(counted, ref, 0.0)
        else:
            ref = lp
        d, kl, v = _token_terms(lp, ref, counted, ON_POLICY, RATIO)
        n += tl.sum(counted.to(ACC), 1)
        sum_d += tl.sum(d, 1)
        sum_lp += tl.sum(lp, 1)
        sum_ref += tl.sum(ref, 1)
        sum_kl += tl.sum(tl.where(counted, kl, 0.0), 1)
        sum_v += tl.sum(tl.where(counted, v, 0.0), 1)
        sum_v2 += tl.sum(tl.where(counted, v * v, 0.0), 1)
        if HAS_ENT:
            h = tl.load(ent_ptr + s64 * ent_sb + t * ent_st, mask=inside, other=0.0).to(ACC)
            if not FROM_LOGITS:
                if VALIDATE:
                    errs = _err_counts(errs, counted & ((h != h) | (tl.abs(h) == float("inf"))),
                                       8, NUM_ERR)
            sum_h += tl.sum(tl.where(counted, h, 0.0), 1)
        if VALIDATE:
            if FROM_LOGITS:
                row = s64 * T + t
                lab = tl.load(labels_ptr + s64 * lab_sb + t * lab_st, mask=inside, other=0)
                errs = _err_counts(errs, counted & ((lab < 0) | (lab >= V)), 0, NUM_ERR)
                x_max = tl.load(stats_ptr + 2 * row, mask=inside, other=0.0).to(ACC)
                lse = x_max * inv_temperature + tl.load(stats_ptr + 2 * row + 1, mask=inside,
                                                        other=0.0).to(ACC)
                bad = (lse != lse) | (tl.abs(lse) == float("inf")) | (lp != lp) \
                    | (tl.abs(lp) == float("inf"))
                errs = _err_counts(errs, counted & bad, 4, NUM_ERR)
            else:
                bad = (lp != lp) | (tl.abs(lp) == float("inf"))
                errs = _err_counts(errs, counted & bad, 7, NUM_ERR)
    _store_sums(ws_ptr, B, s, s_in, n, sum_d, sum_lp, sum_ref, sum_kl, sum_h, sum_v, sum_v2)
    return errs


@triton.jit
def _phase1_packed(
    s0, r_lo, r_hi, B, N, V, ws_ptr, errs, is_first,
    lp_ptr, lp_st, ref_ptr, ref_st, ent_ptr, ent_st, seq_ptr, seq_st, labels_ptr, lab_st,
    stats_ptr, inv_temperature,
    HAS_LP: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr,
    FROM_LOGITS: tl.constexpr, ON_POLICY, RATIO,
    VALIDATE, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_ERR: tl.constexpr,
):
    """Sums over the tokens of sequences [s0, s0 + BLOCK_S) among rows [r_lo, r_hi), found by
    scanning their seq_ids (tokens of a sequence may be anywhere) into ws rows 0..7. Tokens
    whose seq_id is outside [−1, B) are counted as errors by the programs of the first block of
    sequences only (is_first). As in the padded scan, the per-token loads do not wait for the
    seq_ids: they are masked by the row range only."""
    s = s0 + tl.arange(0, BLOCK_S)
    s_in = s < B
    n, sum_d, sum_lp, sum_ref, sum_kl, sum_h, sum_v, sum_v2 = _zero_sums(BLOCK_S, ACC)
    for r0 in range(r_lo, r_hi, BLOCK_N):
        r = (r0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        in_n = r < r_hi
        sid = tl.load(seq_ptr + r * seq_st, mask=in_n, other=-1).to(tl.int64)
        mine = in_n & (sid >= s0) & (sid < s0 + BLOCK_S) & (sid < B)  # [BLOCK_N]
        if HAS_LP:
            lp = tl.load(lp_ptr + r * lp_st, mask=in_n, other=0.0).to(ACC)
            lp = tl.where(mine, lp, 0.0)
        else:
            lp = tl.zeros([BLOCK_N], ACC)
        if HAS_REF:
            ref = tl.load(ref_ptr + r * ref_st, mask=in_n, other=0.0).to(ACC)
            if VALIDATE:
                errs = _err_counts(errs, (mine & ((ref != ref) | (tl.abs(ref) == float("inf")))
                                          )[:, None], 3, NUM_ERR)
            ref = tl.where(mine, ref, 0.0)
        else:
            ref = lp
        d, kl, v = _token_terms(lp, ref, mine, ON_POLICY, RATIO)
        h = tl.zeros([BLOCK_N], ACC)
        if HAS_ENT:
            h = tl.load(ent_ptr + r * ent_st, mask=in_n, other=0.0).to(ACC)
            if not FROM_LOGITS:
                if VALIDATE:
                    bad_h = mine & ((h != h) | (tl.abs(h) == float("inf")))
                    errs = _err_counts(errs, bad_h[:, None], 8, NUM_ERR)
            h = tl.where(mine, h, 0.0)
        one_hot = (sid[:, None] == s[None, :]) & mine[:, None]  # [BLOCK_N, BLOCK_S]
        n += tl.sum(one_hot.to(ACC), 0)
        sum_d += tl.sum(tl.where(one_hot, d[:, None], 0.0), 0)
        sum_lp += tl.sum(tl.where(one_hot, lp[:, None], 0.0), 0)
        sum_ref += tl.sum(tl.where(one_hot, ref[:, None], 0.0), 0)
        sum_kl += tl.sum(tl.where(one_hot, kl[:, None], 0.0), 0)
        sum_h += tl.sum(tl.where(one_hot, h[:, None], 0.0), 0)
        sum_v += tl.sum(tl.where(one_hot, v[:, None], 0.0), 0)
        sum_v2 += tl.sum(tl.where(one_hot, (v * v)[:, None], 0.0), 0)
        if VALIDATE:
            errs = _err_counts(errs, (is_first & in_n & ((sid < -1) | (sid >= B)))[:, None], 1,
                               NUM_ERR)
            if FROM_LOGITS:
                lab = tl.load(labels_ptr + r * lab_st, mask=in_n, other=0)
                errs = _err_counts(errs, (mine & ((lab < 0) | (lab >= V)))[:, None], 0, NUM_ERR)
                lse = tl.load(stats_ptr + 2 * r, mask=in_n, other=0.0).to(ACC) * inv_temperature \
                    + tl.load(stats_ptr + 2 * r + 1, mask=in_n, other=0.0).to(ACC)
                bad = (lse != lse) | (tl.abs(lse) == float("inf")) | (lp != lp) \
                    | (tl.abs(lp) == float("inf"))
                errs = _err_counts(errs, (mine & bad)[:, None], 4, NUM_ERR)
            else:
                bad = (lp != lp) | (tl.abs(lp) == float("inf"))
                errs = _err_counts(errs, (mine & bad)[:, None], 7, NUM_ERR)
    _store_sums(ws_ptr, B, s, s_in, n, sum_d, sum_lp, sum_ref, sum_kl, sum_h, sum_v, sum_v2)
    return errs


@triton.jit
def _store_sums(ws_ptr, B, s, s_in, n, sum_d, sum_lp, sum_ref, sum_kl, sum_h, sum_v, sum_v2):
    tl.store(ws_ptr + W_COUNT * B + s, n, mask=s_in)
    tl.store(ws_ptr + W_DELTA * B + s, sum_d, mask=s_in)
    tl.store(ws_ptr + W_LP * B + s, sum_lp, mask=s_in)
    tl.store(ws_ptr + W_REF * B + s, sum_ref, mask=s_in)
    tl.store(ws_ptr + W_KL * B + s, sum_kl, mask=s_in)
    tl.store(ws_ptr + W_ENT * B + s, sum_h, mask=s_in)
    tl.store(ws_ptr + W_V * B + s, sum_v, mask=s_in)
    tl.store(ws_ptr + W_V2 * B + s, sum_v2, mask=s_in)

