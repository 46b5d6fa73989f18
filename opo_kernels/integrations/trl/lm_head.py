"""The LM head of OPOTrainer's fused loss paths: finding it, refusing what
``hidden @ weight.T + bias`` would not reproduce exactly, gathering an FSDP2-sharded head for
the fused-linear loss, and checking the head against the model's own logits."""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.distributed as dist

from ...inputs import FLOAT_DTYPES
from ..agree import collective_device, distributed

try:  # FSDP2 (torch >= 2.6 exposes it here)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    FSDPModule = DTensor = None

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


def head_class(head: torch.nn.Module) -> type:
    """The class of ``head`` without FSDP2's wrapper: ``fully_shard`` swaps a module's class
    for ``FSDP<Name>(FSDPModule, <Name>)``, which adds hooks and keeps the forward."""
    cls = type(head)
    if FSDPModule is not None and issubclass(cls, FSDPModule):
        bases = [b for b in cls.__bases__ if b is not FSDPModule]
        if len(bases) == 1:
            return bases[0]
    return cls


def find_lm_head(model, cast_lm_head_to_fp32: bool,
                 path: str = "fused_linear") -> torch.nn.Linear:
    """The LM head of the unwrapped model, refused unless ``hidden @ weight.T + bias`` with
    its float weight is the whole head (what both fused paths compute; ``path`` names the
    caller's loss path in the messages)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    fallback = "set opo_loss_path='logits'"
    if head is None:
        raise ValueError(f"OPOTrainer: opo_loss_path={path!r} needs the LM head from "
                         f"get_output_embeddings(); {type(model).__name__} has none; {fallback}")
    # TRL's cast_lm_head_to_fp32 replaces the head's forward by an fp32 linear (handled by
    # _opo_head_dtype); any other instance-level forward is unknown
    patched = "forward" in vars(head) and not cast_lm_head_to_fp32
    if head_class(head) is not torch.nn.Linear or patched:
        raise ValueError(
            f"OPOTrainer: opo_loss_path={path!r} needs a plain torch.nn.Linear LM head, got "
            f"{head_class(head).__name__}{' with a patched forward' if patched else ''}: the "
            "fused loss computes hidden @ weight.T + bias itself, so a LoRA adapter on the head, "
            f"a quantized head or a custom forward would be bypassed; {fallback}")
    if head.weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"OPOTrainer: opo_loss_path={path!r} needs a float LM head weight, "
                         f"got {head.weight.dtype}; {fallback}")
    return head


def unshard_head(model: torch.nn.Module, head: torch.nn.Module) -> None:
    """FSDP2: makes ``head.weight`` (and bias) the whole, unsharded parameter, by an
    all-gather of the FSDP unit that owns the head (``FSDPModule.unshard``; a no-op when its
    parameters are still unsharded after the forward, as for a root unit or a unit with
    ``reshard_after_forward=False``). The fused loss then reads the gathered weight, its
    gradient accumulates on the unsharded parameter, and FSDP reduce-scatters it in the
    backward into the sharded gradient like any other (averaged over the data-parallel
    ranks). Collective: every rank calls it in the same step. Nothing to do without FSDP2."""
    weight = head.weight
    if DTensor is None or not isinstance(weight, DTensor):
        return
    owner = _fsdp_owner(model, head)
    if owner is None:
        raise NotImplementedError(
            "OPOTrainer: opo_loss_path='fused_linear': the LM head weight is a DTensor that "
            "no FSDP2 unit (fully_shard) of the model manages (tensor parallelism?); only "
            "data-parallel FSDP2 sharding is supported; set opo_loss_path='logits'")
    owner.unshard()
    if isinstance(head.weight, DTensor):  # pragma: no cover - would be an FSDP2 change
        raise RuntimeError("OPOTrainer: FSDPModule.unshard() left the LM head weight sharded")


def _fsdp_owner(model: torch.nn.Module, head: torch.nn.Module):
    """The FSDP2 unit that manages ``head``'s parameters: the nearest of the head and its
    ancestors that ``fully_shard`` was applied to (a unit manages the parameters of its
    subtree that no inner unit manages; the head is a leaf)."""
    names = {id(module): name for name, module in model.named_modules()}
    name = names.get(id(head))
    if name is None:
        return None
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        if isinstance(module, FSDPModule):
            return module
    return None


def check_logit_transforms(config) -> None:
    """Refuses a model config that transforms the logits after the LM head (LOGIT_TRANSFORMS):
    the fused loss computes them as ``hidden @ weight.T + bias`` and nothing else."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(text_config, name, None)
        if value is not None and (neutral is None or value != neutral):
            raise ValueError(
                f"OPOTrainer: opo_loss_path='fused_linear' computes the logits as hidden @ "
                f"lm_head.weight.T (+ bias), but the model config sets {name}={value!r} (the "
                "model transforms its logits after the LM head); set "
                "opo_loss_path='trl_fused_head' (which applies it) or 'logits'")


@torch.no_grad()
def verify_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                logits: torch.Tensor) -> None:
    """``hidden @ weight.T + bias`` [B, V] must be the model's own logits [B, V] at the same
    position (catches a model that scales or caps its logits, or feeds its head something
    else than ``hidden_states[-1]``). Tolerance: the two matmuls may round differently.
    Under torch.distributed the verdict is agreed (one all-reduce of a float), so that every
    rank raises together instead of one leaving the others waiting in the next collective."""
    ours = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    theirs = logits.float()
    tol = 2e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-3
    err = (ours - theirs).abs().max()
    # relative error; NaN (a non-finite logit) counts as a mismatch: nan_to_num makes it inf
    ratio = torch.nan_to_num(err / (tol * (1.0 + theirs.abs().max())), nan=float("inf"))
    if distributed():
        ratio = ratio.to(collective_device())
        dist.all_reduce(ratio, op=dist.ReduceOp.MAX)
    if not ratio.item() <= 1.0:
        raise RuntimeError(
            "OPOTrainer: opo_loss_path='fused_linear': the LM head applied to "
            f"hidden_states[-1] does not reproduce the model's logits (max abs difference "
            f"{err.item():.3g} here; worst rank: {ratio.item():.3g}x the tolerance); this model "
            "transforms its logits or its head input in a way the fused loss cannot; set "
            "opo_loss_path='logits'")


def casts_head_to_fp32(args) -> bool:
    return bool(getattr(args, "cast_lm_head_to_fp32", False))  # not in older TRL


def head_in_fp32_under_autocast(model: torch.nn.Module) -> None:
    """TRL's ``cast_lm_head_to_fp32`` replaces the LM head's forward by an fp32 linear, which
    autocast (bf16 / fp16 mixed precision) still runs in its own dtype; TRL's fused head, which
    gives π_ref (the old log-probs), turns autocast off. The head's forward gets autocast off
    too, so that the model's logits are the fp32 ones the option asks for and π_ref is taken
    from the same logits the loss differentiates. Idempotent; a head without TRL's patched
    forward is left alone."""
    head = model.get_output_embeddings()
    forward = vars(head).get("forward") if head is not None else None
    if forward is None or getattr(forward, "_opo_autocast_off", False):
        return

    def forward_in_fp32(hidden_states):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return forward(hidden_states)

    forward_in_fp32._opo_autocast_off = True
    head.forward = forward_in_fp32


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
