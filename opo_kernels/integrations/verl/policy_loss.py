"""The ``opo_kernels`` policy loss (verl's policy-loss hook) and its config class
``OPOPolicyLossConfig`` (the OPO options under ``actor.policy_loss.opo``).

Each call gets one micro-batch of one data-parallel rank and computes OPO over the whole prompt
groups it holds (the group tags written by the estimator, ``advantages.py``); ``data_parallel.py``
makes verl's trainers deliver whole groups to every micro-batch. See the package docstring.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from verl.trainer.ppo import core_algos
from verl.workers.config import PolicyLossConfig

from ...config import OPTIONS, OPOLossConfig
from ...from_logprobs import opo_loss_from_logprobs
from ...validation import check_deferred
from ..agree import distributed, raise_together
from .advantages import ESTIMATOR, config_get, decode_advantages

LOSS_MODE = "opo_kernels"

# opo_loss options that cannot apply inside verl's hook, and why.
_REFUSED_OPTIONS = {
    "temperature": "verl's log-probs are already of the sampling distribution (logits divided "
                   "by rollout.temperature); leave it out",
    "entropy_coef": "verl's policy-loss hook never receives the entropy; use "
                    "actor.entropy_coeff with actor.loss_agg_mode=token-mean instead (that adds "
                    "exactly -beta * mean entropy over counted tokens)",
    "compute_entropy": "verl's policy-loss hook never receives the entropy",
    "inplace_backward": "there are no logits in verl's policy-loss hook",
    "grad_to_base": "there are no logits in verl's policy-loss hook",
    "vocab_parallel_one_pass": "there are no logits in verl's policy-loss hook",
    "return_metrics": "the integration always returns OPO's metrics to verl",
}


def _opo_options(opo: Any) -> tuple[dict, Optional[int]]:
    """Validated ``opo_loss`` options and the ``vocab_size`` override from a policy-loss
    ``opo`` mapping (dict or omegaconf DictConfig)."""
    if opo is None:
        return {}, None
    if not isinstance(opo, Mapping):
        raise TypeError(f"actor.policy_loss.opo must be a mapping of opo_loss options, got "
                        f"{type(opo).__name__}")
    options = {str(k): (tuple(v) if isinstance(v, (list, tuple)) or type(v).__name__ ==
                        "ListConfig" else v) for k, v in opo.items()}
    vocab_size = options.pop("vocab_size", None)
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"actor.policy_loss.opo.vocab_size must be a positive int, got "
                         f"{vocab_size!r}")
    for key, why in _REFUSED_OPTIONS.items():
        if key in options:
            raise ValueError(f"actor.policy_loss.opo.{key} is not supported with verl: {why}")
    unknown = options.keys() - OPTIONS
    if unknown:
        known = sorted(OPTIONS - _REFUSED_OPTIONS.keys())
        raise ValueError(f"actor.policy_loss.opo has unknown option(s) {sorted(unknown)}; "
                         f"known: {known} and vocab_size")
    OPOLossConfig(**options)  # the same checks as opo_loss, at config time
    return options, vocab_size


@dataclass
class OPOPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus ``opo``: the OPO options (package docstring).

    Select it with ``actor.policy_loss._target_=opo_kernels.integrations.verl.OPOPolicyLossConfig``;
    ``loss_mode`` then defaults to ``opo_kernels``. Example (Python)::

        OPOPolicyLossConfig(opo={"alpha": 0.6, "mu": 1.0, "adaptive_tau": True})
    """

    loss_mode: str = LOSS_MODE
    opo: dict = field(default_factory=dict)

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        _opo_options(self.opo)  # bad options fail when verl builds the actor config


@functools.cache
def dynamic_batches_keep_groups() -> bool:
    """Whether verl's token-count micro-batching (``actor.use_dynamic_bsz=True``) can keep runs
    of rows together: its ``rearrange_micro_batches`` takes ``force_group_size`` (0.9.1 does),
    which ``data_parallel.py`` sets to rollout.n for the actor's update."""
    from verl.utils import seqlen_balancing

    fn = getattr(seqlen_balancing, "rearrange_micro_batches", None)
    return fn is not None and "force_group_size" in inspect.signature(fn).parameters


