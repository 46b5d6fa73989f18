"""The LM head of OPOTrainer's fused-linear path (``opo_fused_linear=True``): finding it,
refusing what ``hidden @ weight.T + bias`` would not reproduce exactly, and the dtype the
model's own head computes in."""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from ...inputs import FLOAT_DTYPES

# output_hidden_states for the fused-linear path. transformers >= 5 accepts indices and then
# keeps only those (the others are None): not keeping every layer's output matters under
# accelerate's mixed precision, which returns fp32 copies of all 16-bit outputs. Older versions
# take it as True and return every layer (hidden_states[-1] is the final one either way).
try:
    from transformers.utils.output_capturing import selected_hidden_states as _selects
except ImportError:
    LAST_HIDDEN_STATE = True
else:
    del _selects
    LAST_HIDDEN_STATE = [-1]

# Config fields of models that transform the logits after the LM head (the ones TRL 1.16's
# fused LM head reads): value that means "no transform" (None: any value is one).
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0,
                    "output_multiplier": 1.0, "lm_head_multiplier": 1.0, "logits_scaling": 1.0}


def find_lm_head(model, cast_lm_head_to_fp32: bool) -> torch.nn.Linear:
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



def check_logit_transforms(config) -> None:
    """Refuses a model config that transforms the logits after the LM head (LOGIT_TRANSFORMS):
    the fused loss computes them as ``hidden @ weight.T + bias`` and nothing else."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(text_config, name, None)
        if value is not None and (neutral is None or value != neutral):
            raise ValueError(
                f"OPOTrainer: opo_fused_linear=True computes the logits as hidden @ "
                f"lm_head.weight.T (+ bias), but the model config sets {name}={value!r} (the "
                "model transforms its logits after the LM head); set opo_fused_linear=False")

@torch.no_grad()
def verify_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
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


def casts_head_to_fp32(args) -> bool:
    return bool(getattr(args, "cast_lm_head_to_fp32", False))  # not in older TRL


def zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - very old transformers
        return False
    return is_deepspeed_zero3_enabled()


def accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward without a signature
        return False
