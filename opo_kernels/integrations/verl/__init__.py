"""OPO in verl (``pip install -e ".[verl]"``, verl 0.9.x): an advantage estimator and a policy
loss registered with verl's own registries (``verl.trainer.ppo.core_algos``), and whole prompt
groups on every data-parallel rank in verl's trainers.

    algorithm.adv_estimator=opo_kernels                  # ESTIMATOR: rewards + group tags
    actor_rollout_ref.actor.policy_loss.loss_mode=opo_kernels  # LOSS_MODE: opo_loss_from_logprobs

Both names differ from verl's own ``opo`` estimator, which is another paper ("On-Policy RL with
Optimal Reward Baseline"). Importing this package registers them; verl imports it in every
process by itself through the ``verl.plugins`` entry point that ``pip install opo_kernels``
declares (or set ``VERL_USE_EXTERNAL_MODULES=opo_kernels.integrations.verl``).

Modules: ``advantages`` (the estimator and its tags), ``policy_loss`` (the loss and
``OPOPolicyLossConfig``), ``data_parallel`` (the trainers' partition of a batch over
data-parallel ranks, and why it is done that way).

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
and it checks that every group present in the micro-batch is complete: a split group is refused
with an error instead of silently computing Q, p̃ and τ over part of a group. Rows without a
counted token do not count (empty sequences are excluded from everything).

Many GPUs (data parallelism)
----------------------------
verl's trainers partition every batch over the data-parallel ranks by sequence length, which
splits prompt groups. With ``algorithm.adv_estimator=opo_kernels`` this package makes both
trainers (the v1 trainer, verl's default, and the legacy one with ``trainer.balance_batch=True``)
partition whole groups instead, balanced by their token workload, so every micro-batch of every
rank holds whole groups and the loss needs nothing from other ranks (``data_parallel``: why
this and not an exchange of statistics, and how); with ``actor.use_dynamic_bsz=True`` their
update also tells verl to cut micro-batches by token count between whole groups only
(``force_group_size``). It needs ``actor.ppo_mini_batch_size`` (in
prompts) to be a multiple of the data-parallel size; the trainer checks that, and the settings
below, as soon as its workers are up, before the first rollout.

What cannot keep groups whole (refused, naming the key to change)
-----------------------------------------------------------------
* ``actor.use_dynamic_bsz=True`` on a verl whose micro-batching cannot keep runs of rows
  together (its ``rearrange_micro_batches`` has no ``force_group_size``; 0.9.1's has); with
  one that can, micro-batches are cut by token count between whole groups
  (``data_parallel``);
* ``actor.shuffle=True``: mini-batches drawn in random order;
* ``actor.ppo_micro_batch_size_per_gpu`` not a multiple of ``rollout.n``;
* ``actor.ppo_mini_batch_size`` not a multiple of the data-parallel size;
* prompts with different numbers of responses in one batch;
* anything else that reorders or drops part of a group: caught by the tags in the loss.

Also refused: ``actor.use_kl_loss`` (OPO's trust region is its χ² term μ), rollout-correction
importance weights (``rollout_is_weights``), OPO's own ``entropy_coef`` (the hook never sees
the entropy: use verl's ``actor.entropy_coeff`` with ``loss_agg_mode=token-mean``, which adds
exactly OPO's −β·mean H), ``temperature`` (verl's log-probs are already of the sampling
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
(α = 0.6, μ = 1, adaptive τ). The formulas: docs/spec.md.
"""

from .advantages import ESTIMATOR, compute_opo_kernels_advantage, decode_advantages
from .data_parallel import install as _install_trainer_patches
from .data_parallel import plan_rank_layout
from .policy_loss import (
    LOSS_MODE,
    OPOPolicyLossConfig,
    check_actor_config,
    check_rank_share,
    compute_policy_loss_opo_kernels,
)

_install_trainer_patches()

__all__ = ["ESTIMATOR", "LOSS_MODE", "OPOPolicyLossConfig", "compute_opo_kernels_advantage",
           "decode_advantages", "compute_policy_loss_opo_kernels", "check_actor_config",
           "check_rank_share", "plan_rank_layout"]
