"""OPO in Hugging Face TRL: ``OPOConfig`` (a ``trl.GRPOConfig``) and ``OPOTrainer`` (a
``trl.GRPOTrainer`` whose loss is ``opo_kernels.opo_loss``). It overrides private GRPOTrainer
methods, hence the pinned range in setup.py (extra "trl"); tests/test_trl_integration.py passed
with trl 1.16.0, 1.8.0, 1.0.0 and 0.29.1, each with transformers 5.10.4 and torch 2.13 on CPU
(no GPU run; before trl 1.16 its cases of the "trl_fused_head" path are skipped: that TRL
has no fused LM head); the other tests/test_trl_*.py with trl 1.16.0.

What reaches the loss (docs/spec.md "Inputs"), per micro-batch of B completions:
- the policy's completion logits [B, C, V] or what they are computed from (see the loss paths
  below), at TRL's sampling ``temperature`` (as TRL does for its log-probs).
- rewards: the RAW rewards Σ_i reward_weights[i]·r_i, captured at generation time (TRL only
  keeps its group-normalized advantages). A completion that every reward function scored None
  gets an empty mask, so it is excluded from its group (docs/spec.md "Per sequence": n_s = 0).
- groups: TRL samples ``num_generations`` consecutive completions per prompt. The integration
  packs each group into one row of the generation batch, so TRL's shuffle and its split into
  micro-batches move whole groups: Q, p̃ and τ are always computed over complete groups. This
  needs ``per_device_train_batch_size % num_generations == 0`` (checked by OPOConfig).
- π_ref: TRL's ``old_per_token_logps`` when it computes them (TRL 1.16's rule, copied in
  ``paths.off_policy_schedule``: gradient_accumulation_steps % (steps_per_generation ·
  num_iterations) != 0, or vLLM with its importance-sampling correction, on by default), else
  the detached current policy (``ref_logprobs=None``: on-policy, the paper's setting; with the
  default options the loss value is then 0, its gradient is not).
- mask: TRL's completion mask (times its tool mask in multi-turn runs).

Each micro-batch is one ``opo_loss`` call (its own τ), divided by the gradient-accumulation
steps, like TRL's "grpo" loss. Metrics are logged as ``opo/<name>`` (mean over processes;
``opo/omega_max`` is the max).

The loss's value checks (docs/spec.md "Bad input and edge cases": non-finite rewards or ref
log-probs at counted tokens, ...) run with ``validate="deferred"``, without a host stall per
call: a bad value raises a ValueError naming the failing call at that call's backward when
its counts are on the host by then, else at the next loss call. OPOTrainer also reads them
at the end of ``train()``, before and at the end of ``evaluate()`` and before each
checkpoint save, on every process (one all-reduce: all raise when one found bad input), so
the last calls' errors are raised too (``deferred_checks.py``). An error raised after its
call's backward may come after an optimizer step that used that call's gradient.

Loss paths (``opo_loss_path``; ``paths.py`` counts what each holds and computes). All give the
same loss, metrics and gradients up to rounding (tested against each other and the reference):

- "fused_linear": ``fused_linear_opo_loss`` on the final hidden states and the LM head's weight
  (and bias), so the [B, C, V] completion logits are never materialized: one chunk of
  ``opo_chunk_size`` × V logits at a time (None: that function's default), plus, off-policy, the
  logits kept for the backward (``opo_logits_budget`` bytes; None: no more than TRL's fused head
  holds, ``paths.default_logits_budget``). The model runs with ``logits_to_keep=1`` (its own
  head sees one position) and ``output_hidden_states`` (only the last one where transformers can
  select it); ``hidden_states[-1]`` is the normed output that feeds ``lm_head`` in transformers'
  causal LMs, sliced at the positions that predict the completion. The head is
  ``get_output_embeddings()`` of the unwrapped model (DDP, accelerate, FSDP2) and is computed in
  the dtype the model's own head uses: the autocast dtype under mixed precision, else the
  weight's (TRL's cast_lm_head_to_fp32 included). Under FSDP2 the head's unit is unsharded for
  the loss (an all-gather of the weight when it was resharded after the forward) and FSDP
  reduce-scatters its gradient. Not available, since the fused loss computes exactly ``hidden @
  weight.T + bias`` and nothing else: a model whose forward takes no ``logits_to_keep``; a head
  that is not a plain ``torch.nn.Linear`` (a LoRA adapter on lm_head, a quantized head, a
  patched forward other than cast_lm_head_to_fp32's); a config that transforms the logits after
  the head (``final_logit_softcapping``; ``logit_scale``, ``output_multiplier``,
  ``lm_head_multiplier``, ``logits_scaling`` other than 1); FSDP version 1 and DeepSpeed ZeRO-3.
  The first loss call also checks (agreed over ranks) that the head applied to
  ``hidden_states[-1]`` reproduces the model's own logits at the last position, and raises
  otherwise.
- "trl_fused_head": the fused LM head GRPOTrainer patches into the model (TRL >= 1.16,
  ``model(..., labels=..., fused_lm_head=True)``) computes the log-probs and entropy of the
  counted completion tokens only, at TRL's temperature, with the logit transforms it knows;
  then ``opo_loss_from_logprobs``. Needs a plain ``torch.nn.Linear`` head (TRL's head reads
  its weight directly). Under FSDP2 the head's unit is unsharded after the backbone's forward,
  before TRL's head reads it (TRL alone would read a resharded head through DTensor's
  full_tensor(), whose gradient FSDP does not average over the ranks). Under DeepSpeed ZeRO-3
  TRL gathers the head itself.
- "logits": the completion logits [B, C, V] (a view of the model output), divided by the
  temperature inside ``opo_loss``. Any head, any transform; under accelerate's mixed
  precision the logits are fp32.
- "auto" (default): TRL's fused head on an on-policy schedule (TRL's default: what
  GRPOTrainer runs, so the same memory and matmuls), the fused-linear loss on an off-policy
  one (TRL keeps old log-probs: with the default ``opo_logits_budget`` it holds no more than
  TRL's head and runs fewer matmuls), each only where it is available for the model and the
  setup, else the other, else "logits" (with a warning).

``opo/entropy_mean`` comes from the loss kernels (or TRL's head) in every path.

GRPO options that do not apply: loss_type, epsilon, epsilon_high, delta,
importance_sampling_level, the SAPO/VESPO options, and scale_rewards /
multi_objective_aggregation (these two only shape ``opo_weights="grpo_advantages"``);
cast_lm_head_to_fp32 makes every path compute the head in fp32 (under mixed precision too:
OPOTrainer runs TRL's fp32 head with autocast off, as TRL's fused head does for π_ref). Refused:
beta != 0, entropy_coef != 0 or use_adaptive_entropy (use ``opo_entropy_coef``),
top_entropy_quantile < 1, off_policy_mask_threshold, multimodal (vision) inputs.

Example::

    from opo_kernels.integrations.trl import OPOConfig, OPOTrainer

    args = OPOConfig(output_dir="out", num_generations=6, per_device_train_batch_size=12,
                     opo_alpha=0.6, opo_mu=1.0)
    trainer = OPOTrainer(model=model, reward_funcs=reward_fn, args=args,
                         train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
"""

from .config import OPO_WEIGHTS, OPOConfig
from .trainer import OPOTrainer

__all__ = ["OPO_WEIGHTS", "OPOConfig", "OPOTrainer"]
