"""Phase 2 of the epilogue, run by the last program: groups, τ, Q, p̃, ω, the loss, the
metrics and the per-sequence coefficients (closed forms in the package docstring)."""

import triton
import triton.language as tl

from ..triton_math import expm1
from .groups import _clamp, _clamp01, _gid, _group_lse, _group_sum, _group_tile, _j_range, _ws
from .layout import (
    W_COUNT,
    W_DELTA,
    W_ENT,
    W_FIRST,
    W_GROUP_MEAN_R,
    W_GROUP_SIZE,
    W_KL,
    W_LOG_P,
    W_LOG_Q,
    W_LP,
    W_LSE_U,
    W_OMEGA,
    W_Q_LOGIT,
    W_REF,
    W_SCORE,
    W_V,
    W_V2,
)


@triton.jit
def _counts(ws_ptr, B, i, i_in):
    """(n_s, n_s > 0, max(n_s, 1)) of sequences i: counted tokens, non-empty, a safe divisor."""
    n = _ws(ws_ptr, B, W_COUNT, i, i_in)
    return n, n > 0, tl.maximum(n, 1.0)


@triton.jit
def _delta(ws_ptr, B, i, i_in, n_safe, sequence_mean):
    """δ_s of sequences i: the sum of Δ over their counted tokens, or its mean."""
    delta = _ws(ws_ptr, B, W_DELTA, i, i_in)
    if sequence_mean:
        delta = delta / n_safe
    return delta


@triton.jit
def _reward(rewards_ptr, r_st, i, i_in, ACC: tl.constexpr):
    """The rewards of sequences i (0 outside [0, B))."""
    return tl.load(rewards_ptr + i.to(tl.int64) * r_st, mask=i_in, other=0.0).to(ACC)


