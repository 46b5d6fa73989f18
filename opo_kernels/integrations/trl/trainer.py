"""``OPOTrainer``: TRL's GRPOTrainer whose loss is OPO, through one of three loss paths
(``paths.py``): ``fused_linear_opo_loss`` on the final hidden states and the LM head (the
default where the model allows it), TRL's fused LM head + ``opo_loss_from_logprobs``, or the
completion logits + ``opo_loss``. The package docstring says what reaches the loss and which
GRPO options apply."""

from __future__ import annotations

import textwrap
import warnings
from typing import Dict

import torch
from transformers.utils import logging
from trl import GRPOTrainer

from ...from_logprobs import opo_loss_from_logprobs
from ...fused_linear_opo import fused_linear_opo_loss_with_config
from ...fused_opo import opo_loss_with_config
from .batches import check_whole_groups, completion_positions, pack_groups, unpack_groups
from .config import OPOConfig
from .deferred_checks import check_deferred_agreed
from .lm_head import (
    LAST_HIDDEN_STATE,
    accepts_logits_to_keep,
    casts_head_to_fp32,
    check_logit_transforms,
    find_lm_head,
    head_in_fp32_under_autocast,
    unshard_head,
    verify_head,
    zero3_enabled,
)
from .paths import (
    choose_path,
    default_logits_budget,
    off_policy_schedule,
    problem_of,
    trl_fused_head_available,
)

logger = logging.get_logger(__name__)

# Keys TRL adds for vision-language models; their per-image layouts are not supported here.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                    "image_sizes", "spatial_shapes", "num_tiles", "token_type_ids",
                    "mm_token_type_ids", "image_position_ids")


class OPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the OPO loss; same constructor, ``args`` must be an OPOConfig.

    Overrides: ``_calculate_rewards`` (keeps the raw rewards), ``_generate_and_score_completions``
    (adds them and packs groups, see the module docstring) and ``_compute_loss`` (the loss);
    ``train``, ``evaluate`` and ``_save_checkpoint`` read the loss's deferred value checks
    (``deferred_checks.py``).
    ``opo_loss_path`` (the path this trainer runs) is decided at construction.
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
        # the logits path's config, made once (a config made per call would be built and
        # validated on every call)
        self._opo_config_to_base = self._opo_config.replace(grad_to_base=True)
        # the TRL fused head applies the temperature itself: the log-probs are taken as given
        self._opo_logprob_options = dict(args.opo_loss_options(), temperature=1.0)
        self._opo_rewards_per_func = None
        super().__init__(model, reward_funcs, args, *more, **kwargs)
        if casts_head_to_fp32(args):
            head_in_fp32_under_autocast(self.accelerator.unwrap_model(self.model))
        self._opo_logits_to_keep = accepts_logits_to_keep(self.model)
        self._opo_head_verified = False
        self.opo_loss_path = self._choose_loss_path()

    # ---- the loss's deferred value checks (deferred_checks.py) --------------------------------

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        check_deferred_agreed("at the end of training")  # the last loss calls have no next one
        return output

    def evaluate(self, *args, **kwargs):
        check_deferred_agreed("before evaluation")
        metrics = super().evaluate(*args, **kwargs)
        check_deferred_agreed("at the end of evaluation")  # its loss calls have no backward
        return metrics

    def _save_checkpoint(self, *args, **kwargs):
        check_deferred_agreed("before saving a checkpoint")
        return super()._save_checkpoint(*args, **kwargs)

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
        check_whole_groups(inputs, group_size)
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
        return pack_groups(output, num_seqs, group_size)

    # ---- the loss ---------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if "opo_rewards" not in inputs:
            raise ValueError(
                "OPOTrainer's loss needs a batch built by "
                "OPOTrainer._generate_and_score_completions (it has no 'opo_rewards')"
            )
        batch, group_size = unpack_groups(inputs)
        mode = "train" if self.model.training else "eval"
        completion_ids = batch["completion_ids"]
        input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        mask = batch["completion_mask"].bool() & batch["opo_scorable"][:, None]
        if "tool_mask" in batch:
            mask = mask & batch["tool_mask"].bool()
        # the logits are a slice of the model's output: with grad_to_base its gradient is
        # written whole (zeros at the prompt and last positions), without autograd's slice
        # backward
        cfg = self._opo_config_to_base if self.opo_loss_path == "logits" else self._opo_config
        if self.args.opo_weights == "grpo_advantages":
            cfg = cfg.replace(weights=batch["advantages"].float())
        # old_per_token_logps is None when TRL is on-policy: the loss then uses the detached
        # current log-probs as π_ref.
        data = (completion_ids, batch.get("old_per_token_logps"), batch["opo_rewards"])
        layout = {"mask": mask, "group_size": group_size}

        if self.opo_loss_path == "fused_linear":
            hidden, weight, bias, outputs = self._opo_completion_hidden(
                model, input_ids, attention_mask, completion_ids.size(1))
            budget = self.args.opo_logits_budget
            if budget is None:  # what TRL's fused head holds (paths.py)
                budget = default_logits_budget(*weight.shape, weight.element_size())
            loss, metrics = fused_linear_opo_loss_with_config(
                hidden, weight, *data, cfg, bias=bias, chunk_size=self.args.opo_chunk_size,
                logits_budget=budget, **layout)
        elif self.opo_loss_path == "trl_fused_head":
            logprobs, entropy, vocab_size, outputs = self._opo_completion_logprobs(
                model, input_ids, attention_mask, completion_ids, mask)
            options = self._opo_logprob_options
            if self.args.opo_weights == "grpo_advantages":
                options = dict(options, weights=batch["advantages"].float())
            loss, metrics = opo_loss_from_logprobs(
                logprobs, *data[1:], entropy=entropy, vocab_size=vocab_size, **layout,
                **options)
        else:
            logits, outputs = self._opo_completion_logits(model, input_ids, attention_mask,
                                                          completion_ids.size(1))
            loss, metrics = opo_loss_with_config(logits, *data, cfg, **layout)

        if getattr(self, "aux_loss_enabled", False):  # MoE load balancing, as GRPOTrainer does
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
        self._opo_log_metrics(mode, metrics, mask)
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
        return completion_positions(outputs.logits, num_completion), outputs

    def _opo_completion_hidden(self, model, input_ids, attention_mask, num_completion: int):
        """(hidden [B, C, H], weight [V, H], bias [V] or None, model outputs) such that
        ``hidden @ weight.T + bias`` are the logits that predict the completion tokens, in the
        dtype the model's own head computes them in. The model's head runs on one position.
        Under FSDP2 the head's unit is unsharded first (``unshard_head``): the weight is whole
        and its gradient goes back through FSDP's reduce-scatter."""
        unwrapped = self.accelerator.unwrap_model(model)
        head = find_lm_head(unwrapped, casts_head_to_fp32(self.args))
        outputs = self._opo_forward(model, input_ids, attention_mask,
                                    output_hidden_states=LAST_HIDDEN_STATE, logits_to_keep=1)
        if not outputs.hidden_states or outputs.hidden_states[-1] is None:
            raise RuntimeError(
                "OPOTrainer: opo_loss_path='fused_linear' needs the final hidden states, but "
                f"{type(unwrapped).__name__} returned none for output_hidden_states; set "
                "opo_loss_path='logits'")
        unshard_head(unwrapped, head)
        final = outputs.hidden_states[-1]  # [B, P + C, H], after the final norm
        dtype = self._opo_head_dtype(head.weight)
        weight, bias = head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)
        if not self._opo_head_verified:
            verify_head(final[:, -1], weight, bias, outputs.logits[:, -1])
            self._opo_head_verified = True
        hidden = completion_positions(final, num_completion).to(dtype)
        return hidden, weight, bias, outputs

    def _opo_completion_logprobs(self, model, input_ids, attention_mask, completion_ids,
                                 mask):
        """(log-probs [B, C], entropy [B, C] or None, V, model outputs) of the completion tokens
        from TRL's fused LM head (which GRPOTrainer patched into the model): it projects and
        scores only the positions whose label is set, here the counted ones (``mask``); the
        others come back as 0 and the loss does not read them. The entropy is passed with its
        gradient only when the bonus needs it (opo_entropy_coef > 0), else detached, for the
        metric (opo_log_entropy)."""
        labels = torch.full_like(input_ids, -100)
        labels[:, -completion_ids.size(1):] = completion_ids.masked_fill(~mask, -100)
        # FSDP2: TRL's head reads the head weight inside the model's forward, after the
        # backbone, and turns a still-sharded weight into a whole one with DTensor's
        # full_tensor(), whose gradient FSDP does not average over the ranks. Unsharding the
        # head's unit at that point (a no-op when it is already whole, as in accelerate's
        # layout) gives TRL the unsharded parameter, whose gradient FSDP reduce-scatters.
        unwrapped = self.accelerator.unwrap_model(model)
        patched = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else \
            unwrapped
        backbone = getattr(patched, "base_model", None)
        hook = None
        if isinstance(backbone, torch.nn.Module) and backbone is not patched:
            head = patched.get_output_embeddings()
            hook = backbone.register_forward_hook(
                lambda module, args, output: unshard_head(patched, head))
        try:
            outputs = self._opo_forward(model, input_ids, attention_mask, labels=labels,
                                        fused_lm_head=True)
        finally:
            if hook is not None:
                hook.remove()
        if getattr(outputs, "log_probs", None) is None:
            raise RuntimeError(
                "OPOTrainer: opo_loss_path='trl_fused_head': the model returned no log_probs "
                "with fused_lm_head=True (TRL's fused LM head is not patched into it); set "
                "opo_loss_path='logits'")
        num_completion = completion_ids.size(1)
        logprobs = outputs.log_probs[:, -num_completion:]
        entropy = getattr(outputs, "entropy", None)
        if entropy is not None and self._opo_config.with_entropy:
            entropy = entropy[:, -num_completion:]
            if self._opo_config.entropy_coef == 0:
                entropy = entropy.detach()
        else:
            entropy = None
        # V for the adaptive τ rule: the head's width (a DTensor or ZeRO-3 shard keeps it)
        vocab_size = unwrapped.get_output_embeddings().out_features
        return logprobs, entropy, vocab_size, outputs

    def _opo_head_dtype(self, weight: torch.Tensor) -> torch.dtype:
        """The dtype of ``lm_head(hidden)`` in the model's forward: fp32 under TRL's
        cast_lm_head_to_fp32 (whose head computes in fp32, with autocast off:
        ``head_in_fp32_under_autocast``), else the autocast dtype under mixed precision
        (accelerate then returns the logits converted to fp32, so their dtype does not tell),
        else the weight's."""
        if casts_head_to_fp32(self.args):
            return torch.float32
        device = weight.device.type
        with self.accelerator.autocast():
            if weight.dtype != torch.float64 and torch.is_autocast_enabled(device):
                return torch.get_autocast_dtype(device)
        return weight.dtype

    # ---- which loss path -----------------------------------------------------------------

    def _choose_loss_path(self) -> str:
        """The loss path this trainer runs (``paths.choose_path``): the one asked for, refused
        with its reason when it cannot run here; for "auto" the first that can, in the order
        of the schedule (off-policy when TRL keeps old log-probs)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        cast = casts_head_to_fp32(self.args)
        problems = {
            "fused_linear": problem_of(lambda: self._check_fused_linear(unwrapped, cast)),
            "trl_fused_head": problem_of(lambda: self._check_trl_fused_head(unwrapped, cast)),
        }
        off_policy = off_policy_schedule(self.args, bool(getattr(self, "use_vllm", False)))
        path, passed_over = choose_path(self.args.opo_requested_path, problems, off_policy)
        if passed_over:
            message = (f"OPOTrainer: opo_loss_path='auto' runs {path!r}; passed over: "
                       + "; ".join(passed_over))
            if path == "logits":  # the costly path: the user should know
                warnings.warn(message, stacklevel=3)
            else:
                logger.info(message)
        for name in ("opo_chunk_size", "opo_logits_budget"):
            if getattr(self.args, name) is not None and path != "fused_linear":
                why = "; ".join(passed_over) or (
                    "opo_loss_path='auto' runs TRL's fused head on an on-policy schedule; set "
                    "opo_loss_path='fused_linear'")
                raise ValueError(f"OPOTrainer: {name} applies to the 'fused_linear' loss "
                                 f"path, but this trainer runs {path!r}: {why}")
        return path

    def _fsdp_version(self) -> int:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return int(getattr(plugin, "fsdp_version", 1) or 1)

    def _check_fused_linear(self, unwrapped, cast: bool) -> None:
        """Raises what opo_loss_path='fused_linear' cannot reproduce exactly."""
        why = None
        if self.is_fsdp_enabled and self._fsdp_version() != 2:
            why = ("FSDP version 1 flattens the LM head weight into its own buffers; use "
                   "FSDP2 (fsdp_version: 2), whose head unit the loss unshards")
        elif self.is_deepspeed_enabled and zero3_enabled():
            why = ("DeepSpeed ZeRO-3 gathers the LM head weight only inside the head's own "
                   "forward; opo_loss_path='trl_fused_head' runs TRL's fused LM head, which "
                   "gathers it")
        elif not self._opo_logits_to_keep:
            why = (f"{type(unwrapped).__name__}.forward takes no logits_to_keep, so the "
                   "model's own head would still compute the logits of every position")
        if why:
            raise NotImplementedError(f"OPOTrainer: opo_loss_path='fused_linear' is not "
                                      f"supported here: {why}; set opo_loss_path='logits'")
        find_lm_head(unwrapped, cast)
        check_logit_transforms(unwrapped.config)

    @staticmethod
    def _check_trl_fused_head(unwrapped, cast: bool) -> None:
        """Raises what opo_loss_path='trl_fused_head' cannot run: a TRL without the fused LM
        head, or a head that it would bypass (it reads the head's weight directly)."""
        if not trl_fused_head_available():
            raise NotImplementedError(
                "OPOTrainer: opo_loss_path='trl_fused_head' needs TRL's fused LM head "
                "(trl.trainer.utils.add_fused_lm_head, TRL >= 1.16); set "
                "opo_loss_path='logits'")
        find_lm_head(unwrapped, cast, "trl_fused_head")

    def _opo_log_metrics(self, mode: str, metrics: Dict[str, torch.Tensor],
                         mask: torch.Tensor) -> None:
        """The call's metrics over the processes: the mean (omega_max: the max) over the calls
        that count a token. A call that counts none (every completion truncated and masked,
        or unscorable) reports the defaults (τ = its start, ω = v = 0), which would pull the
        logged means toward them; where no process counts a token, nothing is logged."""
        names = list(metrics)
        values = [metrics[name].float() for name in names]
        counted = mask.any().to(values[0].dtype)
        gathered = self.accelerator.gather(torch.stack([counted, *values])[None])
        gathered = gathered.reshape(-1, len(names) + 1)
        keep = gathered[:, 0] > 0
        if not bool(keep.any()):
            return
        rows = gathered[keep, 1:]
        reduced = torch.where(torch.tensor([n == "omega_max" for n in names],
                                           device=rows.device),
                              rows.max(0).values, rows.mean(0))
        for name, value in zip(names, reduced.tolist()):
            self._metrics[mode][f"opo/{name}"].append(value)