def check_actor_config(config, loss_agg_mode: str):
    """Refuse the actor settings that break groups or change OPO's objective.

    config: the actor config (verl's dataclass in the workers, or the ``actor_rollout_ref.actor``
    DictConfig in the trainer, which runs this once its workers are up, before the first
    rollout: data_parallel.check_at_start)."""
    group = config_get(config, "rollout_n")
    dynamic = bool(config_get(config, "use_dynamic_bsz", False))
    if dynamic and not dynamic_batches_keep_groups():
        raise ValueError("opo_kernels policy loss: actor.use_dynamic_bsz=True re-forms "
                         "micro-batches by token count and this verl's "
                         "rearrange_micro_batches cannot keep prompt groups whole (no "
                         "force_group_size); set actor.use_dynamic_bsz=False and "
                         "actor.ppo_micro_batch_size_per_gpu to a multiple of rollout.n, or "
                         "upgrade verl")
    if config_get(config, "shuffle", False):
        raise ValueError("opo_kernels policy loss: actor.shuffle=True draws mini-batches in "
                         "random order and splits prompt groups; set actor.shuffle=False")
    micro = None if dynamic else config_get(config, "ppo_micro_batch_size_per_gpu")
    if isinstance(group, int) and isinstance(micro, int) and micro % group:
        raise ValueError(f"opo_kernels policy loss: actor.ppo_micro_batch_size_per_gpu={micro} "
                         f"is not a multiple of rollout.n={group}: a micro-batch must hold whole "
                         f"prompt groups")
    if config_get(config, "use_kl_loss", False):
        raise ValueError("opo_kernels policy loss: actor.use_kl_loss=True adds a KL-to-reference "
                         "term that OPO does not have (its trust region is the chi^2 term, "
                         "policy_loss.opo.mu); set actor.use_kl_loss=False")
    if config_get(config, "entropy_coeff", 0.0) and loss_agg_mode != "token-mean":
        raise ValueError(f"opo_kernels policy loss: actor.entropy_coeff with loss_agg_mode="
                         f"{loss_agg_mode!r} is not OPO's entropy bonus (a mean over counted "
                         f"tokens); set actor.loss_agg_mode=token-mean")


