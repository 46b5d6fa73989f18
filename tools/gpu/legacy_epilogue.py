"""The epilogue as it was before it became one Triton launch (commit 630c99a,
opo_kernels/epilogue.py): O(N + B) torch ops with bucket scatters (a loss call made ~190 device
operations then, most of them here). Kept ONLY so that ``tools/gpu/epilogue_bench.py`` can time
the epilogue before and after the one-launch Triton epilogue on the same GPU in the same run,
and cross-check the two on CPU.
Not used by the package. Unchanged but for the imports, this docstring and batch.flat_ref
(the Batch now keeps the caller's [B, T] ref_logprobs).

Its original docstring follows.
The small part of the fused OPO loss: from per-token log-probs [N] to the loss, the metrics and
the per-token gradient coefficients c_t = ∂L/∂lp_t (docs/spec.md "Per sequence" to "The gradient").

Everything here is O(N + B) torch work with no host sync (no ``.item()``, no data-dependent
Python branch), so it can run inside CUDA graphs / ``torch.compile``. Groups are handled as B
"buckets" (a group id in [0, B), empty buckets ignored) with scatter reductions, instead of the
reference's dense [B, B] masks.

The gradient is written in closed form (the reference gets it from autograd, and the tests
compare the two). With ω, τ, p̃, Q constant (docs/spec.md):
  sequence levels: ∂L/∂v_s = −ω_s/M + μ·v_s/B',   c_t = ∂L/∂v_s · dv/dδ_s · dδ_s/dΔ_t
  token level:     ∂L/∂v_t = −ω_s/(M·n_s) + μ·v_t/N',   c_t = ∂L/∂v_t · dv_t/dΔ_t
with dv/dδ = e^δ (ratio) or 1 (log), dδ_s/dΔ_t = 1 ("sequence") or 1/n_s ("sequence_mean"),
and ∂L/∂H_t = −β/N' for the entropy bonus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from opo_kernels.config import OPOLossConfig
from opo_kernels.inputs import Batch

NEG_INF = float("-inf")


@dataclass
class EpilogueResult:
    """loss: 0-dim; metrics: detached 0-dim tensors; coef: [N] c_t per unit upstream gradient
    (0 on rows not counted); entropy_coef: 0-dim ∂L/∂H_t per unit upstream gradient."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor]
    coef: torch.Tensor
    entropy_coef: torch.Tensor


def per_sequence_sum(x: torch.Tensor, seq: torch.Tensor, num_seqs: int,
                     seq_len: Optional[int]) -> torch.Tensor:
    """Σ of x [N] over each sequence's counted tokens -> [B]. x must be 0 on rows not counted.

    Padded rows are summed along T (deterministic); packed rows with a scatter-add.
    """
    if seq_len is not None:
        return x.view(num_seqs, seq_len).sum(1)
    return x.new_zeros(num_seqs).index_add_(0, seq.clamp(min=0), x)


