"""The OPO loss from per-token log-probs, for trainers that never hand logits to the loss
(verl, OpenRLHF, NeMo-RL, Megatron with vocabulary-parallel cross-entropy): docs/spec.md
"The entry points" and "The gradient". Launchers -> autograd.Function -> API.

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

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import OPOLossConfig, config_from_options
from .epilogue import Mode, params_tensor, run_epilogue, unpack_metrics
from .inputs import Batch, prepare_logprobs
from .row_kernels import row_seq, token_coef
from .row_launch import Rows, acc_type, small_geometry
from .utils import cdiv, first_order_only, new_output, use_triton
from .validation import check_at_backward, check_values_of

# --------------------------------------------------------------------------------------------
# Kernel and launcher
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "N", "lp_sb", "ref_sb", "sel_sb", "num_seqs"])
def _logprob_grad_kernel(
    lp_ptr, lp_sb, lp_st, ref_ptr, ref_sb, ref_st, sel_ptr, sel_sb, sel_st, num_seqs,
    coef_ptr, scal_ptr, grad_loss_ptr, grad_lp_ptr, grad_ent_ptr, T, N,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, TOKEN: tl.constexpr,
    RATIO: tl.constexpr, WITH_ENT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """∂L/∂lp_t = c_t·g and ∂L/∂H_t = −β/N'·g (0 where not counted) for BLOCK token rows;
    g = the upstream gradient, read on device. Outputs are contiguous in the row order."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_n = r < N
    b, t, seq = row_seq(tl.minimum(r, N - 1), T, sel_ptr, sel_sb, sel_st, num_seqs, PACKED,
                        HAS_MASK)
    counted = in_n & (seq >= 0)
    seq = tl.where(counted, seq, 0)
    g = tl.load(grad_loss_ptr).to(ACC)
    lp = tl.load(lp_ptr + b * lp_sb + t * lp_st, mask=counted, other=0.0).to(ACC)
    ref = lp
    if HAS_REF:
        ref = tl.load(ref_ptr + b * ref_sb + t * ref_st, mask=counted, other=0.0).to(ACC)
    c = token_coef(seq, lp, ref, coef_ptr, scal_ptr, g, TOKEN, RATIO)
    tl.store(grad_lp_ptr + r, tl.where(counted, c, 0.0).to(grad_lp_ptr.dtype.element_ty),
             mask=in_n)
    if WITH_ENT:
        d_ent = tl.load(scal_ptr + 1).to(ACC) * g
        tl.store(grad_ent_ptr + r, tl.where(counted, d_ent, 0.0).to(grad_ent_ptr.dtype.element_ty),
                 mask=in_n)


def logprob_gradients(rows: Rows, logprobs: torch.Tensor, entropy_like: Optional[torch.Tensor],
                      coef: torch.Tensor, scal: torch.Tensor, grad_loss: torch.Tensor,
                      level: str, coordinates: str):
    """(∂L/∂logprobs, ∂L/∂entropy or None): fresh tensors shaped and typed like logprobs (and
    like entropy_like), from the epilogue's coef [B, 2] and scal [2]."""
    grad_lp = new_output(logprobs.shape, logprobs.dtype, logprobs.device)
    grad_ent = (None if entropy_like is None else
                new_output(entropy_like.shape, entropy_like.dtype, entropy_like.device))
    n = rows.num_rows
    if n:
        block = 1024
        ref = rows.ref
        _logprob_grad_kernel[(cdiv(n, block),)](
            logprobs, *small_geometry(logprobs), ref if ref is not None else logprobs,
            *small_geometry(ref), *rows.selector(logprobs), coef, scal, grad_loss,
            grad_lp, grad_ent if grad_ent is not None else grad_lp, rows.T, n,
            HAS_REF=ref is not None, TOKEN=level == "token", RATIO=coordinates == "ratio",
            WITH_ENT=grad_ent is not None, ACC=acc_type(coef.dtype), BLOCK=block, num_warps=4,
            **rows.flags(),
        )
    return grad_lp, grad_ent


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


