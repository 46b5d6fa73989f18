"""OPO in Hugging Face TRL: ``OPOConfig`` (a ``trl.GRPOConfig``) and ``OPOTrainer`` (a
``trl.GRPOTrainer`` whose loss is ``opo_kernels.opo_loss``). It overrides private GRPOTrainer
methods, hence the pinned range in setup.py (extra "trl"); tests/test_trl_integration.py passed
with trl 1.16.0 + transformers 5.23.0 and 4.57.6, and trl 1.8.0, 1.0.0, 0.29.1 + transformers
5.23.0 (CPU only; no GPU run).

What reaches the loss (SPEC "Inputs"), per micro-batch of B completions:
- logits: the policy's completion logits [B, C, V] (a view of the model output, not a copy),
  divided by TRL's sampling ``temperature`` inside the loss (as TRL does for its log-probs).
- rewards: the RAW rewards Σ_i reward_weights[i]·r_i, captured at generation time (TRL only
  keeps its group-normalized advantages). A completion that every reward function scored None
  gets an empty mask, so it is excluded from its group (SPEC: n_s = 0).
- groups: TRL samples ``num_generations`` consecutive completions per prompt. The integration
  packs each group into one row of the generation batch, so TRL's shuffle and its split into
  micro-batches move whole groups: Q, p̃ and τ are always computed over complete groups. This
  needs ``per_device_train_batch_size % num_generations == 0`` (checked by OPOConfig).
- π_ref: TRL's ``old_per_token_logps`` when it computes them (when a generation batch outlives
  one optimizer step: num_iterations > 1 or steps_per_generation > gradient_accumulation_steps;
  and with vLLM), else the detached current policy (``ref_logprobs=None``: on-policy, the
  paper's setting; the loss value is then 0, its gradient is not).
- mask: TRL's completion mask (times its tool mask in multi-turn runs).

Each micro-batch is one ``opo_loss`` call (its own τ), divided by the gradient-accumulation
steps, like TRL's "grpo" loss. Metrics are logged as ``opo/<name>`` (mean over processes;
``opo/omega_max`` is the max).

``opo_fused_linear=True``: the loss is ``fused_linear_opo_loss`` on the final hidden states
and the LM head's weight (and bias), so the [B, C, V] completion logits are never materialized
(at most ``opo_chunk_size`` × V logits at a time; None = that function's default). The model
runs with ``logits_to_keep=1`` (its own head sees one position) and ``output_hidden_states``
(only the last one where transformers can select it); ``hidden_states[-1]`` is the normed
output that feeds ``lm_head`` in transformers' causal LMs, and it is sliced at the positions
that predict the completion exactly as the logits are in the default path. The head is
``get_output_embeddings()`` of the unwrapped model (DDP, accelerate) and is computed in the
dtype the model's own head uses: the autocast dtype under mixed precision, else the weight's
(TRL's cast_lm_head_to_fp32 included). Rewards, groups, π_ref, mask, temperature, accumulation
scaling and the MoE aux loss are those of the default path. Refused, since the fused loss
computes exactly ``hidden @ weight.T + bias`` and nothing else: a model whose forward takes no
``logits_to_keep``; a head that is not a plain ``torch.nn.Linear`` (a LoRA adapter on lm_head,
a quantized head, a patched forward other than cast_lm_head_to_fp32's); a config that
transforms the logits after the head (``final_logit_softcapping``; ``logit_scale``,
``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling`` other than 1); FSDP and
DeepSpeed ZeRO-3 (sharded head weight). The first loss call also checks that the head applied
to ``hidden_states[-1]`` reproduces the model's own logits at the last position, and raises
otherwise. ``opo/entropy_mean`` comes from the loss kernels in both paths (same pass over the
logits, ``compute_entropy``).

GRPO options that do not apply: loss_type, epsilon, epsilon_high, delta,
importance_sampling_level, the SAPO/VESPO options, and scale_rewards /
multi_objective_aggregation (these two only shape ``opo_weights="grpo_advantages"``);
cast_lm_head_to_fp32 acts through the model's head (both paths follow it). Refused:
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

from __future__ import annotations

import inspect
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from trl import GRPOConfig, GRPOTrainer

from ..config import PRESET_OPTIONS, OPOLossConfig
from ..fused_linear_opo import fused_linear_opo_loss_with_config
from ..fused_opo import opo_loss_with_config
from ..inputs import FLOAT_DTYPES

__all__ = ["OPO_WEIGHTS", "OPOConfig", "OPOTrainer"]

# "grpo_advantages": ω_s = TRL's advantage of the completion (SPEC "weights = a tensor [B]").
OPO_WEIGHTS = ("seed", "escort", "grpo_advantages")

# Keys TRL adds for vision-language models; their per-image layouts are not supported here.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                    "image_sizes", "spatial_shapes", "num_tiles", "token_type_ids",
                    "mm_token_type_ids", "image_position_ids")

# output_hidden_states for the fused-linear path. transformers >= 5 accepts indices and then
# keeps only those (the others are None): not keeping every layer's output matters under
# accelerate's mixed precision, which returns fp32 copies of all 16-bit outputs. Older versions
# take it as True and return every layer (hidden_states[-1] is the final one either way).
try:
    from transformers.utils.output_capturing import selected_hidden_states as _selects
except ImportError:
    _LAST_HIDDEN_STATE = True
else:
    del _selects
    _LAST_HIDDEN_STATE = [-1]

# Config fields of models that transform the logits after the LM head (the ones TRL 1.16's
# fused LM head reads): value that means "no transform" (None: any value is one).
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0,
                     "output_multiplier": 1.0, "lm_head_multiplier": 1.0, "logits_scaling": 1.0}


def _option(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class OPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the OPO loss options (SPEC "Public API"), all prefixed ``opo_``:
    GRPOConfig already owns ``temperature``, ``beta``, ``epsilon``, ``delta`` and
    ``entropy_coef``, and the prefix keeps future TRL fields from clashing.

    TRL's ``temperature`` (sampling) is the loss's temperature. ``opo_weights``: "seed"
    (default), "escort", or "grpo_advantages" (ω = TRL's advantages, shaped by scale_rewards).
    The options of ``opo_preset`` default to None: the preset's value ("paper" = eq. 6 = the
    values in the help texts; "author_verl" = the author's verl code).
    """

    opo_preset: str = _option(
        "paper", "Defaults of the opo_* options below left at None: 'paper' (eq. 6) or "
                 "'author_verl' (the author's verl code); SPEC 'The author's recipe'.")
    opo_alpha: Optional[float] = _option(None, "OPO α in [0, 1]: the sampling geometry "
                                               "(None: the preset's, 0.6).")
    opo_mu: Optional[float] = _option(None, "OPO μ >= 0: weight of the χ² term μ/2·E[v²] "
                                            "(None: the preset's, 1.0).")
    opo_tau: Optional[float] = _option(None, "Base temperature τ (> 0) of p̃ (preset: 0.5).")
    opo_adaptive_tau: Optional[bool] = _option(None, "Adapt τ per loss call (SPEC 'τ'; "
                                                     "preset: True).")
    opo_tau_range: Optional[List[float]] = _option(
        None, "(τ_min, τ_max) that clamp the adaptive τ (preset: [0.2, 1.5]).")
    opo_reward_temperature: Optional[float] = _option(
        None, "Q = softmax(reward / this) in a group (preset: 0.15).")
    opo_weights: Optional[str] = _option(
        None, "ω rule: 'seed', 'escort' or 'grpo_advantages' (preset: 'seed'; "
              "author_verl: 'escort').")
    opo_center_weights: Optional[bool] = _option(None, "Subtract the group mean of ω "
                                                       "(preset: False; author_verl: True).")
    opo_level: Optional[str] = _option(None, "'sequence', 'sequence_mean' or 'token' "
                                             "(preset: 'sequence_mean').")
    opo_coordinates: Optional[str] = _option(
        None, "'ratio' (v = π/π_ref − 1) or 'log' (v = Δ) (preset: 'ratio'; author_verl: 'log').")
    opo_delta_clip: Optional[float] = _option(
        None, "Clamp of δ in p̃, the penalty and the Z-loss (preset: none; author_verl: 5.0; "
              "inf: none).")
    opo_score_clip: Optional[float] = _option(
        None, "Clamp of δ/τ before p̃ and the Z-loss (preset: none; author_verl: 10.0; inf: none).")
    opo_scale_rewards: Optional[str] = _option(
        None, "'none' or 'group' (Q from group-normalized advantages) (preset: 'none').")
    opo_direction_scale: Optional[float] = _option(
        None, "Factor of the −ω·v term (preset: 1.0; author_verl: 1/α).")
    opo_logit_reg_coef: Optional[float] = _option(
        None, "Z-loss λ on the groups' logsumexp of δ/τ (preset: 0; author_verl: 0.01).")
    opo_entropy_coef: float = _option(0.0, "Entropy bonus β >= 0 (mean per-token entropy).")
    opo_backend: str = _option("auto", "'auto', 'triton' (fused kernels) or 'torch'.")
    opo_log_entropy: bool = _option(
        True, "Log opo/entropy_mean also when opo_entropy_coef = 0 (the loss kernels compute "
              "it in their pass over the logits: no extra pass)."
    )
    opo_fused_linear: bool = _option(
        False, "Compute the loss from the final hidden states and the LM head with "
               "fused_linear_opo_loss: the completion logits are never materialized."
    )
    opo_chunk_size: Optional[int] = _option(
        None, "Token rows per chunk of the fused-linear loss (None: its default, the largest "
              "power of two of rows whose logits take <= 256 MiB). Needs opo_fused_linear."
    )

    def __post_init__(self):
        super().__post_init__()
        if self.opo_weights is not None and self.opo_weights not in OPO_WEIGHTS:
            raise ValueError(f"opo_weights must be one of {OPO_WEIGHTS}, got {self.opo_weights!r}")
        try:
            self.opo_loss_config()
        except (TypeError, ValueError) as err:
            raise type(err)(f"OPOConfig: {err} (set it through the field opo_<name>)") from None
        self._check_supported()
        chunk = self.opo_chunk_size
        if chunk is not None:
            if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
                raise ValueError(f"OPOConfig: opo_chunk_size must be a positive int or None, "
                                 f"got {chunk!r}")
            if not self.opo_fused_linear:
                raise ValueError("OPOConfig: opo_chunk_size only applies with "
                                 "opo_fused_linear=True")

    def opo_loss_config(self) -> OPOLossConfig:
        """The validated loss options (weights "grpo_advantages" is given per call); options
        left at None take the preset's value."""
        options = {name: getattr(self, f"opo_{name}") for name in PRESET_OPTIONS
                   if getattr(self, f"opo_{name}") is not None}
        if options.get("weights") == "grpo_advantages":
            options["weights"] = "seed"  # placeholder: the advantages tensor comes per call
        if "tau_range" in options:
            options["tau_range"] = tuple(options["tau_range"])
        return OPOLossConfig(
            preset=self.opo_preset, temperature=self.temperature,
            entropy_coef=self.opo_entropy_coef, backend=self.opo_backend, return_metrics=True,
            compute_entropy=self.opo_log_entropy, **options,
        )

    def _check_supported(self) -> None:
        k = self.num_generations
        if self.per_device_train_batch_size % k:
            raise ValueError(
                "OPOConfig: OPO computes its group statistics (Q, p̃, τ) over whole prompt "
                "groups, so every micro-batch must hold whole groups: "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                f"multiple of num_generations ({k}). "
                f"Set per_device_train_batch_size={k}·n and grow the batch with "
                "gradient_accumulation_steps or steps_per_generation instead."
            )
        k_eval = self.num_generations_eval or k
        if self.do_eval and self.eval_strategy != "no" and self.per_device_eval_batch_size % k_eval:
            raise ValueError(
                "OPOConfig: per_device_eval_batch_size "
                f"({self.per_device_eval_batch_size}) must be a multiple of the evaluation group "
                f"size ({k_eval}), for the same reason."
            )
        arg = lambda name, default: getattr(self, name, default)  # noqa: E731 (older TRL)
        refused = {
            "beta": (self.beta != 0.0, "GRPO's KL penalty to a frozen reference model is not part "
                     "of OPO (its proximity term is opo_mu); set beta=0.0"),
            "entropy_coef": (arg("entropy_coef", 0.0) != 0.0 or arg("use_adaptive_entropy", False),
                             "use opo_entropy_coef (the bonus computed inside the fused loss) "
                             "and leave entropy_coef=0.0, use_adaptive_entropy=False"),
            "top_entropy_quantile": (arg("top_entropy_quantile", 1.0) < 1.0,
                                     "token masking by entropy is not part of OPO; set it to 1.0"),
            "off_policy_mask_threshold": (arg("off_policy_mask_threshold", None) is not None,
                                          "OPO does not mask sequences; set it to None"),
        }
        for name, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"OPOConfig: unsupported {name}: {why}.")
        if self.use_vllm and arg("vllm_importance_sampling_correction", False):
            warnings.warn(
                "OPOTrainer does not apply TRL's vLLM importance-sampling correction: pi_ref "
                "is the trainer's own old log-probs. Set vllm_importance_sampling_correction="
                "False to silence this warning.", stacklevel=3,
            )


class OPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the OPO loss; same constructor, ``args`` must be an OPOConfig.

    Overrides: ``_calculate_rewards`` (keeps the raw rewards), ``_generate_and_score_completions``
    (adds them and packs groups, see the module docstring) and ``_compute_loss`` (the loss).
    """

    _tag_names = ["trl", "opo"]
    _name = "OPO"
    _paper = {
        "title": "Orthogonalized Policy Optimization: Decoupling Sampling Geometry from "
                 "Optimization Geometry in RLHF",
        "id": "2601.12415",
        "citation": textwrap.dedent("""\
            @article{wang2026opo,
                title  = {{Orthogonalized Policy Optimization: Decoupling Sampling Geometry from Optimization Geometry in RLHF}},
                author = {Zixian Wang},
                year   = 2026,
                eprint = {arXiv:2601.12415},
            }"""),  # noqa: E501
    }

    def __init__(self, model, reward_funcs=None, args=None, *more, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
            args = OPOConfig(f"{(str(name).rstrip('/').split('/')[-1] or 'model')}-OPO")
        if not isinstance(args, OPOConfig):
            raise TypeError(
                f"OPOTrainer needs args=OPOConfig(...) (a GRPOConfig with the opo_* options), got "
                f"{type(args).__name__}"
            )
        self._opo_config = args.opo_loss_config()
        self._opo_rewards_per_func = None
        super().__init__(model, reward_funcs, args, *more, **kwargs)
        self._opo_logits_to_keep = _accepts_logits_to_keep(self.model)
        self._opo_head_verified = False
        if args.opo_fused_linear:
            self._check_fused_linear()

    # ---- generation time: raw rewards and whole groups --------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # [global batch, reward functions], gathered over processes; TRL normalizes it into
        # advantages and drops it, OPO needs it raw.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        self._opo_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        _check_whole_groups(inputs, group_size)
        self._opo_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._opo_rewards_per_func = self._opo_rewards_per_func, None
        if rewards_per_func is None:
            raise RuntimeError(
                "OPOTrainer: GRPOTrainer._generate_and_score_completions did not call "
                "_calculate_rewards; this TRL version is not supported (see setup.py extras 'trl')"
            )
        multimodal = sorted(k for k in output if k in _MULTIMODAL_KEYS)
        if multimodal:
            raise NotImplementedError(
                "OPOTrainer supports text-only models; the batch has multimodal inputs "
                f"{multimodal}"
            )
        num_seqs = len(inputs)
        start = self.accelerator.process_index * num_seqs  # TRL's process slice
        local = rewards_per_func[start:start + num_seqs]
        unscorable = torch.isnan(local).all(dim=1)  # every reward function returned None
        weights = self.reward_weights.to(local.device, local.dtype)
        output["opo_rewards"] = (local * weights).nansum(dim=1).masked_fill(unscorable, 0.0)
        output["opo_scorable"] = ~unscorable
        return _pack_groups(output, num_seqs, group_size)

    # ---- the loss ---------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if "opo_rewards" not in inputs:
            raise ValueError(
                "OPOTrainer's loss needs a batch built by "
                "OPOTrainer._generate_and_score_completions (it has no 'opo_rewards')"
            )
        batch, group_size = _unpack_groups(inputs)
        mode = "train" if self.model.training else "eval"
        completion_ids = batch["completion_ids"]
        input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        mask = batch["completion_mask"].bool() & batch["opo_scorable"][:, None]
        if "tool_mask" in batch:
            mask = mask & batch["tool_mask"].bool()
        cfg = self._opo_config
        if self.args.opo_weights == "grpo_advantages":
            cfg = cfg.replace(weights=batch["advantages"].float())
        # old_per_token_logps is None when TRL is on-policy: the loss then uses the detached
        # current log-probs as π_ref.
        data = (completion_ids, batch.get("old_per_token_logps"), batch["opo_rewards"])
        layout = {"mask": mask, "group_size": group_size}

        if self.args.opo_fused_linear:
            hidden, weight, bias, outputs = self._opo_completion_hidden(
                model, input_ids, attention_mask, completion_ids.size(1))
            loss, metrics = fused_linear_opo_loss_with_config(
                hidden, weight, *data, cfg, bias=bias, chunk_size=self.args.opo_chunk_size,
                **layout)
        else:
            logits, outputs = self._opo_completion_logits(model, input_ids, attention_mask,
                                                          completion_ids.size(1))
            loss, metrics = opo_loss_with_config(logits, *data, cfg, **layout)

        if getattr(self, "aux_loss_enabled", False):  # MoE load balancing, as GRPOTrainer does
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
        self._opo_log_metrics(mode, metrics)
        if mode == "train":  # GRPOTrainer.loss_is_scaled_for_ga: the trainer does not rescale
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def _opo_forward(self, model, input_ids, attention_mask, **kwargs):
        """The policy's forward as both loss paths run it (no cache, MoE router logits,
        autocast). TRL patched model.forward with a fused log-prob head; fused_lm_head=False
        (the default) runs the model's own forward, which returns logits."""
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if getattr(self, "aux_loss_enabled", False):
            kwargs["output_router_logits"] = True
        with self.accelerator.autocast():
            return model(**kwargs)

    def _opo_completion_logits(self, model, input_ids, attention_mask, num_completion: int):
        """Logits that predict the completion tokens: [B, C, V], a view of the model output."""
        kwargs = {}
        if self._opo_logits_to_keep:  # the LM head only runs on the last C + 1 positions
            kwargs["logits_to_keep"] = num_completion + 1
        outputs = self._opo_forward(model, input_ids, attention_mask, **kwargs)
        return _completion_positions(outputs.logits, num_completion), outputs

    def _opo_completion_hidden(self, model, input_ids, attention_mask, num_completion: int):
        """(hidden [B, C, H], weight [V, H], bias [V] or None, model outputs) such that
        ``hidden @ weight.T + bias`` are the logits that predict the completion tokens, in the
        dtype the model's own head computes them in. The model's head runs on one position."""
        head = _lm_head(self.accelerator.unwrap_model(model), _casts_head_to_fp32(self.args))
        outputs = self._opo_forward(model, input_ids, attention_mask,
                                    output_hidden_states=_LAST_HIDDEN_STATE, logits_to_keep=1)
        if not outputs.hidden_states or outputs.hidden_states[-1] is None:
            raise RuntimeError(
                "OPOTrainer: opo_fused_linear=True needs the final hidden states, but "
                f"{type(self.accelerator.unwrap_model(model)).__name__} returned none for "
                "output_hidden_states; set opo_fused_linear=False")
        final = outputs.hidden_states[-1]  # [B, P + C, H], after the final norm
        dtype = self._opo_head_dtype(head.weight)
        weight, bias = head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)
        if not self._opo_head_verified:
            _verify_head(final[:, -1], weight, bias, outputs.logits[:, -1])
            self._opo_head_verified = True
        hidden = _completion_positions(final, num_completion).to(dtype)
        return hidden, weight, bias, outputs

    def _opo_head_dtype(self, weight: torch.Tensor) -> torch.dtype:
        """The dtype of ``lm_head(hidden)`` in the model's forward: the autocast dtype under
        mixed precision (accelerate then returns the logits converted to fp32, so their dtype
        does not tell), else the weight's (a bf16 hidden meets an fp32 weight only under TRL's
        cast_lm_head_to_fp32, whose head computes in fp32)."""
        device = weight.device.type
        with self.accelerator.autocast():
            if weight.dtype != torch.float64 and torch.is_autocast_enabled(device):
                return torch.get_autocast_dtype(device)
        return weight.dtype

    def _check_fused_linear(self) -> None:
        """Refuses, at construction, what opo_fused_linear=True cannot reproduce exactly."""
        why = None
        if self.is_fsdp_enabled:
            why = "FSDP shards the LM head weight, which the fused loss reads directly"
        elif self.is_deepspeed_enabled and _zero3_enabled():
            why = "DeepSpeed ZeRO-3 shards the LM head weight, which the fused loss reads directly"
        elif not self._opo_logits_to_keep:
            why = (f"{type(self.model).__name__}.forward takes no logits_to_keep, so the model's "
                   "own head would still compute the logits of every position")
        if why:
            raise NotImplementedError(f"OPOTrainer: opo_fused_linear=True is not supported here: "
                                      f"{why}; set opo_fused_linear=False")
        unwrapped = self.accelerator.unwrap_model(self.model)
        _lm_head(unwrapped, _casts_head_to_fp32(self.args))
        config = unwrapped.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for name, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(text_config, name, None)
            if value is not None and (neutral is None or value != neutral):
                raise ValueError(
                    f"OPOTrainer: opo_fused_linear=True computes the logits as hidden @ "
                    f"lm_head.weight.T (+ bias), but the model config sets {name}={value!r} (the "
                    "model transforms its logits after the LM head); set opo_fused_linear=False")

    def _opo_log_metrics(self, mode: str, metrics: Dict[str, torch.Tensor]) -> None:
        names = list(metrics)
        values = [metrics[name].float() for name in names]
        gathered = self.accelerator.gather(torch.stack(values)[None]).reshape(-1, len(names))
        reduced = torch.where(torch.tensor([n == "omega_max" for n in names],
                                           device=gathered.device),
                              gathered.max(0).values, gathered.mean(0))
        for name, value in zip(names, reduced.tolist()):
            self._metrics[mode][f"opo/{name}"].append(value)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_whole_groups(inputs: list, group_size: int) -> None:
    """The local generation batch must be whole groups of identical prompts, in TRL's
    RepeatSampler order (each prompt ``group_size`` times in a row)."""
    num = len(inputs)
    if num % group_size:
        raise ValueError(
            f"OPOTrainer: this process's generation batch has {num} completions, not a whole "
            f"number of groups of {group_size}; make per_device_train_batch_size (and "
            "per_device_eval_batch_size) multiples of num_generations"
        )
    prompts = [x.get("prompt") for x in inputs]
    for start in range(0, num, group_size):
        if any(p != prompts[start] for p in prompts[start + 1:start + group_size]):
            raise ValueError(
                f"OPOTrainer: rows {start}..{start + group_size - 1} of the generation batch are "
                "not one prompt group; OPO relies on TRL's sampler order (num_generations "
                "consecutive copies of each prompt)"
            )


