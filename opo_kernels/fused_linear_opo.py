"""The OPO loss fused with the LM head (logits = hidden @ weight.T + bias), chunked over token
rows so that the [N, V] logits are never materialized: launchers -> autograd.Function -> API.

The Triton kernels are the ones of ``fused_opo.py``; ``linear_chunks.py`` feeds them chunks of
rows, this file holds the autograd function and the API.
With C = chunk_size and rows flattened to [N, H] (padded [B, T, H] row-major, or packed):

  phase 1 (forward), per chunk:  logits_c = hidden_c @ weight.T + bias        [C, V], input dtype
                                 forward_rows(logits_c) -> lp, stats, H_t     [C], [C, 2]
          then ONCE over all N rows: epilogue -> loss, metrics, c_t           (epilogue.py)
  phase 2 (backward), the logits recomputed block by block, each block's gradient written IN
          PLACE by backward_rows(c_t·grad_loss), then multiplied into the three gradients.
          ∂hidden sums over V and ∂W over the rows, so the loop cuts the smaller dimension
          (its accumulator is the smaller one; ``linear_chunks.backward_chunks``):
          N < V, per block of Vb columns (N·Vb <= C·V logits):
                                 logits_b = hidden @ weight[b].T + bias[b]    [N, Vb]
                                 grad_weight[b] = grad_logits_b.T @ hidden    (written once)
                                 grad_hidden   += grad_logits_b @ weight[b]   (fp32)
                                 grad_bias[b]   = grad_logits_b.sum(0)
          N >= V, per chunk of C rows:
                                 grad_hidden_c = grad_logits_c @ weight       (input dtype)
                                 grad_weight  += grad_logits_c.T @ hidden_c   (fp32)
                                 grad_bias    += grad_logits_c.sum(0)         (fp32)

The epilogue sees all N rows at once, so chunks may cut through sequences and groups: the loss
and gradients are those of ``opo_loss(hidden @ weight.T + bias, ...)`` for any chunk size.

On-policy (ref_logprobs=None) needs one phase only: π_ref is the detached current policy, so
Δ_t ≡ 0 exactly, v ≡ 0, p̃ is uniform within each group whatever τ is, and c_t (and ∂L/∂H_t)
depend only on rewards, groups, weights and lengths, not on the logits. The coefficients are
computed first (epilogue on zero log-probs, which gives the same c_t bit for bit); then each
chunk's logits go through ONE kernel (``forward_rows`` in its one-pass mode: statistics, then
the gradient for a unit upstream gradient written over the logits) and the chunk's matmuls;
the backward only scales the gradients. The epilogue then runs again on the real log-probs
for the loss and the metrics (τ, entropy and k3 do depend on them). With a vocabulary-parallel
weight the same one phase runs with the row statistics combined chunk by chunk
(``on_policy_chunks``).

Example::

    loss = fused_linear_opo_loss(hidden[:, :-1], lm_head.weight, input_ids[:, 1:],
                                 old_logprobs, rewards, mask=completion_mask, group_size=6)
    loss.backward()
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .config import OPOLossConfig, config_from_options
from .epilogue import Mode, params_tensor, raise_bad_values, run_epilogue, unpack_metrics
from .inputs import Batch, check_tensor, compute_dtype, prepare
from .linear_chunks import (
    backward_chunks,
    default_chunk_size,
    forward_chunks,
    on_policy_chunks,
)
from .row_launch import Rows
from .tensor_parallel import config_or_fail_together, prepare_together
from .utils import use_triton
from .vocab_parallel import require_fused_kernels

# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _scale(grad: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad·grad_loss in ``dtype`` (the parameter's), multiplied in fp32 (fp64) and rounded
    once. An fp32 accumulator (∂W, ∂b) going to a 16-bit parameter is scaled and cast in ONE
    pass, the product rounded on store (6 bytes per element instead of a multiply and then a
    cast, 14: ~4 GB less traffic per call for a 128256 × 4096 LM head). The saved gradient is
    never scaled in place: a retained graph's second backward reads it again."""
    acc = compute_dtype(grad.dtype)
    if grad.dtype == acc and dtype != acc:
        out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
        return torch.mul(grad, grad_loss.to(acc), out=out)
    return (grad.to(acc) * grad_loss.to(acc)).to(dtype)


