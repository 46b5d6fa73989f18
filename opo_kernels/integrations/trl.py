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

GRPO options that do not apply: loss_type, epsilon, epsilon_high, delta,
importance_sampling_level, the SAPO/VESPO options, cast_lm_head_to_fp32 and scale_rewards /
multi_objective_aggregation (these two only shape ``opo_weights="grpo_advantages"``). Refused:
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
from typing import Dict, List, Tuple

import torch
from trl import GRPOConfig, GRPOTrainer

from ..config import OPOLossConfig
from ..fused_opo import opo_loss_with_config

__all__ = ["OPO_WEIGHTS", "OPOConfig", "OPOTrainer"]

# "grpo_advantages": ω_s = TRL's advantage of the completion (SPEC "weights = a tensor [B]").
OPO_WEIGHTS = ("seed", "escort", "grpo_advantages")

# Keys TRL adds for vision-language models; their per-image layouts are not supported here.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                    "image_sizes", "spatial_shapes", "num_tiles", "token_type_ids",
                    "mm_token_type_ids", "image_position_ids")


def _option(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class OPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the OPO loss options (SPEC "Public API"), all prefixed ``opo_``:
    GRPOConfig already owns ``temperature``, ``beta``, ``epsilon``, ``delta`` and
    ``entropy_coef``, and the prefix keeps future TRL fields from clashing.

    TRL's ``temperature`` (sampling) is the loss's temperature. ``opo_weights``: "seed"
    (default), "escort", or "grpo_advantages" (ω = TRL's advantages, shaped by scale_rewards).
    """

    opo_alpha: float = _option(0.6, "OPO α in [0, 1]: the sampling geometry.")
    opo_mu: float = _option(1.0, "OPO μ >= 0: weight of the χ² term μ/2·E[v²].")
    opo_tau: float = _option(0.5, "Base temperature τ (> 0) of p̃.")
    opo_adaptive_tau: bool = _option(True, "Adapt τ per loss call (SPEC 'τ').")
    opo_tau_range: List[float] = field(
        default_factory=lambda: [0.2, 1.5],
        metadata={"help": "(τ_min, τ_max) that clamp the adaptive τ."},
    )
    opo_reward_temperature: float = _option(0.15, "Q = softmax(reward / this) in a group.")
    opo_weights: str = _option("seed", "ω rule: 'seed', 'escort' or 'grpo_advantages'.")
    opo_center_weights: bool = _option(False, "Subtract the group mean of ω.")
    opo_level: str = _option("sequence_mean", "'sequence', 'sequence_mean' or 'token'.")
    opo_coordinates: str = _option("ratio", "'ratio' (v = π/π_ref − 1) or 'log' (v = Δ).")
    opo_entropy_coef: float = _option(0.0, "Entropy bonus β >= 0 (mean per-token entropy).")
    opo_backend: str = _option("auto", "'auto', 'triton' (fused kernels) or 'torch'.")
    opo_log_entropy: bool = _option(
        True, "Log opo/entropy_mean also when opo_entropy_coef = 0 (an extra no-grad softmax "
              "pass over the completion logits, one sequence at a time)."
    )

    def __post_init__(self):
        super().__post_init__()
        if self.opo_weights not in OPO_WEIGHTS:
            raise ValueError(f"opo_weights must be one of {OPO_WEIGHTS}, got {self.opo_weights!r}")
        try:
            self.opo_loss_config()
        except (TypeError, ValueError) as err:
            raise type(err)(f"OPOConfig: {err} (set it through the field opo_<name>)") from None
        self._check_supported()

    def opo_loss_config(self) -> OPOLossConfig:
        """The validated loss options (weights "grpo_advantages" is given per call)."""
        return OPOLossConfig(
            alpha=self.opo_alpha, mu=self.opo_mu, tau=self.opo_tau,
            adaptive_tau=self.opo_adaptive_tau, tau_range=tuple(self.opo_tau_range),
            reward_temperature=self.opo_reward_temperature,
            weights="seed" if self.opo_weights == "grpo_advantages" else self.opo_weights,
            center_weights=self.opo_center_weights, level=self.opo_level,
            coordinates=self.opo_coordinates, temperature=self.temperature,
            entropy_coef=self.opo_entropy_coef, backend=self.opo_backend, return_metrics=True,
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
        logits, outputs = self._opo_completion_logits(model, input_ids, attention_mask,
                                                      completion_ids.size(1))

        mask = batch["completion_mask"].bool() & batch["opo_scorable"][:, None]
        if "tool_mask" in batch:
            mask = mask & batch["tool_mask"].bool()
        cfg = self._opo_config
        if self.args.opo_weights == "grpo_advantages":
            cfg = cfg.replace(weights=batch["advantages"].float())
        # old_per_token_logps is None when TRL is on-policy: opo_loss then uses the detached
        # current log-probs as π_ref.
        loss, metrics = opo_loss_with_config(
            logits, completion_ids, batch.get("old_per_token_logps"), batch["opo_rewards"], cfg,
            mask=mask, group_size=group_size,
        )
        if getattr(self, "aux_loss_enabled", False):  # MoE load balancing, as GRPOTrainer does
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
        self._opo_log_metrics(mode, metrics, logits, mask)
        if mode == "train":  # GRPOTrainer.loss_is_scaled_for_ga: the trainer does not rescale
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def _opo_completion_logits(self, model, input_ids, attention_mask, num_completion: int):
        """Logits that predict the completion tokens: [B, C, V], a view of the model output."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._opo_logits_to_keep:  # the LM head only runs on the last C + 1 positions
            kwargs["logits_to_keep"] = num_completion + 1
        if getattr(self, "aux_loss_enabled", False):
            kwargs["output_router_logits"] = True
        # TRL patched model.forward with a fused log-prob head; fused_lm_head=False (the default)
        # runs the model's own forward, which returns logits.
        with self.accelerator.autocast():
            outputs = model(**kwargs)
        # position j predicts token j + 1, so the completion (the last C tokens) is predicted by
        # positions [P − 1, P + C − 1)
        return outputs.logits[:, -(num_completion + 1):-1], outputs

    def _opo_log_metrics(self, mode: str, metrics: Dict[str, torch.Tensor],
                         logits: torch.Tensor, mask: torch.Tensor) -> None:
        names = list(metrics)
        values = [metrics[name].float() for name in names]
        if "entropy_mean" not in metrics and self.args.opo_log_entropy:
            names.append("entropy_mean")
            values.append(_mean_entropy(logits, mask, self.temperature))
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


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward without a signature
        return False


@torch.no_grad()
def _mean_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean entropy of the counted rows of logits [B, C, V], one sequence at a time so that at
    most C × V float32 values are materialized."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for row_logits, row_mask in zip(logits, mask):
        z = row_logits[row_mask].float() / temperature
        total += torch.special.entr(torch.softmax(z, dim=-1)).sum()
    return total / mask.sum().clamp(min=1)
