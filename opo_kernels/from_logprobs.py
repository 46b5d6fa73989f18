"""The OPO loss from per-token log-probs, for trainers that never hand logits to the loss
(verl, OpenRLHF, NeMo-RL, Megatron with vocabulary-parallel cross-entropy): SPEC "Loss from
per-token log-probs". Launchers -> autograd.Function -> API.

The caller computed lp_t (and, for the entropy bonus, H_t) with autograd; this op computes the
same loss, metrics and options as ``opo_loss`` from them, with the gradient

    ∂L/∂lp_t = c_t (the epilogue's per-token coefficients),   ∂L/∂H_t = −β/N'

(0 on tokens not counted). It is the epilogue of the fused logits path, on the caller's
log-probs instead of the forward kernel's.

Example::

    logprobs = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    loss = opo_loss_from_logprobs(logprobs, old_logprobs, rewards, mask=mask, group_size=6,
                                  vocab_size=logits.shape[-1])
    loss.backward()          # reaches the model through logprobs
"""

from __future__ import annotations

import torch

from .config import OPOLossConfig
from .epilogue import batch_epilogue, pack_metrics, unpack_metrics
from .inputs import Batch, check_values, prepare_logprobs
from .utils import use_triton


class LogprobOPOFunction(torch.autograd.Function):
    """loss, metrics_vector = LogprobOPOFunction.apply(logprobs, entropy, batch, cfg).

    logprobs (and entropy, when given) receive gradients; ω, τ, p̃, Q are constants."""

    @staticmethod
    def forward(ctx, logprobs, entropy, batch: Batch, cfg: OPOLossConfig):
        cdtype = batch.compute_dtype
        lp = logprobs.detach().reshape(-1).to(cdtype)
        ent = None if entropy is None else entropy.detach().reshape(-1).to(cdtype)
        if cfg.validate and not torch.compiler.is_compiling():  # the one host sync
            check_values(batch, None, lp)
        out = batch_epilogue(cfg, batch, lp, ent)
        metrics = pack_metrics(cfg, out, with_entropy=ent is not None)
        ctx.mark_non_differentiable(metrics)
        ctx.shapes = (logprobs.shape, logprobs.dtype,
                      None if entropy is None else (entropy.shape, entropy.dtype))
        ctx.save_for_backward(out.coef, out.entropy_coef, batch.seq)
        return out.loss, metrics

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_metrics):
        coef, entropy_coef, seq = ctx.saved_tensors
        (shape, dtype, entropy_meta) = ctx.shapes
        grad_loss = grad_loss.to(coef.dtype)
        grad_lp = (coef * grad_loss).to(dtype).view(shape)
        grad_ent = None
        if entropy_meta is not None and ctx.needs_input_grad[1]:
            e_shape, e_dtype = entropy_meta
            grad_ent = torch.where(seq >= 0, entropy_coef * grad_loss, 0.0).to(e_dtype)
            grad_ent = grad_ent.view(e_shape)
        return grad_lp, grad_ent, None, None


def opo_loss_from_logprobs(logprobs, ref_logprobs, rewards, *, mask=None, seq_ids=None,
                           group_size=None, group_ids=None, entropy=None, vocab_size=None,
                           **options):
    """The OPO loss (shared/SPEC.md) from per-token log-probs.

    Padded layout: logprobs / ref_logprobs / mask / entropy [B, T]. Packed layout: logprobs /
    ref_logprobs / seq_ids / entropy [N] (seq_ids −1 = not counted). rewards [B]; exactly one of
    group_size / group_ids [B]. ref_logprobs=None: on-policy (π_ref = the detached logprobs).

    logprobs: differentiable, any float dtype (computed in float32, float64 for float64).
    entropy: optional per-token entropy, differentiable: the bonus −β·mean H (entropy_coef=β)
    and the ``entropy_mean`` metric use it; required when entropy_coef > 0.
    vocab_size: V, needed only by the adaptive τ rule (adaptive_tau=True, the default).
    options: those of ``opo_loss`` (the fields of ``OPOLossConfig``); temperature must stay
    1.0 (the log-probs are taken as given) and inplace_backward does not apply.

    Returns the 0-dim loss, or (loss, metrics) with return_metrics=True — the same values as
    ``opo_loss(logits, ...)`` when logprobs are the logits' log-probs at the label.
    """
    from . import reference  # local import: the reference is only needed for backend="torch"

    cfg = OPOLossConfig(**options)
    batch = prepare_logprobs(logprobs, ref_logprobs, rewards, entropy=entropy,
                             vocab_size=vocab_size, mask=mask, seq_ids=seq_ids,
                             group_size=group_size, group_ids=group_ids, config=cfg)
    if not use_triton(cfg.backend, logprobs.device):
        return reference.loss_from_logprobs_batch(batch, cfg)
    loss, metrics = LogprobOPOFunction.apply(logprobs, entropy, batch, cfg)
    if not cfg.return_metrics:
        return loss
    return loss, unpack_metrics(cfg, metrics, with_entropy=entropy is not None)