def check_rank_share(mini_batch_rows, dp_size, group_size):
    """Each data-parallel rank's part of a mini-batch (mini_batch_rows / dp_size responses) must
    be whole prompt groups of group_size. The same on every rank, so every rank refuses alike."""
    if not all(isinstance(v, int) and v > 0 for v in (mini_batch_rows, dp_size, group_size)):
        return
    if mini_batch_rows % dp_size or (mini_batch_rows // dp_size) % group_size:
        raise ValueError(
            f"opo_kernels policy loss: a mini-batch of {mini_batch_rows} responses "
            f"(actor.ppo_mini_batch_size x rollout.n) gives each of the {dp_size} data-parallel "
            f"ranks {mini_batch_rows / dp_size:g} responses, not whole prompt groups of "
            f"rollout.n={group_size}: set actor.ppo_mini_batch_size to a multiple of {dp_size} "
            f"(the data-parallel size)")


def _vocab_size(config, override: Optional[int]) -> Optional[int]:
    if override is not None:
        return override
    hf_config = config_get(config_get(config, "model_config"), "hf_config")
    vocab = getattr(hf_config, "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def _check_groups(group, size, nonempty, untagged_hint: str):
    """Every counted row tagged, and every group present in the micro-batch complete."""
    if bool((nonempty & (group == 0)).any()):
        raise ValueError(f"opo_kernels policy loss: a response's advantages carry no group tag "
                         f"{untagged_hint}")
    counted = group[nonempty]
    if counted.numel() == 0:
        return
    ids, counts = torch.unique(counted, return_counts=True)
    expected = torch.zeros_like(ids)
    expected.scatter_reduce_(0, torch.searchsorted(ids, counted), size[nonempty], "amax",
                             include_self=False)
    broken = counts != expected
    if bool(broken.any()):
        i = int(broken.nonzero()[0, 0])
        raise ValueError(
            f"opo_kernels policy loss: a prompt group has {int(counts[i])} of its "
            f"{int(expected[i])} non-empty responses in this micro-batch ({int(broken.sum())} "
            f"group(s) incomplete): OPO needs whole groups per micro-batch. verl's trainers keep "
            f"them whole when algorithm.adv_estimator={ESTIMATOR}; something else reordered or "
            f"split the batch (actor.use_dynamic_bsz, actor.shuffle, a micro-batch size that is "
            f"not a multiple of rollout.n, a trainer or recipe that partitions the batch its own "
            f"way, or the legacy trainer with trainer.balance_batch=False and a data-parallel "
            f"size that does not divide actor.ppo_mini_batch_size)")


@core_algos.register_policy_loss(LOSS_MODE)
def compute_policy_loss_opo_kernels(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                    advantages: torch.Tensor, response_mask: torch.Tensor,
                                    loss_agg_mode: str = "token-mean", config=None,
                                    rollout_is_weights: Optional[torch.Tensor] = None):
    """verl policy loss ``opo_kernels``: the OPO loss of one micro-batch.

    old_log_prob (π_ref), log_prob (differentiable), advantages (from the ``opo_kernels``
    estimator), response_mask: [b, T], as verl's ``ppo_loss`` passes them. config: the actor
    config (OPO options under ``policy_loss.opo``; ``global_batch_info`` for the scale).
    Returns ``(loss, metrics)``: ``opo_loss_from_logprobs`` over the micro-batch's groups times
    rows·dp_size/global_batch_size (package docstring), and OPO's metrics as floats.
    """
    if rollout_is_weights is not None:
        raise ValueError("opo_kernels policy loss: rollout-correction importance weights "
                         "(algorithm.rollout_correction) have no place in OPO's loss; disable "
                         "them (bypass mode, old_log_prob = rollout log-probs, is fine)")
    check_actor_config(config, loss_agg_mode)
    info = config_get(config, "global_batch_info") or {}
    dp_size = info.get("dp_size", 1) or 1
    global_batch_size = info.get("global_batch_size")
    check_rank_share(global_batch_size, dp_size, config_get(config, "rollout_n"))
    options, vocab_override = _opo_options(config_get(config_get(config, "policy_loss"), "opo"))
    vocab_size = _vocab_size(config, vocab_override)
    if vocab_size is None and options.get("adaptive_tau", True):
        raise ValueError("opo_kernels policy loss: the adaptive tau rule needs the vocabulary "
                         "size and the actor config has no model_config.hf_config.vocab_size: "
                         "set actor.policy_loss.opo.vocab_size (or opo.adaptive_tau=false)")

    # verl's global-batch normalisation (agg_loss): the sum over micro-batches and the mean
    # over data-parallel ranks of rows·dp/global_batch_size·L is a weighted mean of the L's.
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("opo_kernels policy loss: global_batch_size is required when "
                             "dp_size > 1")
        scale = 1.0
    else:
        scale = log_prob.shape[0] * dp_size / global_batch_size

    # What the micro-batch's data can fail (group tags, whole groups, the value checks; or
    # any other error of this call, out of memory included) is raised on every rank together
    # under FSDP: otherwise the failing rank stops and the others wait in FSDP's next
    # collective until its timeout.
    error = None
    try:
        loss, values = _loss_and_metrics(log_prob, old_log_prob, advantages, response_mask,
                                         vocab_size, options)
    except Exception as err:
        error = err
    if _agrees(config):
        raise_together(error, lambda failed: RuntimeError(
            f"opo_kernels policy loss: the micro-batch of rank(s) {failed} failed (their error "
            "says why: bad input, or e.g. out of memory); stopping on this rank too"))
    elif error is not None:
        raise error
    return loss * scale, values


def _loss_and_metrics(log_prob, old_log_prob, advantages, response_mask, vocab_size, options):
    """OPO over the micro-batch's groups and its metrics as floats; raises ValueError for bad
    input, the value checks included: they are read at the metrics' one host sync (the loss
    validates with "deferred", so that read does not wait again)."""
    rewards, group, size = decode_advantages(advantages)
    mask = response_mask.bool()
    _check_groups(group, size, mask.any(dim=-1),
                  f"(set algorithm.adv_estimator={ESTIMATOR} with policy_loss.loss_mode="
                  f"{LOSS_MODE})")
    loss, metrics = opo_loss_from_logprobs(
        log_prob, old_log_prob, rewards.to(log_prob.device), mask=mask, group_ids=group,
        vocab_size=vocab_size, return_metrics=True, **{"validate": "deferred", **options})
    names = sorted(metrics)
    values = torch.stack([metrics[k].float() for k in names]).tolist()  # one host sync
    check_deferred()  # this call's checks: on the host already (the sync above)
    return loss, {f"actor/opo_{k}": v for k, v in zip(names, values)}


def _agrees(config) -> bool:
    """Whether the data errors are agreed over torch.distributed's default group: with more
    than one process under verl's FSDP strategies, where every rank computes the loss of the
    same number of micro-batches (fixed micro-batch sizes, checked above). Not under Megatron,
    whose pipeline stages do not all compute the loss."""
    return distributed() and str(config_get(config, "strategy") or "fsdp") in ("fsdp", "fsdp2")
