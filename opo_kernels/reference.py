"""The OPO loss in plain PyTorch: the spec (``docs/spec.md``) in code, and the oracle of every
test and benchmark. Autograd does its backward.

It is written to be read, not to be fast: it materializes float32 log-softmax over the counted
rows and uses dense [B, B] "same group" masks for the group statistics. The fused path shares
no code with it: an online log-sum-exp over vocabulary blocks in its row kernels, and group
statistics reduced over tiles of same-group pairs in its epilogue kernel (docs/kernels.md).

Example::

    from opo_kernels import reference
    loss = reference.opo_loss(logits, labels, ref_logprobs, rewards, mask=mask, group_size=6)
    loss.backward()
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import torch

from .config import OPOLossConfig, make_config
from .epilogue.layout import NONFINITE_LOSS
from .inputs import Batch, check_values, prepare

NEG_INF = float("-inf")


def token_stats(logits2d: torch.Tensor, labels: torch.Tensor, temperature: float,
                with_entropy: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """docs/spec.md "Per token". logits2d: [n, V] counted rows; labels: [n] in [0, V).

    Returns (logprobs [n], logsumexp [n], entropy [n] or None) in float32 (float64 for float64
    logits); differentiable w.r.t. logits2d.
    """
    cdtype = torch.float64 if logits2d.dtype == torch.float64 else torch.float32
    z = logits2d.to(cdtype) / temperature
    lse = torch.logsumexp(z, dim=-1)
    log_p = z - lse[:, None]
    safe_labels = labels.clamp(0, z.shape[-1] - 1)  # out-of-range labels are reported later
    logprobs = log_p.gather(-1, safe_labels[:, None])[:, 0]
    entropy = None
    if with_entropy:
        p = log_p.exp()
        # p·log p with the convention 0·log 0 = 0 (a −inf logit has p = 0), NaN-free gradient
        entropy = -(p * log_p.masked_fill(p == 0, 0.0)).sum(-1)
    return logprobs, lse, entropy


@torch.no_grad()
def chunked_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                     chunk: int = 2048) -> torch.Tensor:
    """``token_stats``' log-probs without a gradient, by chunks of rows, so that a large
    (possibly strided, e.g. ``[:, :-1]``) logits tensor is never copied whole: for building
    ref_logprobs and oracles at production sizes.

    logits: [B, T, V] or [R, V]; labels: [B, T] or [R]. Returns labels' shape, float32
    (float64 for float64 logits).
    """
    if logits.dim() == 3:
        return torch.stack([chunked_logprobs(logits[i], labels[i], temperature, chunk)
                            for i in range(logits.shape[0])])
    parts = [token_stats(logits[i:i + chunk], labels[i:i + chunk], temperature, False)[0]
             for i in range(0, labels.shape[0], chunk)]
    if not parts:
        return logits.new_zeros((0,), dtype=torch.float64 if logits.dtype == torch.float64
                                else torch.float32)
    return torch.cat(parts)


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, x, 0).sum() / keep.sum().clamp(min=1)


def _group_log_softmax(x: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """log softmax of x [B] within each sequence's group; same[s, j]: j is in s's group."""
    scores = x[None, :].expand_as(same).masked_fill(~same, NEG_INF)
    return x - torch.logsumexp(scores, dim=1)


def adaptive_tau(cfg: OPOLossConfig, ell: torch.Tensor, ell_ref: torch.Tensor,
                 rewards: torch.Tensor, same: torch.Tensor, valid: torch.Tensor,
                 vocab: int) -> torch.Tensor:
    """docs/spec.md "Weights" (τ): the adaptive temperature of p̃ (detached inputs, a 0-dim tensor).

    log V is floored at 1e-6 so that V = 1 (every log-prob 0) gives h_static = 0, conf = 1.
    """
    log_v = max(math.log(vocab), 1e-6)
    h_static = _masked_mean((-ell_ref / log_v).clamp(0, 1), valid)
    conf = 1 - _masked_mean((-ell / log_v).clamp(0, 1), valid)
    group_mean_r = (same * rewards[None, :]).sum(1) / same.sum(1).clamp(min=1)
    adv = rewards - group_mean_r
    a_min = torch.where(valid, adv, float("inf")).min()
    a_max = torch.where(valid, adv, NEG_INF).max()
    spread = (a_max - a_min).clamp(min=1e-6)
    rho = 2 * _masked_mean((adv - a_min) / spread, valid) - 1
    tau = cfg.tau * (1 + 0.2 * h_static + 0.5 * conf * (-rho))
    return tau.clamp(*cfg.tau_range)


def _clamp(x: torch.Tensor, bound: Optional[float]) -> torch.Tensor:
    """clamp(x, −bound, bound) (torch.clamp: the gradient passes at the bounds); None: x."""
    return x if bound is None else x.clamp(-bound, bound)


def _q_logits(cfg: OPOLossConfig, rewards: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """What Q softmaxes (before the reward temperature): the rewards, or with
    scale_rewards="group" the advantages (r − mean_g r)/(std_g r + 1e−6), std unbiased over the
    group's non-empty sequences, 0 for a group of one."""
    if cfg.scale_rewards == "none":
        return rewards
    count = same.sum(1)
    mean = (same * rewards[None, :]).sum(1) / count.clamp(min=1)
    # torch.where, not same * (...): another group's squared deviation may overflow, and
    # 0 * inf is NaN
    dev2 = torch.where(same, (rewards[None, :] - mean[:, None]) ** 2, 0.0)
    var = dev2.sum(1) / (count - 1).clamp(min=1)
    return torch.where(count > 1, (rewards - mean) / (var.sqrt() + 1e-6), 0.0)


