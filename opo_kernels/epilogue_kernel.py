"""The epilogue of the fused OPO loss as ONE Triton launch: from per-token log-probs to the loss,
the metrics and the per-sequence gradient coefficients (SPEC "Per sequence" to "Gradient").

Grid: one program per block of BLOCK_S sequences.
  phase 1 (every program): its sequences' sums over their counted tokens — n_s, Σ Δ, Σ lp,
           Σ ref, Σ k3, Σ H, Σ v_t, Σ v_t² — into a [8, B] workspace (padded: the sequence's own
           row of [B, T]; packed: a scan of all N seq_ids, one-hot against the block), and the
           value checks of SPEC "Bad input" as integer counts.
  phase 2 (the last program to finish, found with an integer atomic ticket): groups, τ, Q,
           p̃, ω, v, the loss and the metrics, and per sequence s the coefficients
           (a_s, z_s) from which every token's c_t = ∂L/∂lp_t follows (row_kernels.token_coef):
               c_t = (a_s + b·v_t)·f_t + z_s         (level "token": v_t, f_t = dv_t/dΔ_t)
               c_t = a_s                              (sequence levels)
No floating-point atomics and a fixed summation order: the results are bitwise deterministic.
No host sync: the value checks are counts read by the caller only when it validates.

Group statistics (counts, means, softmaxes) are reductions over tiles of "same group" pairs:
within [s − K, s + K] for group_size = K, over all pairs for group_ids (O(B²) work in one
program: ~B²/1024 tiles per pass, small next to the logits passes at the batch sizes of RL
steps; group_size is the faster layout for very large B).

Closed forms of the gradient (ω, τ, p̃, Q constant; SPEC and "The author's recipe"), with
δ̂ = clamp(δ, ±delta_clip), u = clamp(δ̂/τ, ±score_clip), v = v(δ), v̂ = v(δ̂), D = direction_scale:
  ∂L/∂δ_s = −D·ω_s·v'(δ_s)/M + μ·v̂_s·v'(δ̂_s)·1[δ unclipped]/B' + ∂Z/∂δ_s
  ∂Z/∂δ_s = 2λ·Z̄·p̃_s/(M·τ)·1[u unclipped]·1[δ unclipped],   Z̄ = mean over groups of lse_g(u)
  level "sequence": a_s = ∂L/∂δ_s; "sequence_mean": a_s = ∂L/∂δ_s / n_s (z_s = 0)
  level "token": a_s = −D·ω_s/(M·n_s), b = μ/N', z_s = ∂Z/∂δ_s / n_s
with v'(δ) = e^δ ("ratio") or 1 ("log"); clamps pass the gradient at their bounds
(torch.clamp's convention). ∂L/∂H_t = −β/N' for the entropy bonus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .row_kernels import expm1, small_geometry

# workspace rows (per sequence): phase-1 sums, then phase-2 scratch
_N, _S, _L, _R, _KL, _H, _V1, _V2 = 0, 1, 2, 3, 4, 5, 6, 7
_K, _RMEAN, _FIRST, _X, _U, _LOGQ, _LOGP, _LSE, _OMEGA = 8, 9, 10, 11, 12, 13, 14, 15, 16
NUM_WS = 17
# value-check counters (SPEC "Bad input"), in this order
ERRORS = ("labels", "seq_ids", "rewards", "ref_logprobs", "logits", "weights", "mask",
          "logprobs", "entropy")
NUM_ERR = 16  # padded to a power of two
# params: the float hyperparameters, read from a device tensor (no recompile when they change)
PARAMS = ("alpha", "mu", "tau", "tau_min", "tau_max", "reward_temperature", "entropy_coef",
          "delta_clip", "score_clip", "direction_scale", "logit_reg_coef")
# outputs: metrics in this order (entropy_mean last, when known)
METRICS = ("log_ratio_mean", "kl_k3", "v_mean", "omega_mean", "omega_max", "tau", "penalty",
           "entropy_mean")
# level / coordinates / weights codes
LEVEL = {"sequence": 0, "sequence_mean": 1, "token": 2}
WEIGHTS = {"seed": 0, "escort": 1, "tensor": 2}


# --------------------------------------------------------------------------------------------
# phase 1: per-sequence sums
# --------------------------------------------------------------------------------------------


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
def _phase1_padded(
    s0, B, T, V, ws_ptr, errs,
    lp_ptr, lp_sb, lp_st, ref_ptr, ref_sb, ref_st, ent_ptr, ent_sb, ent_st,
    mask_ptr, m_sb, m_st, labels_ptr, lab_sb, lab_st, stats_ptr, inv_temperature,
    HAS_MASK: tl.constexpr, HAS_LP: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr, FROM_LOGITS: tl.constexpr, ON_POLICY,
    RATIO, VALIDATE, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr, NUM_ERR: tl.constexpr,
):
    """Sums over the tokens of sequences [s0, s0 + BLOCK_S): sequence s is row s of [B, T]."""
    s = s0 + tl.arange(0, BLOCK_S)
    s_in = s < B
    n = tl.zeros([BLOCK_S], ACC)
    sum_d = tl.zeros([BLOCK_S], ACC)
    sum_lp = tl.zeros([BLOCK_S], ACC)
    sum_ref = tl.zeros([BLOCK_S], ACC)
    sum_kl = tl.zeros([BLOCK_S], ACC)
    sum_h = tl.zeros([BLOCK_S], ACC)
    sum_v = tl.zeros([BLOCK_S], ACC)
    sum_v2 = tl.zeros([BLOCK_S], ACC)
    s64 = s.to(tl.int64)[:, None]
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)[None, :]
        inside = s_in[:, None] & (t < T)
        if HAS_MASK:
            m = tl.load(mask_ptr + s64 * m_sb + t * m_st, mask=inside, other=0)
            counted = inside & (m != 0)
            if VALIDATE:
                errs = _err_counts(errs, inside & (m != 0) & (m != 1), 6, NUM_ERR)
        else:
            counted = inside
        if HAS_LP:
            lp = tl.load(lp_ptr + s64 * lp_sb + t * lp_st, mask=counted, other=0.0).to(ACC)
            lp = tl.where(counted, lp, 0.0)
        else:  # counts only (the on-policy pre-pass: c_t needs n_s, not the log-probs)
            lp = tl.zeros([BLOCK_S, BLOCK_T], ACC)
        if HAS_REF:
            ref = tl.load(ref_ptr + s64 * ref_sb + t * ref_st, mask=counted, other=0.0).to(ACC)
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
            h = tl.load(ent_ptr + s64 * ent_sb + t * ent_st, mask=counted, other=0.0).to(ACC)
            if not FROM_LOGITS:
                if VALIDATE:
                    errs = _err_counts(errs, counted & ((h != h) | (tl.abs(h) == float("inf"))),
                                       8, NUM_ERR)
            sum_h += tl.sum(tl.where(counted, h, 0.0), 1)
        if VALIDATE:
            if FROM_LOGITS:
                row = s64 * T + t
                lab = tl.load(labels_ptr + s64 * lab_sb + t * lab_st, mask=counted, other=0)
                errs = _err_counts(errs, counted & ((lab < 0) | (lab >= V)), 0, NUM_ERR)
                x_max = tl.load(stats_ptr + 2 * row, mask=counted, other=0.0).to(ACC)
                lse = x_max * inv_temperature + tl.load(stats_ptr + 2 * row + 1, mask=counted,
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
    s0, B, N, V, ws_ptr, errs, is_first,
    lp_ptr, lp_st, ref_ptr, ref_st, ent_ptr, ent_st, seq_ptr, seq_st, labels_ptr, lab_st,
    stats_ptr, inv_temperature,
    HAS_LP: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr,
    FROM_LOGITS: tl.constexpr, ON_POLICY, RATIO,
    VALIDATE, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_ERR: tl.constexpr,
):
    """Sums over the tokens of sequences [s0, s0 + BLOCK_S), found by scanning all N seq_ids
    (tokens of a sequence may be anywhere). Tokens whose seq_id is outside [−1, B) are counted
    as errors by the first program only."""
    s = s0 + tl.arange(0, BLOCK_S)
    s_in = s < B
    n = tl.zeros([BLOCK_S], ACC)
    sum_d = tl.zeros([BLOCK_S], ACC)
    sum_lp = tl.zeros([BLOCK_S], ACC)
    sum_ref = tl.zeros([BLOCK_S], ACC)
    sum_kl = tl.zeros([BLOCK_S], ACC)
    sum_h = tl.zeros([BLOCK_S], ACC)
    sum_v = tl.zeros([BLOCK_S], ACC)
    sum_v2 = tl.zeros([BLOCK_S], ACC)
    for r0 in range(0, N, BLOCK_N):
        r = (r0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        in_n = r < N
        sid = tl.load(seq_ptr + r * seq_st, mask=in_n, other=-1).to(tl.int64)
        mine = in_n & (sid >= s0) & (sid < s0 + BLOCK_S) & (sid < B)  # [BLOCK_N]
        if HAS_LP:
            lp = tl.load(lp_ptr + r * lp_st, mask=mine, other=0.0).to(ACC)
            lp = tl.where(mine, lp, 0.0)
        else:
            lp = tl.zeros([BLOCK_N], ACC)
        if HAS_REF:
            ref = tl.load(ref_ptr + r * ref_st, mask=mine, other=0.0).to(ACC)
            if VALIDATE:
                errs = _err_counts(errs, (mine & ((ref != ref) | (tl.abs(ref) == float("inf")))
                                          )[:, None], 3, NUM_ERR)
            ref = tl.where(mine, ref, 0.0)
        else:
            ref = lp
        d, kl, v = _token_terms(lp, ref, mine, ON_POLICY, RATIO)
        h = tl.zeros([BLOCK_N], ACC)
        if HAS_ENT:
            h = tl.load(ent_ptr + r * ent_st, mask=mine, other=0.0).to(ACC)
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
                lab = tl.load(labels_ptr + r * lab_st, mask=mine, other=0)
                errs = _err_counts(errs, (mine & ((lab < 0) | (lab >= V)))[:, None], 0, NUM_ERR)
                lse = tl.load(stats_ptr + 2 * r, mask=mine, other=0.0).to(ACC) * inv_temperature \
                    + tl.load(stats_ptr + 2 * r + 1, mask=mine, other=0.0).to(ACC)
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
    tl.store(ws_ptr + 0 * B + s, n, mask=s_in)
    tl.store(ws_ptr + 1 * B + s, sum_d, mask=s_in)
    tl.store(ws_ptr + 2 * B + s, sum_lp, mask=s_in)
    tl.store(ws_ptr + 3 * B + s, sum_ref, mask=s_in)
    tl.store(ws_ptr + 4 * B + s, sum_kl, mask=s_in)
    tl.store(ws_ptr + 5 * B + s, sum_h, mask=s_in)
    tl.store(ws_ptr + 6 * B + s, sum_v, mask=s_in)
    tl.store(ws_ptr + 7 * B + s, sum_v2, mask=s_in)


# --------------------------------------------------------------------------------------------
# phase 2: groups, τ, weights, loss, coefficients (one program)
# --------------------------------------------------------------------------------------------


@triton.jit
def _ws(ws_ptr, B, row, s, s_in):
    """Row `row` of the [NUM_WS, B] workspace at sequences s (0 outside [0, B)). Loads bypass
    L1 (.cg): phase-1 sums were written by other programs."""
    return tl.load(ws_ptr + row * B + s, mask=s_in, other=0.0, cache_modifier=".cg")


@triton.jit
def _gid(s, s_in, gid_ptr, gid_st, K, HAS_IDS: tl.constexpr):
    """Group id of sequences s: s // K (group_size) or group_ids[s]."""
    if HAS_IDS:
        return tl.load(gid_ptr + s.to(tl.int64) * gid_st, mask=s_in, other=-1).to(tl.int64)
    return (s // K).to(tl.int64)


@triton.jit
def _j_range(i0, B, K, BLOCK: tl.constexpr, HAS_IDS: tl.constexpr):
    """[lo, hi) of the sequences that can share a group with one of i0 .. i0 + BLOCK − 1."""
    if HAS_IDS:
        return 0, B
    last = tl.minimum(i0 + BLOCK, B) - 1
    return (i0 // K) * K, tl.minimum(B, (last // K + 1) * K)


@triton.jit
def _group_tile(ws_ptr, B, i, gi, j0, gid_ptr, gid_st, K, HAS_IDS: tl.constexpr,
                BLOCK: tl.constexpr):
    """(same [BLOCK, BLOCK], j [BLOCK], j_in): same[a, c] = sequence j[c] is a non-empty member
    of sequence i[a]'s group."""
    j = j0 + tl.arange(0, BLOCK)
    j_in = j < B
    gj = _gid(j, j_in, gid_ptr, gid_st, K, HAS_IDS)
    valid_j = _ws(ws_ptr, B, 0, j, j_in) > 0
    same = (gi[:, None] == gj[None, :]) & (valid_j & j_in)[None, :]
    return same, j, j_in


@triton.jit
def _group_sum(ws_ptr, B, row, i0, gid_ptr, gid_st, K, ACC: tl.constexpr,
               HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    """Σ over the non-empty members j of each sequence i's group of ws[row, j] (i in block)."""
    i = i0 + tl.arange(0, BLOCK)
    gi = _gid(i, i < B, gid_ptr, gid_st, K, HAS_IDS)
    lo, hi = _j_range(i0, B, K, BLOCK, HAS_IDS)
    acc = tl.zeros([BLOCK], ACC)
    for j0 in range(lo, hi, BLOCK):
        same, j, j_in = _group_tile(ws_ptr, B, i, gi, j0, gid_ptr, gid_st, K, HAS_IDS, BLOCK)
        x = _ws(ws_ptr, B, row, j, j_in)
        acc += tl.sum(tl.where(same, x[None, :], 0.0), 1)
    return acc


@triton.jit
def _group_max(ws_ptr, B, row, i0, gid_ptr, gid_st, K, ACC: tl.constexpr,
               HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    i = i0 + tl.arange(0, BLOCK)
    gi = _gid(i, i < B, gid_ptr, gid_st, K, HAS_IDS)
    lo, hi = _j_range(i0, B, K, BLOCK, HAS_IDS)
    acc = tl.full([BLOCK], float("-inf"), ACC)
    for j0 in range(lo, hi, BLOCK):
        same, j, j_in = _group_tile(ws_ptr, B, i, gi, j0, gid_ptr, gid_st, K, HAS_IDS, BLOCK)
        x = _ws(ws_ptr, B, row, j, j_in)
        acc = tl.maximum(acc, tl.max(tl.where(same, x[None, :], float("-inf")), 1))
    return acc


@triton.jit
def _group_lse(ws_ptr, B, row, i0, gid_ptr, gid_st, K, ACC: tl.constexpr,
               HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    """logsumexp over each sequence's group (non-empty members) of ws[row, ·]: two sweeps, the
    group max first, so no exp overflows."""
    m = _group_max(ws_ptr, B, row, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
    m = tl.where(m == float("-inf"), 0.0, m)
    i = i0 + tl.arange(0, BLOCK)
    gi = _gid(i, i < B, gid_ptr, gid_st, K, HAS_IDS)
    lo, hi = _j_range(i0, B, K, BLOCK, HAS_IDS)
    total = tl.zeros([BLOCK], ACC)
    for j0 in range(lo, hi, BLOCK):
        same, j, j_in = _group_tile(ws_ptr, B, i, gi, j0, gid_ptr, gid_st, K, HAS_IDS, BLOCK)
        x = _ws(ws_ptr, B, row, j, j_in)
        total += tl.sum(tl.exp(tl.where(same, x[None, :] - m[:, None], float("-inf"))), 1)
    return m + tl.log(tl.where(total > 0, total, 1.0))  # an empty group (not used): m


@triton.jit
def _clamp(x, c):
    return tl.minimum(tl.maximum(x, -c), c)


@triton.jit
def _finish(
    B, V, ws_ptr, params_ptr, rewards_ptr, r_st, gid_ptr, gid_st, K, weights_ptr, w_st,
    loss_ptr, metrics_ptr, coef_ptr, scal_ptr, errs_ptr, part_errs_ptr, num_programs,
    LEVEL, RATIO, WEIGHTS, CENTER,
    ADAPTIVE, SCALE_REWARDS, HAS_IDS: tl.constexpr,
    HAS_ENT: tl.constexpr, ENT_IN_LOSS, BONUS, VALIDATE,
    ACC: tl.constexpr, BLOCK: tl.constexpr, NUM_ERR: tl.constexpr, NUM_PROG_BLOCK: tl.constexpr,
):
    alpha = tl.load(params_ptr + 0).to(ACC)
    mu = tl.load(params_ptr + 1).to(ACC)
    tau0 = tl.load(params_ptr + 2).to(ACC)
    tau_min = tl.load(params_ptr + 3).to(ACC)
    tau_max = tl.load(params_ptr + 4).to(ACC)
    reward_t = tl.load(params_ptr + 5).to(ACC)
    beta = tl.load(params_ptr + 6).to(ACC)
    delta_clip = tl.load(params_ptr + 7).to(ACC)   # +inf = off
    score_clip = tl.load(params_ptr + 8).to(ACC)   # +inf = off
    direction = tl.load(params_ptr + 9).to(ACC)
    lam = tl.load(params_ptr + 10).to(ACC)
    log_v = tl.maximum(tl.log(tl.full([], V, ACC)), 1e-6)  # V = 1 -> h_static 0, conf 1
    sequence_mean = LEVEL != 0

    # ---- pass 0: per-sequence δ, ℓ, ℓref; global counts and sums ----
    zero = tl.zeros([], ACC)
    n_valid = zero
    n_tokens = zero
    sum_d = zero
    sum_kl = zero
    sum_h = zero
    sum_v1 = zero
    sum_v2 = zero
    sum_hs = zero
    sum_conf = zero
    bad_rewards = tl.zeros([], tl.int32)
    bad_weights = tl.zeros([], tl.int32)
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        n = _ws(ws_ptr, B, 0, i, i_in)
        valid = n > 0
        n_safe = tl.maximum(n, 1.0)
        ell = _ws(ws_ptr, B, 2, i, i_in)
        ell_ref = _ws(ws_ptr, B, 3, i, i_in)
        if sequence_mean:
            ell = ell / n_safe
            ell_ref = ell_ref / n_safe
        n_valid += tl.sum(valid.to(ACC), 0)
        n_tokens += tl.sum(n, 0)
        sum_d += tl.sum(_ws(ws_ptr, B, 1, i, i_in), 0)
        sum_kl += tl.sum(_ws(ws_ptr, B, 4, i, i_in), 0)
        sum_h += tl.sum(_ws(ws_ptr, B, 5, i, i_in), 0)
        sum_v1 += tl.sum(_ws(ws_ptr, B, 6, i, i_in), 0)
        sum_v2 += tl.sum(_ws(ws_ptr, B, 7, i, i_in), 0)
        sum_hs += tl.sum(tl.where(valid, _clamp01(-ell_ref / log_v), 0.0), 0)
        sum_conf += tl.sum(tl.where(valid, _clamp01(-ell / log_v), 0.0), 0)
        r = tl.load(rewards_ptr + i.to(tl.int64) * r_st, mask=i_in, other=0.0).to(ACC)
        bad_rewards += tl.sum((i_in & ((r != r) | (tl.abs(r) == float("inf")))).to(tl.int32), 0)
        if WEIGHTS == 2:
            w = tl.load(weights_ptr + i.to(tl.int64) * w_st, mask=i_in, other=0.0).to(ACC)
            bad_weights += tl.sum((i_in & ((w != w) | (tl.abs(w) == float("inf")))
                                   ).to(tl.int32), 0)
        tl.store(ws_ptr + 11 * B + i, r / reward_t, mask=i_in)  # Q's logits (scale_rewards: below)
    n_valid_safe = tl.maximum(n_valid, 1.0)
    n_tokens_safe = tl.maximum(n_tokens, 1.0)
    tl.debug_barrier()

    # ---- pass A: group sizes, group mean reward, first member of each group ----
    n_groups = zero
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        gi = _gid(i, i_in, gid_ptr, gid_st, K, HAS_IDS)
        lo, hi = _j_range(i0, B, K, BLOCK, HAS_IDS)
        count = tl.zeros([BLOCK], ACC)
        before = tl.zeros([BLOCK], ACC)
        sum_r = tl.zeros([BLOCK], ACC)
        for j0 in range(lo, hi, BLOCK):
            same, j, j_in = _group_tile(ws_ptr, B, i, gi, j0, gid_ptr, gid_st, K, HAS_IDS,
                                        BLOCK)
            rj = tl.load(rewards_ptr + j.to(tl.int64) * r_st, mask=j_in, other=0.0).to(ACC)
            count += tl.sum(same.to(ACC), 1)
            before += tl.sum((same & (j[None, :] < i[:, None])).to(ACC), 1)
            sum_r += tl.sum(tl.where(same, rj[None, :], 0.0), 1)
        valid = _ws(ws_ptr, B, 0, i, i_in) > 0
        first = valid & (before == 0)
        n_groups += tl.sum(first.to(ACC), 0)
        tl.store(ws_ptr + 8 * B + i, count, mask=i_in)
        tl.store(ws_ptr + 9 * B + i, sum_r / tl.maximum(count, 1.0), mask=i_in)
        tl.store(ws_ptr + 10 * B + i, first.to(ACC), mask=i_in)
    n_groups_safe = tl.maximum(n_groups, 1.0)
    tl.debug_barrier()

    # ---- τ (SPEC adaptive rule) over the non-empty sequences ----
    a_min = tl.full([], float("inf"), ACC)
    a_max = tl.full([], float("-inf"), ACC)
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        valid = _ws(ws_ptr, B, 0, i, i_in) > 0
        r = tl.load(rewards_ptr + i.to(tl.int64) * r_st, mask=i_in, other=0.0).to(ACC)
        adv = r - _ws(ws_ptr, B, 9, i, i_in)
        a_min = tl.minimum(a_min, tl.min(tl.where(valid, adv, float("inf")), 0))
        a_max = tl.maximum(a_max, tl.max(tl.where(valid, adv, float("-inf")), 0))
    spread = tl.maximum(a_max - a_min, 1e-6)
    sum_rho = zero
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        valid = _ws(ws_ptr, B, 0, i, i_in) > 0
        r = tl.load(rewards_ptr + i.to(tl.int64) * r_st, mask=i_in, other=0.0).to(ACC)
        adv = r - _ws(ws_ptr, B, 9, i, i_in)
        sum_rho += tl.sum(tl.where(valid, (adv - a_min) / spread, 0.0), 0)
    if ADAPTIVE:
        h_static = sum_hs / n_valid_safe
        conf = 1 - sum_conf / n_valid_safe
        rho = 2 * (sum_rho / n_valid_safe) - 1
        tau = tl.minimum(tl.maximum(tau0 * (1 + 0.2 * h_static + 0.5 * conf * (-rho)), tau_min),
                         tau_max)
    else:
        tau = tau0

    # ---- scores u = clamp(δ̂/τ) (p̃'s logits) and, with scale_rewards, Q's logits ----
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        n = _ws(ws_ptr, B, 0, i, i_in)
        delta = _ws(ws_ptr, B, 1, i, i_in)
        if sequence_mean:
            delta = delta / tl.maximum(n, 1.0)
        u = _clamp(_clamp(delta, delta_clip) / tau, score_clip)
        tl.store(ws_ptr + 12 * B + i, u, mask=i_in)
        if SCALE_REWARDS:
            r = tl.load(rewards_ptr + i.to(tl.int64) * r_st, mask=i_in, other=0.0).to(ACC)
            dev = r - _ws(ws_ptr, B, 9, i, i_in)
            tl.store(ws_ptr + 13 * B + i, dev * dev, mask=i_in)  # scratch for the variance
    tl.debug_barrier()
    if SCALE_REWARDS:  # Q from group-normalized advantages (unbiased std; one member: A = 0)
        for i0 in range(0, B, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            i_in = i < B
            ss = _group_sum(ws_ptr, B, 13, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
            count = _ws(ws_ptr, B, 8, i, i_in)
            std = tl.sqrt(ss / tl.maximum(count - 1, 1.0))
            r = tl.load(rewards_ptr + i.to(tl.int64) * r_st, mask=i_in, other=0.0).to(ACC)
            adv = tl.where(count > 1, (r - _ws(ws_ptr, B, 9, i, i_in)) / (std + 1e-6), 0.0)
            tl.store(ws_ptr + 11 * B + i, adv / reward_t, mask=i_in)
        tl.debug_barrier()

    # ---- log Q, log p̃ and the group logsumexp of u ----
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        lse_x = _group_lse(ws_ptr, B, 11, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
        lse_u = _group_lse(ws_ptr, B, 12, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
        tl.store(ws_ptr + 13 * B + i, _ws(ws_ptr, B, 11, i, i_in) - lse_x, mask=i_in)
        tl.store(ws_ptr + 14 * B + i, _ws(ws_ptr, B, 12, i, i_in) - lse_u, mask=i_in)
        tl.store(ws_ptr + 15 * B + i, lse_u, mask=i_in)
    tl.debug_barrier()

    # ---- ω (sampling geometry; constants for the gradient) ----
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        log_q = _ws(ws_ptr, B, 13, i, i_in)
        log_p = _ws(ws_ptr, B, 14, i, i_in)
        if WEIGHTS == 0:    # seed: Q^(2−α)·p̃^(α−1)
            omega = tl.exp((2 - alpha) * log_q - (1 - alpha) * log_p)
        elif WEIGHTS == 1:  # escort: logits of the normalized Q^α·p̃^(1−α), softmaxed below
            omega = alpha * log_q + (1 - alpha) * log_p
        else:
            omega = tl.load(weights_ptr + i.to(tl.int64) * w_st, mask=i_in, other=0.0).to(ACC)
        tl.store(ws_ptr + 16 * B + i, omega, mask=i_in)
    tl.debug_barrier()
    if WEIGHTS == 1:
        for i0 in range(0, B, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            i_in = i < B
            lse_y = _group_lse(ws_ptr, B, 16, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
            y = _ws(ws_ptr, B, 16, i, i_in)
            # other blocks still read this block's y: ω goes to row 13 (log Q, consumed above)
            tl.store(ws_ptr + 13 * B + i, tl.exp(y - lse_y), mask=i_in)
        tl.debug_barrier()
        for i0 in range(0, B, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            i_in = i < B
            tl.store(ws_ptr + 16 * B + i, _ws(ws_ptr, B, 13, i, i_in), mask=i_in)
        tl.debug_barrier()
    for i0 in range(0, B, BLOCK):  # ω = 0 off the non-empty sequences (before centring)
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        valid = _ws(ws_ptr, B, 0, i, i_in) > 0
        tl.store(ws_ptr + 16 * B + i, tl.where(valid, _ws(ws_ptr, B, 16, i, i_in), 0.0),
                 mask=i_in)
    tl.debug_barrier()
    if CENTER:
        for i0 in range(0, B, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            i_in = i < B
            total = _group_sum(ws_ptr, B, 16, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
            mean = total / tl.maximum(_ws(ws_ptr, B, 8, i, i_in), 1.0)
            tl.store(ws_ptr + 13 * B + i, _ws(ws_ptr, B, 16, i, i_in) - mean, mask=i_in)
        tl.debug_barrier()
        for i0 in range(0, B, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            i_in = i < B
            valid = _ws(ws_ptr, B, 0, i, i_in) > 0
            tl.store(ws_ptr + 16 * B + i, tl.where(valid, _ws(ws_ptr, B, 13, i, i_in), 0.0),
                     mask=i_in)
        tl.debug_barrier()

    # ---- the loss, the metrics and the coefficients ----
    policy = zero
    penalty_sum = zero
    v_sum = zero
    omega_sum = zero
    omega_max = tl.full([], float("-inf"), ACC)
    z_sum = zero
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        n = _ws(ws_ptr, B, 0, i, i_in)
        valid = n > 0
        n_safe = tl.maximum(n, 1.0)
        omega = _ws(ws_ptr, B, 16, i, i_in)
        omega_sum += tl.sum(omega, 0)
        omega_max = tl.maximum(omega_max, tl.max(tl.where(valid, omega, float("-inf")), 0))
        first = _ws(ws_ptr, B, 10, i, i_in) > 0
        z_sum += tl.sum(tl.where(first, _ws(ws_ptr, B, 15, i, i_in), 0.0), 0)
        if LEVEL == 2:
            policy += tl.sum(omega / n_safe * _ws(ws_ptr, B, 6, i, i_in), 0)
        else:
            delta = _ws(ws_ptr, B, 1, i, i_in)
            if sequence_mean:
                delta = delta / n_safe
            delta_hat = _clamp(delta, delta_clip)
            if RATIO:
                v = expm1(delta)
                v_hat = expm1(delta_hat)
            else:
                v = delta
                v_hat = delta_hat
            v = tl.where(valid, v, 0.0)
            v_hat = tl.where(valid, v_hat, 0.0)
            policy += tl.sum(omega * v, 0)
            penalty_sum += tl.sum(v_hat * v_hat, 0)
            v_sum += tl.sum(v, 0)
    z_bar = z_sum / n_groups_safe
    policy = -direction * policy / n_groups_safe
    if LEVEL == 2:
        penalty = mu / 2 * sum_v2 / n_tokens_safe
        v_mean = sum_v1 / n_tokens_safe
    else:
        penalty = mu / 2 * penalty_sum / n_valid_safe
        v_mean = v_sum / n_valid_safe
    loss = policy + penalty + lam * z_bar * z_bar
    mean_entropy = sum_h / n_tokens_safe
    if ENT_IN_LOSS:
        loss -= beta * mean_entropy

    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        n = _ws(ws_ptr, B, 0, i, i_in)
        valid = n > 0
        n_safe = tl.maximum(n, 1.0)
        omega = _ws(ws_ptr, B, 16, i, i_in)
        delta = _ws(ws_ptr, B, 1, i, i_in)
        if sequence_mean:
            delta = delta / n_safe
        delta_in = tl.abs(delta) <= delta_clip      # torch.clamp passes the gradient at bounds
        delta_hat = _clamp(delta, delta_clip)
        u_in = tl.abs(delta_hat / tau) <= score_clip
        p_tilde = tl.exp(_ws(ws_ptr, B, 14, i, i_in))
        dz = 2 * lam * z_bar / n_groups_safe * p_tilde / tau
        dz = tl.where(u_in & delta_in, dz, 0.0)
        if LEVEL == 2:
            a = -direction * omega / (n_groups_safe * n_safe)
            z = dz / n_safe
        else:
            if RATIO:
                dv = tl.exp(delta)
                v_hat = expm1(delta_hat)
                dv_hat = tl.exp(delta_hat)
            else:
                dv = tl.full([BLOCK], 1.0, ACC)
                v_hat = delta_hat
                dv_hat = tl.full([BLOCK], 1.0, ACC)
            a = -direction * omega * dv / n_groups_safe \
                + tl.where(delta_in, mu * v_hat * dv_hat / n_valid_safe, 0.0) + dz
            if sequence_mean:
                a = a / n_safe
            z = tl.zeros([BLOCK], ACC)
        tl.store(coef_ptr + 2 * i, tl.where(valid, a, 0.0), mask=i_in)
        tl.store(coef_ptr + 2 * i + 1, tl.where(valid, z, 0.0), mask=i_in)

    tl.store(loss_ptr, loss)
    if LEVEL == 2:
        tl.store(scal_ptr, mu / n_tokens_safe)
    else:
        tl.store(scal_ptr, 0.0)
    if BONUS:  # ∂L/∂H_t, also in the on-policy pre-pass (which has no entropy values yet)
        tl.store(scal_ptr + 1, -beta / n_tokens_safe)
    else:
        tl.store(scal_ptr + 1, 0.0)
    tl.store(metrics_ptr + 0, sum_d / n_tokens_safe)
    tl.store(metrics_ptr + 1, sum_kl / n_tokens_safe)
    tl.store(metrics_ptr + 2, v_mean)
    tl.store(metrics_ptr + 3, omega_sum / n_valid_safe)
    tl.store(metrics_ptr + 4, tl.where(n_valid > 0, omega_max, 0.0))
    tl.store(metrics_ptr + 5, tau)
    tl.store(metrics_ptr + 6, penalty)
    if HAS_ENT:
        tl.store(metrics_ptr + 7, mean_entropy)
    if VALIDATE:  # Σ over programs of their counts, plus the checks of [B] inputs
        e = tl.arange(0, NUM_ERR)
        errs = tl.zeros([NUM_ERR], tl.int32)
        for p0 in range(0, num_programs, NUM_PROG_BLOCK):
            p = p0 + tl.arange(0, NUM_PROG_BLOCK)
            part = tl.load(part_errs_ptr + p[:, None] * NUM_ERR + e[None, :],
                           mask=(p < num_programs)[:, None], other=0, cache_modifier=".cg")
            errs += tl.sum(part, 0)
        errs += tl.where(e == 2, bad_rewards, 0) + tl.where(e == 5, bad_weights, 0)
        tl.store(errs_ptr + e, errs)


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------


# mode flags are runtime ints (uniform branches), not constexprs: one compiled variant serves
# every option combination (the option grid would otherwise compile hundreds of variants)
@triton.jit(do_not_specialize=["B", "T", "N", "K", "ON_POLICY", "LEVEL", "RATIO", "WEIGHTS",
                               "CENTER", "ADAPTIVE", "SCALE_REWARDS", "ENT_IN_LOSS",
                               "BONUS", "VALIDATE"])
def epilogue_kernel(
    lp_ptr, lp_sb, lp_st, ref_ptr, ref_sb, ref_st, ent_ptr, ent_sb, ent_st,
    sel_ptr, sel_sb, sel_st, labels_ptr, lab_sb, lab_st, stats_ptr,
    rewards_ptr, r_st, gid_ptr, gid_st, weights_ptr, w_st, params_ptr,
    ws_ptr, part_errs_ptr, counter_ptr,
    loss_ptr, metrics_ptr, coef_ptr, scal_ptr, errs_ptr,
    B, T, N, V, K,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LP: tl.constexpr,
    HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, ENT_IN_LOSS, BONUS,
    FROM_LOGITS: tl.constexpr,
    ON_POLICY, LEVEL, RATIO, WEIGHTS,
    CENTER, ADAPTIVE, SCALE_REWARDS,
    HAS_IDS: tl.constexpr, VALIDATE, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr,
    NUM_ERR: tl.constexpr, NUM_PROG_BLOCK: tl.constexpr,
):
    """See the module docstring. Per-token tensors are read through (stride over sequences,
    stride over tokens); packed tensors have stride 0 over sequences and T = N."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    errs = tl.zeros([NUM_ERR], tl.int32)
    inv_temperature = tl.load(params_ptr + 11).to(ACC)
    if PACKED:
        errs = _phase1_packed(
            pid * BLOCK_S, B, N, V, ws_ptr, errs, pid == 0,
            lp_ptr, lp_st, ref_ptr, ref_st, ent_ptr, ent_st, sel_ptr, sel_st, labels_ptr,
            lab_st, stats_ptr, inv_temperature,
            HAS_LP, HAS_REF, HAS_ENT, FROM_LOGITS, ON_POLICY, RATIO, VALIDATE, ACC, BLOCK_S,
            BLOCK_T, NUM_ERR)
    else:
        errs = _phase1_padded(
            pid * BLOCK_S, B, T, V, ws_ptr, errs,
            lp_ptr, lp_sb, lp_st, ref_ptr, ref_sb, ref_st, ent_ptr, ent_sb, ent_st,
            sel_ptr, sel_sb, sel_st, labels_ptr, lab_sb, lab_st, stats_ptr, inv_temperature,
            HAS_MASK, HAS_LP, HAS_REF, HAS_ENT, FROM_LOGITS, ON_POLICY, RATIO, VALIDATE, ACC,
            BLOCK_S, BLOCK_T, NUM_ERR)
    if VALIDATE:
        tl.store(part_errs_ptr + pid * NUM_ERR + tl.arange(0, NUM_ERR), errs)
    # every store of this program is made before its ticket is taken (release); the program
    # that draws the last ticket sees all of them (acquire) and finishes the job
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == num_programs - 1:
        tl.debug_barrier()
        _finish(B, V, ws_ptr, params_ptr, rewards_ptr, r_st, gid_ptr, gid_st, K, weights_ptr,
                w_st, loss_ptr, metrics_ptr, coef_ptr, scal_ptr, errs_ptr, part_errs_ptr,
                num_programs, LEVEL, RATIO, WEIGHTS, CENTER, ADAPTIVE, SCALE_REWARDS, HAS_IDS,
                HAS_ENT, ENT_IN_LOSS, BONUS, VALIDATE, ACC, BLOCK, NUM_ERR, NUM_PROG_BLOCK)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

_PARAMS_CACHE: Dict[tuple, torch.Tensor] = {}


def params_tensor(cfg, device, dtype) -> torch.Tensor:
    """The float hyperparameters (``PARAMS`` order, then 1/temperature) as a device tensor the
    kernels read: eager calls reuse one cached tensor per value set (no device op after the
    first call, so a captured CUDA graph replays with no host copy); under torch.compile the
    values may be symbolic and the tensor is part of the graph (changing α does not
    recompile)."""
    values = (cfg.alpha, cfg.mu, cfg.tau, cfg.tau_range[0], cfg.tau_range[1],
              cfg.reward_temperature, cfg.entropy_coef, _or_inf(cfg, "delta_clip"),
              _or_inf(cfg, "score_clip"), getattr(cfg, "direction_scale", 1.0),
              getattr(cfg, "logit_reg_coef", 0.0), 1.0 / cfg.temperature)
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, str(device), dtype)
    cached = _PARAMS_CACHE.get(key)
    if cached is None:
        if len(_PARAMS_CACHE) > 256:
            _PARAMS_CACHE.clear()
        cached = _PARAMS_CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
    return cached


def _or_inf(cfg, name: str) -> float:
    value = getattr(cfg, name, None)
    return math.inf if value is None else value


@dataclass
class EpilogueOut:
    """loss: 0-dim; metrics: [8] (``METRICS`` order; entropy_mean only when known);
    coef: [B, 2] per-sequence (a_s, z_s); scal: [2] = (b, ∂L/∂H_t), all per unit upstream
    gradient; errs: [NUM_ERR] int32 value-check counts (``ERRORS`` order; only when validating).
    """

    loss: torch.Tensor
    metrics: torch.Tensor
    coef: torch.Tensor
    scal: torch.Tensor
    errs: torch.Tensor


class Mode(NamedTuple):
    """The options the epilogue branches on, as ints (they travel through torch.library custom
    ops as an int list): level code, ratio coordinates, weights code, center, adaptive τ,
    scale_rewards="group", entropy bonus (β > 0)."""

    level: int
    ratio: int
    weights: int
    center: int
    adaptive: int
    scale_rewards: int
    bonus: int

    @classmethod
    def of(cls, cfg, has_weights: bool) -> Mode:
        return cls(LEVEL[cfg.level], int(cfg.coordinates == "ratio"),
                   WEIGHTS["tensor" if has_weights else cfg.weights], int(cfg.center_weights),
                   int(cfg.adaptive_tau), int(getattr(cfg, "scale_rewards", "none") == "group"),
                   int(cfg.entropy_coef > 0))


def run_epilogue(batch, mode: Mode, params: torch.Tensor, counter: torch.Tensor, *,
                 logprobs: Optional[torch.Tensor], entropy: Optional[torch.Tensor] = None,
                 stats: Optional[torch.Tensor] = None, from_logits: bool = True,
                 validate: bool = False) -> EpilogueOut:
    """One launch of ``epilogue_kernel``.

    batch: ``inputs.Batch`` (the caller's per-token tensors, read through their strides);
    mode: ``Mode.of(cfg, ...)``; params: ``params_tensor(cfg, ...)``.
    logprobs, entropy: [B, T] or [N] per-token values (the forward kernel's outputs viewed in
    the batch's layout, or the caller's tensors for the log-prob API); logprobs=None: counts
    only (the on-policy pre-pass, whose coefficients do not depend on the log-probs).
    stats: [N, 2] row statistics (from_logits: checked for finiteness when validating).
    counter: a zeroed int32 slot (the last-program ticket), used once.
    """
    cdtype = batch.compute_dtype
    device = batch.device
    B, N = batch.num_seqs, batch.num_rows
    packed = batch.seq_ids is not None
    T = N if packed else batch.seq_len
    has_ref = batch.ref_logprobs is not None and logprobs is not None
    has_ent = entropy is not None
    block_s = 32 if packed else 16
    num_programs = max(triton.cdiv(B, block_s), 1)
    ws = torch.empty((NUM_WS, max(B, 1)), dtype=cdtype, device=device)
    part_errs = torch.empty((num_programs if validate else 1, NUM_ERR), dtype=torch.int32,
                            device=device)
    out = EpilogueOut(loss=torch.empty((), dtype=cdtype, device=device),
                      metrics=torch.empty(len(METRICS), dtype=cdtype, device=device),
                      coef=torch.empty((max(B, 1), 2), dtype=cdtype, device=device),
                      scal=torch.empty(2, dtype=cdtype, device=device),
                      errs=torch.empty(NUM_ERR, dtype=torch.int32, device=device))
    sel = batch.seq_ids if packed else batch.mask
    lp = logprobs if logprobs is not None else ws
    dummy = ws
    epilogue_kernel[(num_programs,)](
        lp, *(small_geometry(logprobs) if logprobs is not None else (0, 0)),
        batch.ref_logprobs if has_ref else dummy, *small_geometry(batch.ref_logprobs),
        entropy if has_ent else dummy, *small_geometry(entropy),
        sel if sel is not None else dummy, *small_geometry(sel),
        batch.labels if from_logits and validate else dummy,
        *(small_geometry(batch.labels) if from_logits and validate else (0, 0)),
        stats if stats is not None else dummy,
        batch.rewards, batch.rewards.stride(0),
        batch.group_ids if batch.group_ids is not None else dummy,
        batch.group_ids.stride(0) if batch.group_ids is not None else 0,
        batch.weights if batch.weights is not None else dummy,
        batch.weights.stride(0) if batch.weights is not None else 0,
        params, ws, part_errs, counter,
        out.loss, out.metrics, out.coef, out.scal, out.errs,
        B, T, N, batch.vocab, batch.group_size or 1,
        PACKED=packed, HAS_MASK=batch.mask is not None, HAS_LP=logprobs is not None,
        HAS_REF=has_ref, HAS_ENT=has_ent, ENT_IN_LOSS=int(has_ent and mode.bonus), BONUS=mode.bonus,
        FROM_LOGITS=from_logits, ON_POLICY=int(batch.ref_logprobs is None),
        LEVEL=mode.level, RATIO=mode.ratio, WEIGHTS=mode.weights, CENTER=mode.center,
        ADAPTIVE=mode.adaptive, SCALE_REWARDS=mode.scale_rewards,
        HAS_IDS=batch.group_ids is not None, VALIDATE=int(validate and logprobs is not None),
        ACC=tl.float64 if cdtype == torch.float64 else tl.float32,
        BLOCK_S=block_s, BLOCK_T=128 if packed else 64, BLOCK=32, NUM_ERR=NUM_ERR,
        NUM_PROG_BLOCK=64, num_warps=4,
    )
    return out


def metric_keys(with_entropy: bool) -> List[str]:
    return list(METRICS if with_entropy else METRICS[:-1])


def unpack_metrics(metrics: torch.Tensor, with_entropy: bool) -> Dict[str, torch.Tensor]:
    """The [8] metrics vector as a dict of 0-dim views (no device op)."""
    return dict(zip(metric_keys(with_entropy), metrics.unbind(0)))


_MESSAGES = {
    "labels": "counted label(s) outside [0, V) (the vocabulary size V = {vocab})",
    "seq_ids": "seq_ids value(s) outside [-1, B={num_seqs})",
    "rewards": "non-finite rewards",
    "ref_logprobs": "non-finite ref_logprobs on counted tokens",
    "logits": "counted row(s) of logits with a non-finite value (NaN/+inf, or -inf at the label)",
    "weights": "non-finite values in the weights tensor",
    "mask": "mask value(s) other than 0/1",
    "logprobs": "non-finite logprobs on counted tokens",
    "entropy": "non-finite entropy on counted tokens",
}


def raise_bad_values(errs: torch.Tensor, batch) -> None:
    """Reads the value-check counts (the one host sync of validate=True) and raises a
    ValueError naming the first bad argument (seq_ids first: a bad one makes every other index
    wrong)."""
    counts = dict(zip(ERRORS, errs[:len(ERRORS)].tolist()))
    found = [name for name in ("seq_ids",) + ERRORS if counts[name]]
    if found:
        name = found[0]
        message = _MESSAGES[name].format(vocab=batch.vocab, num_seqs=batch.num_seqs)
        raise ValueError(f"{name}: {counts[name]} {message}")
