"""The ``opo_kernels`` advantage estimator: raw sequence rewards, with each response's prompt group
written into the float64 advantages so that the policy loss can group by prompt (see the package
docstring for why the loss needs that and how verl carries it).
"""

from __future__ import annotations

import torch
from verl.trainer.ppo import core_algos

ESTIMATOR = "opo_kernels"

# The tag lives in the float64 mantissa bits below float32 precision (52 − 23 = 29 bits).
_TAG_BITS = 29
_SIZE_BITS = 10  # non-empty responses per group: at most 1023
_MAX_SIZE = (1 << _SIZE_BITS) - 1
_MAX_GROUPS = (1 << (_TAG_BITS - _SIZE_BITS)) - 1  # group numbers 1..524287 (0 = no tag)
_TAG_MASK = (1 << _TAG_BITS) - 1


def config_get(config, key, default=None):
    """config.key for verl's dataclass configs and omegaconf DictConfigs alike (None: default)."""
    if config is None:
        return default
    getter = getattr(config, "get", None)
    return getter(key, default) if getter is not None else getattr(config, key, default)


def check_algorithm_config(config) -> None:
    """Refuse the ``algorithm`` settings that change what the estimator reads as rewards."""
    if config_get(config, "use_kl_in_reward", False):
        raise ValueError("algorithm.use_kl_in_reward=true subtracts a KL penalty from the "
                         "token-level rewards, which OPO would then read as part of r_s: set "
                         "algorithm.use_kl_in_reward=false (OPO's trust region is mu)")


@core_algos.register_adv_est(ESTIMATOR)
def compute_opo_kernels_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                  index=None, config=None, **kwargs):
    """verl advantage estimator ``opo_kernels``: raw sequence rewards + group tags.

    token_level_rewards, response_mask: [B, T] (verl's batch, in the order the actor will see).
    index: [B] prompt uids (``data.non_tensor_batch["uid"]``; verl passes it); responses with
    the same uid form one OPO group. Returns ``(advantages, returns)``: advantages [B, T]
    float64, every position of row s = r_s with the tag of its group in the low mantissa bits
    (package docstring); returns [B, T] float32 = r_s on the response tokens.
    """
    if index is None:
        raise ValueError("the opo_kernels advantage estimator needs the prompt index (verl "
                         "passes data.non_tensor_batch['uid'] as index=)")
    check_algorithm_config(config)
    num_seqs = token_level_rewards.shape[0]
    if len(index) != num_seqs:
        raise ValueError(f"index has {len(index)} entries for {num_seqs} responses")
    summed = token_level_rewards.sum(dim=-1)
    rewards = summed.to(torch.float32)  # the outcome reward, like GRPO
    if not bool(torch.isfinite(rewards).all()):
        if bool(torch.isfinite(summed).all()):
            raise ValueError("token_level_rewards sum to a reward beyond float32's range "
                             "(|r| > 3.4e38) for some response")
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