def _pack_groups(batch: dict, num_seqs: int, group_size: int) -> dict:
    """[B, ...] tensors -> [B / K, K, ...]: TRL's shuffle and split then move whole groups."""
    packed = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            if value.shape[0] != num_seqs:
                raise NotImplementedError(
                    f"OPOTrainer: batch entry {key!r} has {value.shape[0]} rows, expected one per "
                    f"completion ({num_seqs})"
                )
            value = value.unflatten(0, (num_seqs // group_size, group_size))
        elif isinstance(value, (list, tuple)):
            raise NotImplementedError(f"OPOTrainer: unsupported list-valued batch entry {key!r}")
        packed[key] = value
    return packed


def _unpack_groups(batch: dict) -> Tuple[dict, int]:
    """Inverse of ``_pack_groups``: (flat batch, group size K); 0-dim entries pass through."""
    group_size = batch["opo_rewards"].shape[-1]
    flat = {key: value.flatten(0, 1) if isinstance(value, torch.Tensor) and value.dim() >= 2
            else value for key, value in batch.items()}
    return flat, group_size


def _completion_positions(x: torch.Tensor, num_completion: int) -> torch.Tensor:
    """Rows of x [B, P + C, ...] at the positions that predict the completion (the last C
    tokens): position j predicts token j + 1, so positions [P − 1, P + C − 1). A view."""
    return x[:, -(num_completion + 1):-1]


def _lm_head(model, cast_lm_head_to_fp32: bool) -> torch.nn.Linear:
    """The LM head of the unwrapped model, refused unless the fused loss reproduces it:
    ``hidden @ weight.T + bias`` with a float weight."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(f"OPOTrainer: opo_fused_linear=True needs the LM head from "
                         f"get_output_embeddings(); {type(model).__name__} has none")
    # TRL's cast_lm_head_to_fp32 replaces the head's forward by an fp32 linear (handled by
    # _opo_head_dtype); any other instance-level forward is unknown
    patched = "forward" in vars(head) and not cast_lm_head_to_fp32
    if type(head) is not torch.nn.Linear or patched:
        raise ValueError(
            f"OPOTrainer: opo_fused_linear=True needs a plain torch.nn.Linear LM head, got "
            f"{type(head).__name__}{' with a patched forward' if patched else ''}: the fused "
            "loss computes hidden @ weight.T + bias itself, so a LoRA adapter on the head, a "
            "quantized head or a custom forward would be bypassed; set opo_fused_linear=False")
    if head.weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"OPOTrainer: opo_fused_linear=True needs a float LM head weight, got "
                         f"{head.weight.dtype}; set opo_fused_linear=False")
    return head


@torch.no_grad()
def _verify_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 logits: torch.Tensor) -> None:
    """``hidden @ weight.T + bias`` [B, V] must be the model's own logits [B, V] at the same
    position (catches a model that scales or caps its logits, or feeds its head something
    else than ``hidden_states[-1]``). Tolerance: the two matmuls may round differently."""
    ours = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    theirs = logits.float()
    tol = 2e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-3
    err = (ours - theirs).abs().max().item()
    if not err <= tol * (1.0 + theirs.abs().max().item()):
        raise RuntimeError(
            "OPOTrainer: opo_fused_linear=True: the LM head applied to hidden_states[-1] does "
            f"not reproduce the model's logits (max abs difference {err:.3g}); this model "
            "transforms its logits or its head input in a way the fused loss cannot; set "
            "opo_fused_linear=False")


def _casts_head_to_fp32(args) -> bool:
    return bool(getattr(args, "cast_lm_head_to_fp32", False))  # not in older TRL


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - very old transformers
        return False
    return is_deepspeed_zero3_enabled()


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward without a signature
        return False