class LogprobOPOFunction(torch.autograd.Function):
    """loss, metrics_vector = LogprobOPOFunction.apply(logprobs, entropy, batch, cfg).

    logprobs (and entropy, when given) receive gradients; ω, τ, p̃, Q are constants.
    Two launches in all: the epilogue (forward) and the gradient kernel (backward).
    """

    @staticmethod
    def forward(ctx, logprobs, entropy, batch: Batch, cfg: OPOLossConfig):
        params = params_tensor(cfg, logprobs.device, batch.compute_dtype)
        counter = torch.zeros(1, dtype=torch.int32, device=logprobs.device)
        out = run_epilogue(batch, Mode.of(cfg, batch.weights is not None), params, counter,
                           logprobs=logprobs.detach(),
                           entropy=None if entropy is None else entropy.detach(),
                           from_logits=False, validate=cfg.validate)
        # validate=True: the one host sync; "deferred": read at backward or the next call
        ctx.deferred = check_values_of(cfg, out.errs, batch)
        ctx.mark_non_differentiable(out.metrics)
        ctx.set_materialize_grads(False)  # no zeros for the metrics' (unused) gradient
        ctx.rows, ctx.cfg = Rows.of(batch), cfg
        ctx.versions = ctx.rows.versions()
        ctx.entropy_like = None if entropy is None else entropy.detach()
        ctx.save_for_backward(logprobs.detach(), out.coef, out.scal)
        return out.loss, out.metrics

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, grad_metrics):
        check_at_backward(ctx.deferred)
        if grad_loss is None:  # the loss was not used (its metrics carry no gradient)
            return None, None, None, None
        ctx.rows.check_unchanged(ctx.versions, "opo_loss_from_logprobs")
        logprobs, coef, scal = ctx.saved_tensors
        wants_entropy = ctx.entropy_like is not None and ctx.needs_input_grad[1]
        grad_lp, grad_ent = logprob_gradients(
            ctx.rows, logprobs, ctx.entropy_like if wants_entropy else None, coef, scal,
            grad_loss, ctx.cfg.level, ctx.cfg.coordinates)
        return grad_lp, grad_ent, None, None


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


def opo_loss_from_logprobs(logprobs, ref_logprobs, rewards, *, mask=None, seq_ids=None,
                           group_size=None, group_ids=None, entropy=None, vocab_size=None,
                           **options):
    """The OPO loss (docs/spec.md) from per-token log-probs.

    Padded layout: logprobs / ref_logprobs / mask / entropy [B, T]. Packed layout: logprobs /
    ref_logprobs / seq_ids / entropy [N] (seq_ids −1 = not counted). rewards [B]; exactly one of
    group_size / group_ids [B]. ref_logprobs=None: on-policy (π_ref = the detached logprobs).

    logprobs: differentiable, any float dtype (computed in float32, float64 for float64).
    entropy: optional per-token entropy, differentiable: the bonus −β·mean H (entropy_coef=β)
    and the ``entropy_mean`` metric use it; required when entropy_coef > 0. It is the only
    source of ``entropy_mean``: compute_entropy=True without it is a ValueError.
    vocab_size: V, needed only by the adaptive τ rule (adaptive_tau=True, the default).
    options: those of ``opo_loss`` (the fields of ``OPOLossConfig``); temperature must stay
    1.0 (the log-probs are taken as given); inplace_backward, grad_to_base and
    vocab_parallel_one_pass apply to logits only (ValueError).

    Returns the 0-dim loss, or (loss, metrics) with return_metrics=True — the same values as
    ``opo_loss(logits, ...)`` when logprobs are the logits' log-probs at the label.
    """
    from . import reference  # local import: the reference is only needed for backend="torch"

    cfg = config_from_options(options)
    batch = prepare_logprobs(logprobs, ref_logprobs, rewards, entropy=entropy,
                             vocab_size=vocab_size, mask=mask, seq_ids=seq_ids,
                             group_size=group_size, group_ids=group_ids, config=cfg)
    if not use_triton(cfg.backend, logprobs.device):
        return reference.loss_from_logprobs_batch(batch, cfg)
    loss, metrics = LogprobOPOFunction.apply(logprobs, entropy, batch, cfg)
    if not cfg.return_metrics:
        return loss
    return loss, unpack_metrics(metrics, entropy is not None)
