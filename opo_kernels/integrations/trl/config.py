"""``OPOConfig``: TRL's GRPOConfig plus the ``opo_*`` loss options, validated at construction
(what OPOTrainer refuses is refused here, before a model is loaded)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

from trl import GRPOConfig

from ...config import PRESET_OPTIONS, OPOLossConfig
from .paths import LOSS_PATHS

# "grpo_advantages": ω_s = TRL's advantage of the completion (docs/spec.md "Weights").
OPO_WEIGHTS = ("seed", "escort", "grpo_advantages")


def _option(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class OPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the OPO loss options (docs/spec.md "Options"), all prefixed
    ``opo_``: GRPOConfig already owns ``temperature``, ``beta``, ``epsilon``, ``delta`` and
    ``entropy_coef``, and the prefix keeps future TRL fields from clashing.

    TRL's ``temperature`` (sampling) is the loss's temperature. ``opo_weights``: "seed"
    (default), "escort", or "grpo_advantages" (ω = TRL's advantages, shaped by scale_rewards).
    The options of ``opo_preset`` default to None: the preset's value ("paper" = eq. 6 = the
    values in the help texts; "author_verl" = the author's verl code).

    ``opo_loss_path`` chooses how the loss meets the model (``paths.py``): "auto" (default),
    "fused_linear", "trl_fused_head" or "logits"; ``opo_fused_linear`` is a shorthand for the
    first two explicit ones (True: "fused_linear", False: "logits").
    """

    opo_preset: str = _option(
        "paper", "Defaults of the opo_* options below left at None: 'paper' (eq. 6) or "
                 "'author_verl' (the author's verl code); docs/spec.md 'Presets'.")
    opo_alpha: Optional[float] = _option(None, "OPO α in [0, 1]: the sampling geometry "
                                               "(None: the preset's, 0.6).")
    opo_mu: Optional[float] = _option(None, "OPO μ >= 0: weight of the χ² term μ/2·E[v²] "
                                            "(None: the preset's, 1.0).")
    opo_tau: Optional[float] = _option(None, "Base temperature τ (> 0) of p̃ (preset: 0.5).")
    opo_adaptive_tau: Optional[bool] = _option(
        None, "Adapt τ per loss call (docs/spec.md 'Options'; preset: True).")
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
    opo_loss_path: str = _option(
        "auto", "How the loss meets the model: 'fused_linear' (fused_linear_opo_loss on the "
                "final hidden states and the LM head: no completion logits), 'trl_fused_head' "
                "(TRL's fused LM head gives the log-probs, then opo_loss_from_logprobs), "
                "'logits' (the model's completion logits, then opo_loss), or 'auto': "
                "'fused_linear' when TRL keeps old log-probs (when a generation batch "
                "does not end with an optimizer step, or with vLLM's importance-sampling "
                "correction: docs/trl.md), else 'trl_fused_head', "
                "each where the model and the parallelism setup allow it, else 'logits'."
    )
    opo_fused_linear: Optional[bool] = _option(
        None, "Shorthand for opo_loss_path: True = 'fused_linear', False = 'logits' (None: "
              "opo_loss_path decides)."
    )
    opo_chunk_size: Optional[int] = _option(
        None, "Token rows per chunk of the fused-linear loss (None: its default, the largest "
              "power of two of rows whose logits take <= 256 MiB). Applies to the "
              "'fused_linear' loss path."
    )
    opo_logits_budget: Optional[int] = _option(
        None, "Bytes of logits the fused-linear loss keeps from forward to backward instead "
              "of recomputing them (off-policy), or puts in one chunk (on-policy). None: as "
              "much as TRL's fused LM head holds, min(256 MiB in 16 bits, 4·V·H bytes). "
              "Applies to the 'fused_linear' loss path."
    )

    def __post_init__(self):
        # first: TRL's own check of the generation batch would otherwise answer a batch that
        # splits groups with a message about generation_batch_size, not about the group
        self._check_group_batch()
        super().__post_init__()
        if self.opo_weights is not None and self.opo_weights not in OPO_WEIGHTS:
            raise ValueError(f"opo_weights must be one of {OPO_WEIGHTS}, got {self.opo_weights!r}")
        try:
            self.opo_loss_config()
        except (TypeError, ValueError) as err:
            # the config's advice names its options; here they are the fields opo_<name>
            message = re.sub(r"\bpass (\w+)=", r"set opo_\1=", str(err))
            raise type(err)(f"OPOConfig: {message} (set it through the field opo_<name>)") \
                from None
        self._check_supported()
        self._check_loss_path()

    @property
    def opo_requested_path(self) -> str:
        """The loss path asked for: opo_fused_linear's when set, else opo_loss_path."""
        if self.opo_fused_linear is None:
            return self.opo_loss_path
        return "fused_linear" if self.opo_fused_linear else "logits"

    def _check_loss_path(self) -> None:
        if self.opo_loss_path not in LOSS_PATHS:
            raise ValueError(f"OPOConfig: opo_loss_path must be one of {LOSS_PATHS}, got "
                             f"{self.opo_loss_path!r}")
        flag = self.opo_fused_linear
        if flag is not None:
            if not isinstance(flag, bool):
                raise ValueError(f"OPOConfig: opo_fused_linear must be True, False or None, "
                                 f"got {flag!r}")
            if self.opo_loss_path not in ("auto", self.opo_requested_path):
                raise ValueError(
                    f"OPOConfig: opo_fused_linear={flag} asks for opo_loss_path="
                    f"'{self.opo_requested_path}' but opo_loss_path={self.opo_loss_path!r}; "
                    "set only one of them")
        for name, least in (("opo_chunk_size", 1), ("opo_logits_budget", 0)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"OPOConfig: {name} must be an int >= {least} or None, got "
                                 f"{value!r}")
            if self.opo_requested_path not in ("auto", "fused_linear"):
                raise ValueError(
                    f"OPOConfig: {name} only applies to the 'fused_linear' loss path, not to "
                    f"{self.opo_requested_path!r}")

    def opo_loss_options(self) -> dict:
        """The loss options as keyword arguments of ``opo_loss`` and its siblings: the opo_*
        fields that are set, the preset, TRL's temperature, metrics on. weights
        "grpo_advantages" becomes the placeholder "seed": the advantages tensor comes per
        call."""
        options = {name: getattr(self, f"opo_{name}") for name in PRESET_OPTIONS
                   if getattr(self, f"opo_{name}") is not None}
        if options.get("weights") == "grpo_advantages":
            options["weights"] = "seed"
        if "tau_range" in options:
            options["tau_range"] = tuple(options["tau_range"])
        return dict(options, preset=self.opo_preset, temperature=self.temperature,
                    entropy_coef=self.opo_entropy_coef, backend=self.opo_backend,
                    return_metrics=True, compute_entropy=self.opo_log_entropy,
                    validate="deferred")  # value checks without a per-call host stall

    def opo_loss_config(self) -> OPOLossConfig:
        """The validated loss options (``opo_loss_options``) as one config."""
        return OPOLossConfig(**self.opo_loss_options())

    def _check_group_batch(self) -> None:
        k = self.num_generations
        if isinstance(k, int) and k > 0 and self.per_device_train_batch_size % k:
            raise ValueError(
                "OPOConfig: OPO computes its group statistics (Q, p̃, τ) over whole prompt "
                "groups, so every micro-batch must hold whole groups: "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                f"multiple of num_generations ({k}). "
                f"Set per_device_train_batch_size={k}·n and grow the batch with "
                "gradient_accumulation_steps or steps_per_generation instead."
            )

    def _check_supported(self) -> None:
        k = self.num_generations
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