def objective(cfg: OPOLossConfig, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              entropy: Optional[torch.Tensor], seq: torch.Tensor, rewards: torch.Tensor,
              group: torch.Tensor, weights: Optional[torch.Tensor], vocab: int
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """docs/spec.md "Per sequence" to "The loss", over the n counted tokens.

    logprobs, ref_logprobs, entropy, seq: [n] (seq in [0, B)); rewards, group, weights: [B].
    Returns (loss 0-dim, metrics dict of detached 0-dim tensors).
    """
    if rewards.shape[0] == 0:
        # B = 0: one empty sequence stands in. Empty sequences are excluded from everything,
        # so nothing changes (loss 0, gradient 0), and every reduction below has an operand.
        rewards, group = rewards.new_zeros(1), group.new_zeros(1)
        weights = None if weights is None else weights.new_zeros(1)
    num_seqs = rewards.shape[0]
    dtype = logprobs.dtype
    member = torch.nn.functional.one_hot(seq, num_seqs).to(dtype)  # [n, B] token -> sequence
    n_s = member.sum(0)
    valid = n_s > 0  # empty sequences are excluded from everything
    n_tokens = logprobs.shape[0]

    delta_t = logprobs - ref_logprobs
    S, L, R = delta_t @ member, logprobs @ member, ref_logprobs @ member
    if cfg.level == "sequence":
        delta, ell, ell_ref = S, L, R
    else:
        n_safe = n_s.clamp(min=1)
        delta, ell, ell_ref = S / n_safe, L / n_safe, R / n_safe

    # ---- sampling geometry: no gradient flows through τ, Q, p̃, ω ----
    same = (group[:, None] == group[None, :]) & valid[None, :] & valid[:, None]
    if cfg.adaptive_tau:
        tau = adaptive_tau(cfg, ell.detach(), ell_ref, rewards, same, valid, vocab)
    else:
        tau = torch.tensor(cfg.tau, dtype=dtype, device=rewards.device)
    # docs/spec.md "Presets": δ̂ = clamp(δ) in p̃, the penalty and the Z-loss (not in the
    # direction term); the scores u = clamp(δ̂/τ) are p̃'s logits and the Z-loss's
    delta_hat = _clamp(delta, cfg.delta_clip)
    scores = _clamp(delta_hat / tau, cfg.score_clip)  # differentiable (the Z-loss)
    log_q = _group_log_softmax(_q_logits(cfg, rewards, same) / cfg.reward_temperature, same)
    log_p = _group_log_softmax(scores.detach(), same)
    if weights is not None:
        omega = weights.to(dtype)
    elif cfg.weights == "seed":
        omega = torch.exp((2 - cfg.alpha) * log_q - (1 - cfg.alpha) * log_p)
    else:  # escort
        omega = _group_log_softmax(cfg.alpha * log_q + (1 - cfg.alpha) * log_p, same).exp()
    omega = torch.where(valid, omega, 0.0)
    if cfg.center_weights:
        omega = omega - (same * omega[None, :]).sum(1) / same.sum(1).clamp(min=1)
    omega = torch.where(valid, omega, 0.0).detach()

    # ---- optimization geometry ----
    first_in_group = valid & ~(same & torch.ones_like(same).tril(-1)).any(1)
    n_groups = first_in_group.sum().clamp(min=1)
    n_valid = valid.sum().clamp(min=1)
    if cfg.level == "token":
        v_t = delta_t.exp() - 1 if cfg.coordinates == "ratio" else delta_t
        n_safe = n_s.clamp(min=1)
        policy = -((omega / n_safe)[seq] * v_t).sum() / n_groups
        penalty = cfg.mu / 2 * (v_t ** 2).sum() / max(n_tokens, 1)
        v_mean = v_t.mean() if n_tokens else v_t.sum()
    else:
        to_v = (lambda x: x.exp() - 1) if cfg.coordinates == "ratio" else (lambda x: x)
        v = torch.where(valid, to_v(delta), 0.0)          # the direction term: unclipped δ
        v_hat = torch.where(valid, to_v(delta_hat), 0.0)  # the penalty: δ̂
        policy = -(omega * v).sum() / n_groups
        penalty = cfg.mu / 2 * (v_hat ** 2).sum() / n_valid
        v_mean = v.sum() / n_valid
    # Z-loss: λ·(mean over the groups of logsumexp of their scores)²
    lse = torch.logsumexp(scores[None, :].expand_as(same).masked_fill(~same, NEG_INF), dim=1)
    z_bar = torch.where(first_in_group, lse, 0.0).sum() / n_groups
    loss = cfg.direction_scale * policy + penalty + cfg.logit_reg_coef * z_bar ** 2
    if entropy is not None and cfg.entropy_coef:  # (β = 0: no term, not 0·H, NaN for NaN H)
        loss = loss - cfg.entropy_coef * entropy.sum() / max(n_tokens, 1)

    d = delta_t.detach()
    metrics = {
        "log_ratio_mean": d.sum() / max(n_tokens, 1),
        "kl_k3": (torch.expm1(-d) + d).sum() / max(n_tokens, 1),  # exp(−Δ) − 1 + Δ
        "v_mean": v_mean.detach(),
        "omega_mean": omega.sum() / n_valid,
        "omega_max": torch.where(valid.any(), torch.where(valid, omega, NEG_INF).max(), 0.0),
        "tau": tau.detach(),
        "penalty": penalty.detach(),
    }
    if entropy is not None:
        metrics["entropy_mean"] = entropy.detach().sum() / max(n_tokens, 1)
    return loss, metrics


def _rewards_weights(batch: Batch):
    """(rewards, group, weights) for ``objective``: the caller's float dtype -> compute dtype."""
    weights = None if batch.weights is None else batch.weights.to(batch.compute_dtype)
    return batch.rewards.to(batch.compute_dtype), batch.group, weights


def loss_from_batch(batch: Batch, cfg: OPOLossConfig, explain=None):
    """The reference on prepared inputs (see ``inputs.prepare``); the torch backend.
    explain: the value checks' own messages (``inputs.check_values``)."""
    if cfg.inplace_backward:
        # autograd's backward cannot write into the logits. Say so rather than let a memory
        # plan built on it pass silently (the logits stay unchanged)
        warnings.warn("inplace_backward=True has no effect on the torch backend (the PyTorch "
                      "reference, which backend='auto' picks for CPU tensors without "
                      "TRITON_INTERPRET=1): the logits are left unchanged and the gradient "
                      "gets its own buffer", UserWarning, stacklevel=3)
    vocab = batch.vocab
    rows = batch.counted.nonzero()[:, 0]  # only counted rows are read
    logits2d = batch.logits.reshape(-1, vocab)[rows]
    labels = batch.flat_labels[rows]
    logprobs, lse, entropy = token_stats(logits2d, labels, cfg.temperature, cfg.with_entropy)
    # a counted label outside [0, V) has no log-prob: NaN, as on the fused path. validate=True
    # reports it; with validate=False the loss is NaN on both backends, never a finite guess
    in_vocab = (labels >= 0) & (labels < vocab)
    logprobs = torch.where(in_vocab, logprobs, math.nan)
    if entropy is not None:  # every metric NaN too, as the fused path gives
        entropy = torch.where(in_vocab, entropy, math.nan)
    if cfg.validate:
        lse_all = torch.zeros(batch.num_rows, dtype=lse.dtype, device=lse.device)
        lp_all = lse_all.clone()
        check_values(batch, lse_all.index_copy(0, rows, lse.detach()),
                     lp_all.index_copy(0, rows, logprobs.detach()), explain)
    if batch.ref_logprobs is None:  # on-policy: π_ref is the detached current policy
        ref = logprobs.detach()
    else:
        ref = batch.flat_ref[rows]
    loss, metrics = objective(cfg, logprobs, ref, entropy, batch.seq[rows],
                              *_rewards_weights(batch), vocab)
    _check_loss(cfg, loss)
    return (loss, metrics) if cfg.return_metrics else loss


def loss_from_logprobs_batch(batch: Batch, cfg: OPOLossConfig):
    """The reference from per-token log-probs (``inputs.prepare_logprobs``): the same objective,
    with autograd reaching the caller's logprobs (and entropy) tensors."""
    rows = batch.counted.nonzero()[:, 0]
    logprobs = batch.logprobs.reshape(-1)[rows].to(batch.compute_dtype)
    entropy = (None if batch.entropy is None
               else batch.entropy.reshape(-1)[rows].to(batch.compute_dtype))
    if cfg.validate:
        lp_all = torch.zeros(batch.num_rows, dtype=logprobs.dtype, device=logprobs.device)
        check_values(batch, None, lp_all.index_copy(0, rows, logprobs.detach()))
    ref = logprobs.detach() if batch.ref_logprobs is None else batch.flat_ref[rows]
    loss, metrics = objective(cfg, logprobs, ref, entropy, batch.seq[rows],
                              *_rewards_weights(batch), batch.vocab)
    _check_loss(cfg, loss)
    return (loss, metrics) if cfg.return_metrics else loss


def _check_loss(cfg: OPOLossConfig, loss: torch.Tensor) -> None:
    """The fused path's last value check: finite inputs (checked before) whose loss overflows.
    (The fused path also checks its per-sequence gradient coefficients; here autograd forms
    the gradient later.)"""
    if cfg.validate and not bool(torch.isfinite(loss)):
        raise ValueError(NONFINITE_LOSS)


def opo_loss(logits, labels, ref_logprobs, rewards, *, mask=None, seq_ids=None,
             group_size=None, group_ids=None, **options):
    """Reference OPO loss (docs/spec.md): the result of ``opo_kernels.opo_loss`` with the same
    arguments, on one process.

    logits: [B, T, V] with labels/ref_logprobs/mask [B, T], or [N, V] with labels/ref_logprobs/
    seq_ids [N]; rewards: [B]; one of group_size / group_ids [B]. ``options`` are the fields of
    ``OPOLossConfig`` (alpha, mu, tau, ...). What it lacks: ``process_group`` and
    ``vocab_start`` (no vocabulary-parallel logits; passing either is a TypeError). Options that
    are about the fused kernels change nothing here: ``backend`` is ignored, ``grad_to_base``
    and ``vocab_parallel_one_pass`` have no effect (autograd's own slice backward runs),
    ``inplace_backward=True`` warns and leaves the logits unchanged, and ``validate="deferred"``
    reads the checks at once, like True. The counted rows of logits are copied (a view too).
    """
    cfg = make_config(options)
    batch = prepare(logits, labels, ref_logprobs, rewards, mask=mask, seq_ids=seq_ids,
                    group_size=group_size, group_ids=group_ids, config=cfg)
    return loss_from_batch(batch, cfg)
