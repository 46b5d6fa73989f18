"""The four losses the demo compares, on the same rollouts.

- ``opo_paper``: ``opo_loss`` with the paper's eq. 6 as first published (arXiv 2601.12415 v1:
  the package defaults: seed weights, ratio coordinates, sequence-mean level, adaptive τ, reward
  temperature 0.15), α and μ from the config; ``ref_logprobs`` = the sampling policy's
  log-probs.
- ``opo_paper_centered``: the same with ``center_weights=True``: ω − mean over the group, the
  update the later versions of the paper state (v5: v* = (ω_α − E[ω_α]) / μ).
- ``opo_author``: ``opo_loss(..., preset="author_verl")``, the author's verl recipe (centred
  escort weights, log-ratio coordinates, clamps, direction scale 1/α, Z-loss), same α and μ.
- ``gspo`` (Zheng et al. 2025, arXiv 2507.18071): s_i = exp(mean_t(log π − log π_old)) over the
  counted tokens, A_i = (r_i − mean_group r)/(std_group r + 1e−6),
  loss = −mean_i min(s_i·A_i, clip(s_i, 1 − ε_low, 1 + ε_high)·A_i), ε = 3e−4 / 4e−4.

Each returns (loss, {diagnostic: 0-dim tensor}).
"""

from __future__ import annotations

import torch

from ..fused_opo import opo_loss

METHODS = ("opo_paper", "opo_paper_centered", "opo_author", "gspo")
LABELS = {"opo_paper": "OPO (paper, eq. 6)", "opo_paper_centered": "OPO (paper, centred)",
          "opo_author": "OPO (author's recipe)", "gspo": "GSPO"}


def _opo(logits, completions, old, rewards, mask, cfg, **preset):
    loss, metrics = opo_loss(logits, completions, old, rewards, mask=mask,
                             group_size=cfg.group_size, alpha=cfg.alpha, mu=cfg.mu,
                             backend=cfg.backend, return_metrics=True, **preset)
    return loss, {"tau": metrics["tau"]}


def opo_paper(logits, completions, old, rewards, mask, cfg):
    return _opo(logits, completions, old, rewards, mask, cfg)


def opo_paper_centered(logits, completions, old, rewards, mask, cfg):
    return _opo(logits, completions, old, rewards, mask, cfg, center_weights=True)


def opo_author(logits, completions, old, rewards, mask, cfg):
    return _opo(logits, completions, old, rewards, mask, cfg, preset="author_verl")


def gspo(logits, completions, old, rewards, mask, cfg):
    """GSPO; the diagnostic is the fraction of sequences whose clipped term is active (they
    get no gradient)."""
    logp = logits.float().log_softmax(-1).gather(-1, completions[..., None])[..., 0]
    delta = logp - old
    if mask is None:
        mean_delta = delta.mean(dim=1)
    else:
        mean_delta = torch.where(mask, delta, 0.0).sum(1) / mask.sum(1).clamp(min=1)
    ratio = torch.exp(mean_delta)
    groups = rewards.view(-1, cfg.group_size)
    adv = ((groups - groups.mean(1, keepdim=True))
           / (groups.std(1, keepdim=True) + 1e-6)).view(-1)
    eps_low, eps_high = cfg.gspo_eps
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped * adv).mean()
    inactive = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    return loss, {"clip_frac": inactive.float().mean()}


OBJECTIVES = {"opo_paper": opo_paper, "opo_paper_centered": opo_paper_centered,
              "opo_author": opo_author, "gspo": gspo}