@triton.jit
def _advantage(ws_ptr, B, rewards_ptr, r_st, i, i_in, ACC: tl.constexpr):
    """r_s − the mean reward of s's group (written by pass A)."""
    return _reward(rewards_ptr, r_st, i, i_in, ACC) - _ws(ws_ptr, B, W_GROUP_MEAN_R, i, i_in)


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
    # sequences whose log-prob or reference sums are not finite (validate=False lets them
    # through): the loss and every metric are then NaN, not a finite number that clamps and
    # maxima would make of a NaN (tl.maximum drops NaN operands)
    bad_sums = tl.zeros([], tl.int32)
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        n, valid, n_safe = _counts(ws_ptr, B, i, i_in)
        ell = _ws(ws_ptr, B, W_LP, i, i_in)
        ell_ref = _ws(ws_ptr, B, W_REF, i, i_in)
        bad_sums += tl.sum((i_in & ((ell != ell) | (tl.abs(ell) == float("inf"))
                                    | (ell_ref != ell_ref) | (tl.abs(ell_ref) == float("inf")))
                            ).to(tl.int32), 0)
        if sequence_mean:
            ell = ell / n_safe
            ell_ref = ell_ref / n_safe
        n_valid += tl.sum(valid.to(ACC), 0)
        n_tokens += tl.sum(n, 0)
        sum_d += tl.sum(_ws(ws_ptr, B, W_DELTA, i, i_in), 0)
        sum_kl += tl.sum(_ws(ws_ptr, B, W_KL, i, i_in), 0)
        sum_h += tl.sum(_ws(ws_ptr, B, W_ENT, i, i_in), 0)
        sum_v1 += tl.sum(_ws(ws_ptr, B, W_V, i, i_in), 0)
        sum_v2 += tl.sum(_ws(ws_ptr, B, W_V2, i, i_in), 0)
        sum_hs += tl.sum(tl.where(valid, _clamp01(-ell_ref / log_v), 0.0), 0)
        sum_conf += tl.sum(tl.where(valid, _clamp01(-ell / log_v), 0.0), 0)
        r = _reward(rewards_ptr, r_st, i, i_in, ACC)
        bad_rewards += tl.sum((i_in & ((r != r) | (tl.abs(r) == float("inf")))).to(tl.int32), 0)
        if WEIGHTS == 2:
            w = tl.load(weights_ptr + i.to(tl.int64) * w_st, mask=i_in, other=0.0).to(ACC)
            bad_weights += tl.sum((i_in & ((w != w) | (tl.abs(w) == float("inf")))
                                   ).to(tl.int32), 0)
        # Q's logits (with scale_rewards, replaced below by the scaled advantages)
        tl.store(ws_ptr + W_Q_LOGIT * B + i, r / reward_t, mask=i_in)
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
            rj = _reward(rewards_ptr, r_st, j, j_in, ACC)
            count += tl.sum(same.to(ACC), 1)
            before += tl.sum((same & (j[None, :] < i[:, None])).to(ACC), 1)
            sum_r += tl.sum(tl.where(same, rj[None, :], 0.0), 1)
        valid = _ws(ws_ptr, B, W_COUNT, i, i_in) > 0
        first = valid & (before == 0)
        n_groups += tl.sum(first.to(ACC), 0)
        tl.store(ws_ptr + W_GROUP_SIZE * B + i, count, mask=i_in)
        tl.store(ws_ptr + W_GROUP_MEAN_R * B + i, sum_r / tl.maximum(count, 1.0), mask=i_in)
        tl.store(ws_ptr + W_FIRST * B + i, first.to(ACC), mask=i_in)
    n_groups_safe = tl.maximum(n_groups, 1.0)
    tl.debug_barrier()

    # ---- τ (docs/spec.md's adaptive rule) over the non-empty sequences ----
    a_min = tl.full([], float("inf"), ACC)
    a_max = tl.full([], float("-inf"), ACC)
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        valid = _ws(ws_ptr, B, W_COUNT, i, i_in) > 0
        adv = _advantage(ws_ptr, B, rewards_ptr, r_st, i, i_in, ACC)
        a_min = tl.minimum(a_min, tl.min(tl.where(valid, adv, float("inf")), 0))
        a_max = tl.maximum(a_max, tl.max(tl.where(valid, adv, float("-inf")), 0))
    spread = tl.maximum(a_max - a_min, 1e-6)
    sum_rho = zero
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        valid = _ws(ws_ptr, B, W_COUNT, i, i_in) > 0
        adv = _advantage(ws_ptr, B, rewards_ptr, r_st, i, i_in, ACC)
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
        _, _, n_safe = _counts(ws_ptr, B, i, i_in)
        delta = _delta(ws_ptr, B, i, i_in, n_safe, sequence_mean)
        u = _clamp(_clamp(delta, delta_clip) / tau, score_clip)
        tl.store(ws_ptr + W_SCORE * B + i, u, mask=i_in)
        if SCALE_REWARDS:
            dev = _advantage(ws_ptr, B, rewards_ptr, r_st, i, i_in, ACC)
            tl.store(ws_ptr + W_LOG_Q * B + i, dev * dev, mask=i_in)  # scratch for the variance
    tl.debug_barrier()
    if SCALE_REWARDS:  # Q from group-normalized advantages (unbiased std; one member: A = 0)
        for i0 in range(0, B, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            i_in = i < B
            ss = _group_sum(ws_ptr, B, W_LOG_Q, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
            count = _ws(ws_ptr, B, W_GROUP_SIZE, i, i_in)
            std = tl.sqrt(ss / tl.maximum(count - 1, 1.0))
            adv = _advantage(ws_ptr, B, rewards_ptr, r_st, i, i_in, ACC)
            adv = tl.where(count > 1, adv / (std + 1e-6), 0.0)
            tl.store(ws_ptr + W_Q_LOGIT * B + i, adv / reward_t, mask=i_in)
        tl.debug_barrier()

    # ---- log Q, log p̃ and the group logsumexp of u ----
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        lse_x = _group_lse(ws_ptr, B, W_Q_LOGIT, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
        lse_u = _group_lse(ws_ptr, B, W_SCORE, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
        tl.store(ws_ptr + W_LOG_Q * B + i, _ws(ws_ptr, B, W_Q_LOGIT, i, i_in) - lse_x, mask=i_in)
        tl.store(ws_ptr + W_LOG_P * B + i, _ws(ws_ptr, B, W_SCORE, i, i_in) - lse_u, mask=i_in)
        tl.store(ws_ptr + W_LSE_U * B + i, lse_u, mask=i_in)
    tl.debug_barrier()

    # ---- ω (sampling geometry; constants for the gradient) ----
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        log_q = _ws(ws_ptr, B, W_LOG_Q, i, i_in)
        log_p = _ws(ws_ptr, B, W_LOG_P, i, i_in)
        if WEIGHTS == 0:    # seed: Q^(2−α)·p̃^(α−1)
            omega = tl.exp((2 - alpha) * log_q - (1 - alpha) * log_p)
        elif WEIGHTS == 1:  # escort: logits of the normalized Q^α·p̃^(1−α), softmaxed below
            omega = alpha * log_q + (1 - alpha) * log_p
        else:
            omega = tl.load(weights_ptr + i.to(tl.int64) * w_st, mask=i_in, other=0.0).to(ACC)
        tl.store(ws_ptr + W_OMEGA * B + i, omega, mask=i_in)
    tl.debug_barrier()
    if WEIGHTS == 1:
        for i0 in range(0, B, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            i_in = i < B
            lse_y = _group_lse(ws_ptr, B, W_OMEGA, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
            y = _ws(ws_ptr, B, W_OMEGA, i, i_in)
            # other blocks still read this block's y: ω goes to row 13 (log Q, consumed above)
            tl.store(ws_ptr + W_LOG_Q * B + i, tl.exp(y - lse_y), mask=i_in)
        tl.debug_barrier()
        for i0 in range(0, B, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            i_in = i < B
            tl.store(ws_ptr + W_OMEGA * B + i, _ws(ws_ptr, B, W_LOG_Q, i, i_in), mask=i_in)
        tl.debug_barrier()
    for i0 in range(0, B, BLOCK):  # ω = 0 off the non-empty sequences (before centring)
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        valid = _ws(ws_ptr, B, W_COUNT, i, i_in) > 0
        tl.store(ws_ptr + W_OMEGA * B + i, tl.where(valid, _ws(ws_ptr, B, W_OMEGA, i, i_in), 0.0),
                 mask=i_in)
    tl.debug_barrier()
    if CENTER:
        for i0 in range(0, B, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            i_in = i < B
            total = _group_sum(ws_ptr, B, W_OMEGA, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
            mean = total / tl.maximum(_ws(ws_ptr, B, W_GROUP_SIZE, i, i_in), 1.0)
            tl.store(ws_ptr + W_LOG_Q * B + i, _ws(ws_ptr, B, W_OMEGA, i, i_in) - mean, mask=i_in)
        tl.debug_barrier()
        for i0 in range(0, B, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            i_in = i < B
            valid = _ws(ws_ptr, B, W_COUNT, i, i_in) > 0
            centred = _ws(ws_ptr, B, W_LOG_Q, i, i_in)  # the scratch row holds ω − mean ω
            tl.store(ws_ptr + W_OMEGA * B + i, tl.where(valid, centred, 0.0), mask=i_in)
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
        _, valid, n_safe = _counts(ws_ptr, B, i, i_in)
        omega = _ws(ws_ptr, B, W_OMEGA, i, i_in)
        omega_sum += tl.sum(omega, 0)
        omega_max = tl.maximum(omega_max, tl.max(tl.where(valid, omega, float("-inf")), 0))
        first = _ws(ws_ptr, B, W_FIRST, i, i_in) > 0
        z_sum += tl.sum(tl.where(first, _ws(ws_ptr, B, W_LSE_U, i, i_in), 0.0), 0)
        if LEVEL == 2:
            policy += tl.sum(omega / n_safe * _ws(ws_ptr, B, W_V, i, i_in), 0)
        else:
            delta = _delta(ws_ptr, B, i, i_in, n_safe, sequence_mean)
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
    # finite inputs can still overflow here (large log-ratios: exp(δ), ω); counted for the
    # value checks, after every input's own count (an input's error is reported first)
    bad_out = ((loss != loss) | (tl.abs(loss) == float("inf"))).to(tl.int32)

    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        _, valid, n_safe = _counts(ws_ptr, B, i, i_in)
        omega = _ws(ws_ptr, B, W_OMEGA, i, i_in)
        delta = _delta(ws_ptr, B, i, i_in, n_safe, sequence_mean)
        delta_in = tl.abs(delta) <= delta_clip      # torch.clamp passes the gradient at bounds
        delta_hat = _clamp(delta, delta_clip)
        u_in = tl.abs(delta_hat / tau) <= score_clip
        p_tilde = tl.exp(_ws(ws_ptr, B, W_LOG_P, i, i_in))
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
            # the counts divide first, as autograd's chain does on the torch backend: the
            # products of two exponentials may overflow before the division otherwise
            a = -direction / n_groups_safe * omega * dv \
                + tl.where(delta_in, mu / n_valid_safe * v_hat * dv_hat, 0.0) + dz
            if sequence_mean:
                a = a / n_safe
            z = tl.zeros([BLOCK], ACC)
        tl.store(coef_ptr + 2 * i, tl.where(valid, a, 0.0), mask=i_in)
        tl.store(coef_ptr + 2 * i + 1, tl.where(valid, z, 0.0), mask=i_in)
        bad_out += tl.sum((valid & ((a != a) | (tl.abs(a) == float("inf")) | (z != z)
                                    | (tl.abs(z) == float("inf")))).to(tl.int32), 0)

    nan = tl.where(bad_sums > 0, float("nan"), 0.0)
    tl.store(loss_ptr, loss + nan)
    if LEVEL == 2:
        tl.store(scal_ptr, mu / n_tokens_safe)
    else:
        tl.store(scal_ptr, 0.0)
    if BONUS:  # ∂L/∂H_t, also in the on-policy pre-pass (which has no entropy values yet)
        tl.store(scal_ptr + 1, -beta / n_tokens_safe)
    else:
        tl.store(scal_ptr + 1, 0.0)
    tl.store(metrics_ptr + 0, sum_d / n_tokens_safe + nan)
    tl.store(metrics_ptr + 1, sum_kl / n_tokens_safe + nan)
    tl.store(metrics_ptr + 2, v_mean + nan)
    tl.store(metrics_ptr + 3, omega_sum / n_valid_safe + nan)
    tl.store(metrics_ptr + 4, tl.where(n_valid > 0, omega_max, 0.0) + nan)
    tl.store(metrics_ptr + 5, tau + nan)
    tl.store(metrics_ptr + 6, penalty + nan)
    if HAS_ENT:
        tl.store(metrics_ptr + 7, mean_entropy)  # (defined whatever the labels are)
    if VALIDATE:  # Σ over programs of their counts, plus the checks of [B] inputs
        e = tl.arange(0, NUM_ERR)
        errs = tl.zeros([NUM_ERR], tl.int32)
        for p0 in range(0, num_programs, NUM_PROG_BLOCK):
            p = p0 + tl.arange(0, NUM_PROG_BLOCK)
            part = tl.load(part_errs_ptr + p[:, None] * NUM_ERR + e[None, :],
                           mask=(p < num_programs)[:, None], other=0, cache_modifier=".cg")
            errs += tl.sum(part, 0)
        errs += tl.where(e == 2, bad_rewards, 0) + tl.where(e == 5, bad_weights, 0) \
            + tl.where(e == 9, bad_out, 0)
        tl.store(errs_ptr + e, errs)