class FusedLinearOPOFunction(torch.autograd.Function):
    """loss, metrics_vector = FusedLinearOPOFunction.apply(hidden, weight, bias, batch, cfg,
    chunk_size, one_phase, tp).

    hidden, weight and bias receive gradients (ω, τ, p̃, Q are constants; ref_logprobs and
    rewards are data). one_phase: on-policy batch whose gradients are wanted (see module doc).
    tp = (group, vocab_start, reduce_hidden_grad) for a vocabulary-parallel LM head (weight and
    bias: this rank's slice), else None: the gradient of hidden is then this slice's part,
    summed over the group here when reduce_hidden_grad (the caller's layer does it otherwise).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, batch: Batch, cfg: OPOLossConfig, chunk_size: int,
                one_phase: bool, tp):
        hidden2d = hidden.reshape(-1, hidden.shape[-1])  # a copy only for a non-viewable layout
        needs = tuple(ctx.needs_input_grad[:3])
        params = params_tensor(cfg, hidden.device, batch.compute_dtype)
        counters = torch.zeros(2, dtype=torch.int32, device=hidden.device)  # epilogue tickets
        if one_phase:
            (logprobs, stats, entropy), grads = on_policy_chunks(
                hidden2d, weight, bias, batch, cfg, params, counters[0:1], chunk_size, needs,
                None if tp is None else tp[:2])
        else:
            logprobs, stats, entropy = forward_chunks(hidden2d, weight, bias, batch, cfg, params,
                                                      chunk_size, None if tp is None else tp[:2])
        shape = batch.labels.shape
        out = run_epilogue(batch, Mode.of(cfg, batch.weights is not None), params,
                           counters[1:2], logprobs=logprobs.view(shape),
                           entropy=None if entropy is None else entropy.view(shape), stats=stats,
                           validate=cfg.validate)
        if cfg.validate:
            raise_bad_values(out.errs, batch)
        ctx.mark_non_differentiable(out.metrics)
        ctx.set_materialize_grads(False)  # no zeros for the metrics' (unused) gradient
        ctx.one_phase, ctx.cfg, ctx.chunk_size, ctx.needs = one_phase, cfg, chunk_size, needs
        ctx.hidden_shape, ctx.dtypes = hidden.shape, (hidden.dtype, weight.dtype,
                                                      None if bias is None else bias.dtype)
        ctx.rows, ctx.tp = Rows.of(batch), tp
        if one_phase:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(hidden, weight, bias, logprobs, stats,
                                  entropy if cfg.entropy_in_gradient else None, out.coef,
                                  out.scal, params)
        return out.loss, out.metrics

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_metrics):
        if grad_loss is None:  # the loss was not used (its metrics carry no gradient)
            return None, None, None, None, None, None, None, None
        cfg, tp = ctx.cfg, ctx.tp
        if ctx.one_phase:  # gradients were formed in forward for a unit upstream gradient
            grad_hidden, grad_weight, grad_bias = (
                None if g is None else _scale(g, grad_loss, dtype)
                for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        else:
            (hidden, weight, bias, logprobs, stats, entropy, coef, scal,
             params) = ctx.saved_tensors
            grad_hidden, grad_weight, grad_bias = backward_chunks(
                hidden.reshape(-1, hidden.shape[-1]), weight, bias, ctx.rows,
                (logprobs, stats, entropy, coef, scal), grad_loss, params, cfg,
                ctx.chunk_size, ctx.needs, vocab_start=0 if tp is None else tp[1],
            )
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if grad_hidden is not None:
            # cast before the all-reduce: it moves hidden's dtype whichever loop ran
            grad_hidden = grad_hidden.to(hidden_dtype)
            if tp is not None and tp[2]:
                torch.distributed.all_reduce(grad_hidden, group=tp[0])  # Σ over the slices
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Functional API and module
# --------------------------------------------------------------------------------------------


def _check_linear(hidden, weight, bias) -> None:
    """The LM-head arguments (SPEC "Bad input" style: name the argument and the shapes)."""
    check_tensor("hidden", hidden, kind="stream")
    check_tensor("weight", weight, kind="stream")
    if bias is not None:
        check_tensor("bias", bias, kind="stream")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] (padded) or [N, H] (packed), got shape "
                         f"{list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V, H] with V >= 1, got shape {list(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {list(weight.shape)} but hidden "
                         f"{list(hidden.shape)} has hidden size H={hidden.shape[-1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V]=[{weight.shape[0]}] like weight "
                         f"{list(weight.shape)}, got {list(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype} "
                            "(the logits are computed in the input dtype)")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or
                                   not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _linear_config(options) -> OPOLossConfig:
    cfg = config_from_options(options)
    if cfg.inplace_backward:
        raise ValueError("inplace_backward does not apply: the fused-linear backward "
                         "always writes into its own chunk buffer")
    if cfg.grad_to_base:
        raise ValueError("grad_to_base does not apply: the fused-linear loss takes hidden "
                         "states, not logits")
    return cfg


def prepare_linear(hidden, weight, bias, labels, ref_logprobs, rewards, cfg: OPOLossConfig,
                   **layout) -> Batch:
    """``inputs.prepare`` for hidden states: checks hidden/weight/bias, then the usual checks
    on a zero-stride stand-in for the logits [..., V] (never read, no memory)."""
    _check_linear(hidden, weight, bias)
    stand_in = hidden.new_empty(()).expand(*hidden.shape[:-1], weight.shape[0])
    try:
        return prepare(stand_in, labels, ref_logprobs, rewards, config=cfg, **layout)
    except (TypeError, ValueError) as err:  # messages speak of logits: say which ones
        raise type(err)(f"{err} (logits = hidden @ weight.T: hidden {list(hidden.shape)}, "
                        f"weight {list(weight.shape)})") from None


def fused_linear_opo_loss(hidden, weight, labels, ref_logprobs, rewards, *, bias=None,
                          chunk_size=None, mask=None, seq_ids=None, group_size=None,
                          group_ids=None, process_group=None, vocab_start=None,
                          reduce_hidden_grad=True, **options):
    """The OPO loss (shared/SPEC.md) of the logits ``hidden @ weight.T + bias``, computed chunk
    by chunk so that at most ``chunk_size × V`` logits exist at any time.

    Padded layout: hidden [B, T, H], labels / ref_logprobs / mask [B, T]. Packed layout:
    hidden [N, H], labels / ref_logprobs / seq_ids [N] (−1 = not counted). weight: [V, H],
    bias: [V] or None, same dtype as hidden (fp32/bf16/fp16/fp64); rewards [B]; exactly one of
    group_size / group_ids. ref_logprobs=None: on-policy (π_ref = detached current policy).
    options: those of ``opo_kernels.opo_loss`` (the fields of ``OPOLossConfig``).

    Gradients flow to hidden, weight and bias. The result equals
    ``opo_loss(hidden @ weight.T + bias, ...)`` for any chunk size, up to rounding.

    chunk_size: token rows per chunk (N = token rows). Default: the largest power of two whose
    logits take at most 256 MiB (rows·V·itemsize), clamped to [128, N]
    (``default_chunk_size``). At most chunk_size·V logits exist at any time, never [N, V]. The
    backward recomputes the logits in blocks of as many logits and cuts the smaller of N and V
    (module docstring). Memory beyond the inputs and the returned gradients: the logits buffer
    in the input dtype (the gradient is written into it), O(N) fp32 statistics, and while the
    gradients are formed one fp32 accumulator, for 16-bit inputs plus one 16-bit product per
    block before it is added:
      N < V (the usual case):  [N, H] for ∂hidden (none when one block holds all of V);
                               ∂W is written once per block in the weight's dtype;
      N >= V:                  [V, H] for ∂W ([V] for ∂b).
    On-policy (below) runs over chunks of rows, with the [V, H] accumulator. A padded hidden
    that is a non-contiguous view (e.g. ``hidden[:, :-1]``) is copied to [N, H] by reshape.

    On-policy with gradients wanted, the loop runs ONCE (forward and gradients together, exact:
    see the module docstring); the [N, H] / [V, H] gradients are then held from forward to
    backward. Otherwise the backward recomputes each chunk's logits (one extra matmul).

    backend="torch" materializes the full logits and runs the reference (for testing).

    Vocabulary-parallel LM head: with ``process_group``, weight [V_local, H] (and bias
    [V_local]) are this rank's slice of the vocabulary, starting at ``vocab_start`` (default
    rank·V_local); labels are global ids. The loss and metrics are those of the whole
    vocabulary on every rank; weight/bias get their slice's gradient. hidden's gradient is
    Σ over the slices: with reduce_hidden_grad=True (default) this op all-reduces it, so every
    rank gets the full gradient; pass False when hidden comes through a layer whose backward
    does that all-reduce itself (Megatron's ``copy_to_tensor_model_parallel_region`` before a
    column-parallel head), and each rank gets its slice's part.

    Example::

        loss = fused_linear_opo_loss(hidden, lm_head.weight, labels, old_logprobs, rewards,
                                     mask=mask, group_size=6, chunk_size=1024)
    """
    def checked_config():
        _check_chunk_size(chunk_size)
        return _linear_config(options)

    cfg = config_or_fail_together(process_group, checked_config)
    return fused_linear_opo_loss_with_config(
        hidden, weight, labels, ref_logprobs, rewards, cfg, bias=bias, chunk_size=chunk_size,
        mask=mask, seq_ids=seq_ids, group_size=group_size, group_ids=group_ids,
        process_group=process_group, vocab_start=vocab_start,
        reduce_hidden_grad=reduce_hidden_grad,
    )


def fused_linear_opo_loss_with_config(hidden, weight, labels, ref_logprobs, rewards,
                                      cfg: OPOLossConfig, *, bias=None, chunk_size=None,
                                      mask=None, seq_ids=None, group_size=None,
                                      group_ids=None, process_group=None, vocab_start=None,
                                      reduce_hidden_grad=True):
    """``fused_linear_opo_loss`` with an already validated config (used by the module)."""
    from . import reference  # local import: the reference is only needed for backend="torch"

    layout = dict(mask=mask, seq_ids=seq_ids, group_size=group_size, group_ids=group_ids)
    tp = None
    if process_group is not None:
        batch, tp = _prepare_parallel(hidden, weight, bias, labels, ref_logprobs, rewards, cfg,
                                      process_group, vocab_start, reduce_hidden_grad,
                                      chunk_size, layout)
    else:
        if vocab_start is not None:
            raise ValueError("vocab_start applies to a vocabulary-parallel weight: pass "
                             "process_group too")
        batch = prepare_linear(hidden, weight, bias, labels, ref_logprobs, rewards, cfg,
                               **layout)
        if not use_triton(cfg.backend, hidden.device):
            logits = torch.nn.functional.linear(hidden, weight, bias)
            return reference.loss_from_batch(dataclasses.replace(batch, logits=logits), cfg)
    if chunk_size is None:
        # vocabulary-parallel: from the global V, the same on every rank (the on-policy chunks
        # each run collectives; slices of uneven sizes could round to different chunk sizes)
        vocab = weight.shape[0] if tp is None else \
            -(-batch.vocab // torch.distributed.get_world_size(process_group))
        chunk_size = default_chunk_size(batch.num_rows, vocab, hidden.shape[-1], hidden.dtype)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    # on-policy: one phase, also vocabulary-parallel (see on_policy_chunks)
    one_phase = batch.ref_logprobs is None and wants_grad and cfg.one_pass_exact
    loss, metrics = FusedLinearOPOFunction.apply(hidden, weight, bias, batch, cfg, chunk_size,
                                                 one_phase, tp)
    if not cfg.return_metrics:
        return loss
    return loss, unpack_metrics(metrics, cfg.with_entropy)


def _prepare_parallel(hidden, weight, bias, labels, ref_logprobs, rewards, cfg, group,
                      vocab_start, reduce_hidden_grad, chunk_size, layout):
    """Checks of a vocabulary-parallel call, agreed by every rank (see tensor_parallel)."""
    def checked():
        if not isinstance(reduce_hidden_grad, bool):
            raise TypeError(f"reduce_hidden_grad must be a bool, got {reduce_hidden_grad!r}")
        batch = prepare_linear(hidden, weight, bias, labels, ref_logprobs, rewards, cfg,
                               **layout)
        require_fused_kernels(cfg, batch)
        return batch

    vocab_local = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() else 0
    batch, start = prepare_together(group, checked, vocab_local, vocab_start, cfg,
                                    agree={"chunk_size": chunk_size,
                                           "reduce_hidden_grad": reduce_hidden_grad},
                                    # every rank's slice of the logits is hidden @ its weight
                                    agree_tensors={"hidden": hidden})
    return batch, (group, start, reduce_hidden_grad)


class FusedLinearOPOLoss(torch.nn.Module):
    """``nn.Module`` form of ``fused_linear_opo_loss``; options (and chunk_size) are fixed at
    construction, the LM head's weight / bias are passed to forward (as in Liger's
    ``LigerFusedLinearGRPOLoss``), so the module holds no parameters.

    Example::

        loss_fn = FusedLinearOPOLoss(alpha=0.6, chunk_size=1024)
        loss = loss_fn(hidden, lm_head.weight, labels, old_logprobs, rewards,
                       mask=mask, group_size=6)
    """

    def __init__(self, chunk_size: Optional[int] = None, **options):
        super().__init__()
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.config = _linear_config(options)

    def forward(self, hidden, weight, labels, ref_logprobs, rewards, bias=None, *, mask=None,
                seq_ids=None, group_size=None, group_ids=None, process_group=None,
                vocab_start=None, reduce_hidden_grad=True):
        return fused_linear_opo_loss_with_config(
            hidden, weight, labels, ref_logprobs, rewards, self.config, bias=bias,
            chunk_size=self.chunk_size, mask=mask, seq_ids=seq_ids, group_size=group_size,
            group_ids=group_ids, process_group=process_group, vocab_start=vocab_start,
            reduce_hidden_grad=reduce_hidden_grad,
        )

    def extra_repr(self) -> str:
        return ", ".join([f"chunk_size={self.chunk_size!r}"] + [
            f"{k}={getattr(self.config, k)!r}" for k in
            ("alpha", "mu", "level", "coordinates", "weights", "backend")])
