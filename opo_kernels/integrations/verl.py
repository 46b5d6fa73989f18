"""OPO in verl (``pip install -e ".[verl]"``, verl 0.9.x): an advantage estimator and a policy
loss registered with verl's own registries (``verl.trainer.ppo.core_algos``).

    algorithm.adv_estimator=opo_kernels                  # ESTIMATOR: rewards + group tags
    actor_rollout_ref.actor.policy_loss.loss_mode=opo_kernels  # LOSS_MODE: opo_loss_from_logprobs

Both names differ from verl's own ``opo`` estimator, which is another paper ("On-Policy RL with
Optimal Reward Baseline"). Importing this module registers them; verl imports it in every
process by itself through the ``verl.plugins`` entry point that ``pip install opo_kernels``
declares (or set ``VERL_USE_EXTERNAL_MODULES=opo_kernels.integrations.verl``).

How the rewards and the groups reach the loss
---------------------------------------------
verl's policy-loss hook receives ``old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode, config, rollout_is_weights`` for one micro-batch and nothing else: no reward, no
prompt index. The estimator (run by the trainer on the whole batch, after verl has ordered it,
with the prompt ``uid`` of every response) therefore writes into ``advantages`` one float64 per
response, at every position of its row:

* the raw sequence reward r_s = Σ_t token_level_rewards, rounded to float32 (the loss computes
  in float32): the float64 value IS the reward, to float32 precision, so verl's
  ``critic/advantages/*`` metrics show rewards;
* in the 29 mantissa bits that a float32 value leaves zero in a float64 (52 − 23), a tag:
  the response's group number within the batch (19 bits) and the number of non-empty responses
  of that group (10 bits).

The loss reads the tags back bit-exactly, so it groups by prompt whatever order verl delivers,
and it checks that every group present in the micro-batch is complete: a group split across
micro-batches (or data-parallel ranks) is refused with an error instead of silently computing
Q, p̃ and τ over part of a group. Rows without a counted token do not count (SPEC: empty
sequences are excluded from everything).

What breaks groups in verl 0.9.1 (and is refused)
-------------------------------------------------
* ``actor.use_dynamic_bsz=True``: micro-batches are re-formed by token count (refused up front);
* ``actor.shuffle=True``: mini-batches are drawn in random order (refused up front);
* ``actor.ppo_micro_batch_size_per_gpu`` not a multiple of ``rollout.n`` (refused up front);
* the trainer's sequence balancing: the legacy trainer (``trainer.use_v1=False``) sorts the
  batch by length when ``trainer.balance_batch=True`` (its default) even on one rank, and the
  v1 trainer (the default) always re-partitions the batch across data-parallel ranks, so with
  more than one data-parallel rank it splits groups. The loss cannot see the trainer's config:
  these are caught by the group tags at the first micro-batch (legacy trainer: set
  ``trainer.balance_batch=False``; v1 trainer: one data-parallel rank).
* anything else that reorders or drops part of a group (caught the same way).

Also refused: ``actor.use_kl_loss`` (OPO's trust region is its χ² term μ), rollout-correction
importance weights (``rollout_is_weights``), OPO's own ``entropy_coef`` (the hook never sees
the entropy: use verl's ``actor.entropy_coeff`` with ``loss_agg_mode=token-mean``, which adds
exactly the SPEC's −β·mean H), ``temperature`` (verl's log-probs are already of the sampling
distribution, logits divided by ``rollout.temperature``).

Scale
-----
π_ref = ``old_log_prob`` (the policy that sampled the batch). Each micro-batch returns its OPO
loss (``opo_loss_from_logprobs`` over its whole groups) times rows·dp_size/global_batch_size,
verl's global-batch normalisation: after verl sums the micro-batch gradients and averages over
data-parallel ranks, an optimizer step follows the mean of the micro-batch OPO losses weighted by
their share of the mini-batch, which with equal groups and no empty response is exactly the OPO
loss of the whole mini-batch (direction ÷ its groups, penalty ÷ its sequences); τ is computed
per micro-batch. ``loss_agg_mode`` and ``loss_scale_factor`` do not enter OPO's term (its
aggregation is the ``level`` option).

OPO's options
-------------
From ``actor.policy_loss.opo`` (a mapping of ``opo_loss`` keyword options: ``alpha``, ``mu``,
``tau``, ``adaptive_tau``, ``tau_range``, ``reward_temperature``, ``weights`` ("seed" or
"escort"), ``center_weights``, ``level``, ``coordinates``, ``preset`` ("paper" or
"author_verl", the author's recipe), ``delta_clip``, ``score_clip``, ``scale_rewards``,
``direction_scale``, ``logit_reg_coef``, ``backend``, ``validate``, and any option
``OPOLossConfig`` gains), plus ``vocab_size`` (V for the adaptive τ rule; default: the
actor model's ``hf_config.vocab_size``). ``PolicyLossConfig`` has no such field, so set
``actor.policy_loss._target_=opo_kernels.integrations.verl.OPOPolicyLossConfig``, which adds it
and checks the options when verl builds the config. Unset options keep ``opo_loss``'s defaults
(α = 0.6, μ = 1, adaptive τ).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from verl.trainer.ppo import core_algos
from verl.workers.config import PolicyLossConfig

from ..config import OPOLossConfig
from ..from_logprobs import opo_loss_from_logprobs

ESTIMATOR = "opo_kernels"
LOSS_MODE = "opo_kernels"

# The tag lives in the float64 mantissa bits below float32 precision (52 − 23 = 29 bits).
_TAG_BITS = 29
_SIZE_BITS = 10  # non-empty responses per group: at most 1023
_MAX_SIZE = (1 << _SIZE_BITS) - 1
_MAX_GROUPS = (1 << (_TAG_BITS - _SIZE_BITS)) - 1  # group numbers 1..524287 (0 = no tag)
_TAG_MASK = (1 << _TAG_BITS) - 1

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
    try:
        OPOLossConfig(**options)  # the same checks as opo_loss, at config time
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        known = sorted(OPOLossConfig.__dataclass_fields__)
        raise ValueError(f"actor.policy_loss.opo has an unknown option ({err}); known: "
                         f"{known} and vocab_size") from None
    return options, vocab_size


@dataclass
class OPOPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus ``opo``: the OPO options (module docstring).

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


# ---------------------------------------------------------------- the advantage estimator


@core_algos.register_adv_est(ESTIMATOR)
def compute_opo_kernels_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                  index=None, config=None, **kwargs):
    """verl advantage estimator ``opo_kernels``: raw sequence rewards + group tags.

    token_level_rewards, response_mask: [B, T] (verl's batch, in the order the actor will see).
    index: [B] prompt uids (``data.non_tensor_batch["uid"]``; verl passes it); responses with
    the same uid form one OPO group. Returns ``(advantages, returns)``: advantages [B, T]
    float64, every position of row s = r_s with the tag of its group in the low mantissa bits
    (module docstring); returns [B, T] float32 = r_s on the response tokens.
    """
    if index is None:
        raise ValueError("the opo_kernels advantage estimator needs the prompt index (verl "
                         "passes data.non_tensor_batch['uid'] as index=)")
    if _get(config, "use_kl_in_reward", False):  # (_get: None for no config)
        raise ValueError("algorithm.use_kl_in_reward=true subtracts a KL penalty from the "
                         "token-level rewards, which OPO would then read as part of r_s: set "
                         "algorithm.use_kl_in_reward=false (OPO's trust region is mu)")
    num_seqs = token_level_rewards.shape[0]
    if len(index) != num_seqs:
        raise ValueError(f"index has {len(index)} entries for {num_seqs} responses")
    rewards = token_level_rewards.sum(dim=-1).to(torch.float32)  # the outcome reward, like GRPO
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("token_level_rewards sum to a non-finite reward for some response")

    group_of = {}
    group = [group_of.setdefault(uid, len(group_of)) for uid in index]
    if len(group_of) > _MAX_GROUPS:
        raise ValueError(f"the opo_kernels estimator tags at most {_MAX_GROUPS} prompts per "
                         f"batch, got {len(group_of)}")
    device = token_level_rewards.device
    group = torch.tensor(group, dtype=torch.int64, device=device)
    nonempty = response_mask.sum(dim=-1) > 0
    sizes = torch.zeros(len(group_of), dtype=torch.int64, device=device)
    sizes.index_add_(0, group, nonempty.to(torch.int64))
    if len(group_of) and int(sizes.max()) > _MAX_SIZE:
        raise ValueError(f"the opo_kernels estimator tags groups of at most {_MAX_SIZE} "
                         f"responses (rollout.n), got {int(sizes.max())}")
    tags = ((group + 1) << _SIZE_BITS) | sizes[group]
    # A float32 value widened to float64 has its 29 low mantissa bits zero: the tag goes there.
    bits = rewards.to(torch.float64).view(torch.int64) | tags
    advantages = bits.view(torch.float64)[:, None].expand(-1, response_mask.shape[-1]).contiguous()
    returns = rewards[:, None] * response_mask.to(torch.float32)
    return advantages, returns


def decode_advantages(advantages: torch.Tensor):
    """(rewards [B] float32, group [B] int64, group_size [B] int64) from the estimator's
    advantages [B, T]; group is 0 for a row without a tag."""
    if advantages.dtype != torch.float64:
        raise ValueError(
            f"opo_kernels policy loss: advantages are {advantages.dtype}, not the float64 that "
            f"the opo_kernels advantage estimator writes; set algorithm.adv_estimator="
            f"{ESTIMATOR} (or something cast the advantages)")
    bits = advantages[:, 0].contiguous().view(torch.int64)
    tag = bits & _TAG_MASK
    rewards = (bits & ~_TAG_MASK).view(torch.float64).to(torch.float32)
    return rewards, tag >> _SIZE_BITS, tag & _MAX_SIZE


# ------------------------------------------------------------------------ the policy loss


def _get(config, key, default=None):
    """config.key for verl's dataclass configs and omegaconf DictConfigs alike."""
    if config is None:
        return default
    getter = getattr(config, "get", None)
    return getter(key, default) if getter is not None else getattr(config, key, default)


def _check_actor_config(config, loss_agg_mode: str):
    """Refuse the actor settings that break groups or change OPO's objective."""
    group = _get(config, "rollout_n")
    if _get(config, "use_dynamic_bsz", False):
        raise ValueError("opo_kernels policy loss: actor.use_dynamic_bsz=True re-forms "
                         "micro-batches by token count and splits prompt groups; set "
                         "actor.use_dynamic_bsz=False and actor.ppo_micro_batch_size_per_gpu "
                         "to a multiple of rollout.n")
    if _get(config, "shuffle", False):
        raise ValueError("opo_kernels policy loss: actor.shuffle=True draws mini-batches in "
                         "random order and splits prompt groups; set actor.shuffle=False")
    micro = _get(config, "ppo_micro_batch_size_per_gpu")
    if isinstance(group, int) and isinstance(micro, int) and micro % group:
        raise ValueError(f"opo_kernels policy loss: actor.ppo_micro_batch_size_per_gpu={micro} "
                         f"is not a multiple of rollout.n={group}: a micro-batch must hold whole "
                         f"prompt groups")
    if _get(config, "use_kl_loss", False):
        raise ValueError("opo_kernels policy loss: actor.use_kl_loss=True adds a KL-to-reference "
                         "term that OPO does not have (its trust region is the chi^2 term, "
                         "policy_loss.opo.mu); set actor.use_kl_loss=False")
    if _get(config, "entropy_coeff", 0.0) and loss_agg_mode != "token-mean":
        raise ValueError(f"opo_kernels policy loss: actor.entropy_coeff with loss_agg_mode="
                         f"{loss_agg_mode!r} is not OPO's entropy bonus (a mean over counted "
                         f"tokens); set actor.loss_agg_mode=token-mean")


def _vocab_size(config, override: Optional[int]) -> Optional[int]:
    if override is not None:
        return override
    hf_config = _get(_get(config, "model_config"), "hf_config")
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
            f"group(s) incomplete): OPO needs whole groups per micro-batch. Something split "
            f"them: actor.use_dynamic_bsz, actor.shuffle, a micro-batch size that is not a "
            f"multiple of rollout.n, or the trainer's sequence balancing (legacy trainer: set "
            f"trainer.balance_batch=False; the v1 trainer re-partitions every batch across "
            f"data-parallel ranks, so use one data-parallel rank)")


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
    rows·dp_size/global_batch_size (module docstring), and OPO's metrics as floats.
    """
    if rollout_is_weights is not None:
        raise ValueError("opo_kernels policy loss: rollout-correction importance weights "
                         "(algorithm.rollout_correction) have no place in OPO's loss; disable "
                         "them (bypass mode, old_log_prob = rollout log-probs, is fine)")
    _check_actor_config(config, loss_agg_mode)
    options, vocab_override = _opo_options(_get(_get(config, "policy_loss"), "opo"))
    vocab_size = _vocab_size(config, vocab_override)
    if vocab_size is None and options.get("adaptive_tau", True):
        raise ValueError("opo_kernels policy loss: the adaptive tau rule needs the vocabulary "
                         "size and the actor config has no model_config.hf_config.vocab_size: "
                         "set actor.policy_loss.opo.vocab_size (or opo.adaptive_tau=false)")

    rewards, group, size = decode_advantages(advantages)
    mask = response_mask.bool()
    _check_groups(group, size, mask.any(dim=-1),
                  f"(set algorithm.adv_estimator={ESTIMATOR} with policy_loss.loss_mode="
                  f"{LOSS_MODE})")
    loss, metrics = opo_loss_from_logprobs(
        log_prob, old_log_prob, rewards.to(log_prob.device), mask=mask, group_ids=group,
        vocab_size=vocab_size, return_metrics=True, **options)

    # verl's global-batch normalisation (agg_loss): the sum over micro-batches and the mean
    # over data-parallel ranks of rows·dp/global_batch_size·L is a weighted mean of the L's.
    info = _get(config, "global_batch_info") or {}
    dp_size = info.get("dp_size", 1) or 1
    global_batch_size = info.get("global_batch_size")
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("opo_kernels policy loss: global_batch_size is required when "
                             "dp_size > 1")
        scale = 1.0
    else:
        scale = log_prob.shape[0] * dp_size / global_batch_size
    names = sorted(metrics)
    values = torch.stack([metrics[k].float() for k in names]).tolist()  # one host sync
    return loss * scale, {f"actor/opo_{k}": v for k, v in zip(names, values)}