def _bucket_sum(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per-sequence total of x [B] over its group's bucket -> [B]."""
    return x.new_zeros(x.shape[0]).index_add_(0, group, x)[group]


def _bucket_max(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    out = x.new_full((x.shape[0],), NEG_INF).scatter_reduce_(0, group, x, "amax")
    return out[group]


def _group_log_softmax(x: torch.Tensor, group: torch.Tensor, valid: torch.Tensor):
    """log softmax of x [B] within each group over valid sequences (0 where not valid)."""
    masked = torch.where(valid, x, NEG_INF)
    m = _bucket_max(masked, group)
    m = torch.where(torch.isfinite(m), m, 0.0)
    total = _bucket_sum(torch.exp(masked - m), group)
    return torch.where(valid, x - m - torch.log(total.clamp(min=1e-300)), 0.0)


def _group_mean(x: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = _bucket_sum(valid.to(x.dtype), group).clamp(min=1)
    return _bucket_sum(torch.where(valid, x, 0.0), group) / count


def _tau(cfg: OPOLossConfig, ell, ell_ref, rewards, group, valid, n_valid, vocab: int):
    """docs/spec.md's τ (adaptive rule); log V floored at 1e-6 as in the reference."""
    if not cfg.adaptive_tau:
        return rewards.new_full((), cfg.tau)
    log_v = max(math.log(vocab), 1e-6)
    mean = lambda x: torch.where(valid, x, 0.0).sum() / n_valid  # noqa: E731
    h_static = mean((-ell_ref / log_v).clamp(0, 1))
    conf = 1 - mean((-ell / log_v).clamp(0, 1))
    adv = rewards - _group_mean(rewards, group, valid)
    a_min = torch.where(valid, adv, float("inf")).amin()
    a_max = torch.where(valid, adv, NEG_INF).amax()
    rho = 2 * mean((adv - a_min) / (a_max - a_min).clamp(min=1e-6)) - 1
    return (cfg.tau * (1 + 0.2 * h_static + 0.5 * conf * (-rho))).clamp(*cfg.tau_range)


def epilogue(cfg: OPOLossConfig, logprobs: torch.Tensor, ref_logprobs: Optional[torch.Tensor],
             entropy: Optional[torch.Tensor], seq: torch.Tensor, rewards: torch.Tensor,
             group: torch.Tensor, weights: Optional[torch.Tensor], vocab: int,
             seq_len: Optional[int]) -> EpilogueResult:
    """From per-row statistics to the loss and the gradient coefficients.

    logprobs, entropy: [N] compute dtype (any finite value on rows not counted);
    ref_logprobs: [N] or None (on-policy: the detached logprobs); seq: [N] (−1 = not counted);
    rewards, group, weights: [B]; seq_len: T for the padded layout, else None.
    """
    num_seqs = rewards.shape[0]
    counted = seq >= 0
    lp = torch.where(counted, logprobs, 0.0)
    ref = lp if ref_logprobs is None else torch.where(counted, ref_logprobs, 0.0)
    delta_t = lp - ref
    ones = counted.to(lp.dtype)
    n_s = per_sequence_sum(ones, seq, num_seqs, seq_len)
    S = per_sequence_sum(delta_t, seq, num_seqs, seq_len)
    L = per_sequence_sum(lp, seq, num_seqs, seq_len)
    R = per_sequence_sum(ref, seq, num_seqs, seq_len)
    valid = n_s > 0
    n_safe = n_s.clamp(min=1)
    n_valid = valid.sum().clamp(min=1)
    n_tokens = n_s.sum().clamp(min=1)
    # M = number of buckets holding at least one non-empty sequence
    n_groups = torch.zeros_like(n_s).index_add_(0, group, valid.to(lp.dtype))
    n_groups = (n_groups > 0).sum().clamp(min=1)
    if cfg.level == "sequence":
        delta, ell, ell_ref = S, L, R
    else:
        delta, ell, ell_ref = S / n_safe, L / n_safe, R / n_safe

    # ---- sampling geometry (constants for the gradient) ----
    tau = _tau(cfg, ell, ell_ref, rewards, group, valid, n_valid, vocab)
    log_q = _group_log_softmax(rewards / cfg.reward_temperature, group, valid)
    log_p = _group_log_softmax(delta / tau, group, valid)
    if weights is not None:
        omega = weights
    elif cfg.weights == "seed":
        omega = torch.exp((2 - cfg.alpha) * log_q - (1 - cfg.alpha) * log_p)
    else:
        omega = torch.exp(_group_log_softmax(cfg.alpha * log_q + (1 - cfg.alpha) * log_p,
                                             group, valid))
    if cfg.center_weights:
        omega = omega - _group_mean(omega, group, valid)
    omega = torch.where(valid, omega, 0.0)

    # ---- optimization geometry: loss and ∂L/∂lp_t ----
    if cfg.level == "token":
        ratio_t = torch.exp(delta_t)
        # v = e^Δ − 1 through expm1: no cancellation for the small log-ratios of RL batches
        v_t = torch.expm1(delta_t) if cfg.coordinates == "ratio" else delta_t
        v_t = torch.where(counted, v_t, 0.0)
        seq_c = seq.clamp(min=0)
        w_t = (omega / n_safe)[seq_c]
        policy = -(torch.where(counted, w_t * v_t, 0.0)).sum() / n_groups
        penalty = cfg.mu / 2 * (v_t * v_t).sum() / n_tokens
        dv = -w_t / n_groups + cfg.mu * v_t / n_tokens
        coef = dv * (ratio_t if cfg.coordinates == "ratio" else 1.0)
        v_mean = v_t.sum() / n_tokens
    else:
        ratio = torch.exp(delta)
        v = torch.where(valid, torch.expm1(delta) if cfg.coordinates == "ratio" else delta, 0.0)
        policy = -(omega * v).sum() / n_groups
        penalty = cfg.mu / 2 * (v * v).sum() / n_valid
        dv = torch.where(valid, -omega / n_groups + cfg.mu * v / n_valid, 0.0)
        # dv/dδ = e^δ: taken from the ratio itself, not as v + 1, which cancels when e^δ << 1
        coef_s = dv * (ratio if cfg.coordinates == "ratio" else 1.0)
        if cfg.level == "sequence_mean":
            coef_s = coef_s / n_safe
        coef = coef_s[seq.clamp(min=0)]
        v_mean = v.sum() / n_valid
    coef = torch.where(counted, coef, 0.0)
    loss = policy + penalty
    entropy_coef = -cfg.entropy_coef / n_tokens
    if entropy is not None:
        mean_entropy = torch.where(counted, entropy, 0.0).sum() / n_tokens
        loss = loss - cfg.entropy_coef * mean_entropy

    kl_t = torch.where(counted, torch.expm1(-delta_t) + delta_t, 0.0)  # expm1: no cancellation
    metrics = {
        "log_ratio_mean": delta_t.sum() / n_tokens,
        "kl_k3": kl_t.sum() / n_tokens,
        "v_mean": v_mean,
        "omega_mean": omega.sum() / n_valid,
        "omega_max": torch.where(valid.any(), torch.where(valid, omega, NEG_INF).amax(), 0.0),
        "tau": tau,
        "penalty": penalty,
    }
    if entropy is not None:
        metrics["entropy_mean"] = mean_entropy
    return EpilogueResult(loss, metrics, coef, entropy_coef.to(lp.dtype))


def batch_epilogue(cfg: OPOLossConfig, batch: Batch, logprobs: torch.Tensor,
                   entropy: Optional[torch.Tensor]) -> EpilogueResult:
    """``epilogue`` on prepared inputs (see ``inputs.prepare``)."""
    weights = None if batch.weights is None else batch.weights.to(batch.compute_dtype)
    return epilogue(cfg, logprobs, batch.flat_ref, entropy, batch.seq,
                    batch.rewards.to(batch.compute_dtype), batch.group, weights, batch.vocab,
                    batch.seq_len)
