"""The fused OPO loss under torch.compile: torch.library custom ops, each phase of a
general-mode call one opaque op with a shape-only fake implementation, and the
autograd.Function that calls them (``CompiledOPOFunction``). Eager calls go through
``fused_opo.FusedOPOFunction`` and a ``CallPlan`` instead.

    opo_kernels::fused_forward     forward row kernel + epilogue -> (logprobs [N], stats
                                   [N, 2], entropy [N] or [0], loss, metrics [8], coef [B, 2],
                                   scal [2], errs [NUM_ERR])
    opo_kernels::fused_backward    ∂L/∂logits into a new tensor
    opo_kernels::fused_backward_   ∂L/∂logits written over the logits (inplace_backward)

The math: docs/spec.md.
"""

# No `from __future__ import annotations` here: torch < 2.5 reads a custom op's schema from
# its annotations and refuses them as strings ("unsupported type torch.Tensor").
from typing import List, Optional

import torch

from .call_plan import Flags, batch_of
from .epilogue import METRICS, NUM_ERR, run_epilogue
from .inputs import compute_dtype
from .row_launch import Rows, backward_rows, forward_rows
from .utils import first_order_only


def forward_impl(logits, labels, ref, mask, seq_ids, rewards, group_ids, weights, params, flags):
    """The general mode's forward from tensors and flags: the custom op's implementation, with
    outputs of their own (a custom op's outputs may not alias each other, so no workspace).
    Returns (logprobs [N], stats [N, 2], entropy [N] or [0], loss, metrics [8], coef [B, 2],
    scal [2], errs [NUM_ERR])."""
    f = Flags(*flags)
    batch = batch_of(logits, labels, ref, mask, seq_ids, rewards, group_ids, weights,
                     f.group_size)
    lp, stats, ent = forward_rows(logits, Rows.of(batch), params, bool(f.with_entropy))
    counter = torch.zeros(1, dtype=torch.int32, device=logits.device)  # the epilogue's ticket
    out = run_epilogue(batch, f.mode, params, counter, logprobs=lp.view(labels.shape),
                       entropy=None if ent is None else ent.view(labels.shape), stats=stats,
                       validate=bool(f.validate))
    ent = ent if ent is not None else lp.new_empty(0)
    return lp, stats, ent, out.loss, out.metrics, out.coef, out.scal, out.errs


def backward_impl(logits, labels, ref, mask, seq_ids, lp, stats, ent, coef, scal, grad_loss, params,
              flags, inplace: bool) -> torch.Tensor:
    """∂L/∂logits (written into logits when inplace, else into a new tensor): the custom
    ops' implementation."""
    f = Flags(*flags)
    rows = Rows(labels, mask, seq_ids, ref, labels.numel(),
                labels.shape[1] if labels.dim() == 2 else None, f.num_seqs)
    entropy = ent if ent.numel() and f.mode.bonus else None  # metric-only entropy: no term
    return backward_rows(logits, rows, lp, stats, entropy, coef, scal, grad_loss, params,
                         ("sequence", "sequence_mean", "token")[f.mode.level],
                         "ratio" if f.mode.ratio else "log", inplace=inplace)


def _fake_forward(logits, labels, rewards, flags):
    n, cdtype = labels.numel(), compute_dtype(logits.dtype)
    new = lambda *shape, dtype=cdtype: logits.new_empty(shape, dtype=dtype)  # noqa: E731
    return (new(n), new(n, 2), new(n if Flags(*flags).with_entropy else 0), new(),
            new(len(METRICS)),
            new(max(rewards.shape[0], 1), 2), new(2), new(NUM_ERR, dtype=torch.int32))


@torch.library.custom_op("opo_kernels::fused_forward", mutates_args=())
def forward_op(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
                mask: Optional[torch.Tensor], seq_ids: Optional[torch.Tensor],
                rewards: torch.Tensor, group_ids: Optional[torch.Tensor],
                weights: Optional[torch.Tensor], params: torch.Tensor, flags: List[int]
                ) -> List[torch.Tensor]:
    """The general mode's forward (the one-pass mode is eager only: FusedOPOFunction)."""
    return list(forward_impl(logits, labels, ref, mask, seq_ids, rewards, group_ids, weights,
                         params, flags))


@forward_op.register_fake
def _(logits, labels, ref, mask, seq_ids, rewards, group_ids, weights, params, flags):
    return list(_fake_forward(logits, labels, rewards, flags))


@torch.library.custom_op("opo_kernels::fused_backward", mutates_args=())
def backward_op(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
                 mask: Optional[torch.Tensor], seq_ids: Optional[torch.Tensor],
                 lp: torch.Tensor, stats: torch.Tensor, ent: torch.Tensor, coef: torch.Tensor,
                 scal: torch.Tensor, grad_loss: torch.Tensor, params: torch.Tensor,
                 flags: List[int]) -> torch.Tensor:
    return backward_impl(logits, labels, ref, mask, seq_ids, lp, stats, ent, coef, scal, grad_loss,
                     params, flags, inplace=False)


@backward_op.register_fake
def _(logits, labels, ref, mask, seq_ids, lp, stats, ent, coef, scal, grad_loss, params, flags):
    # contiguous, as the op's own result (``backward_rows``: a fresh tensor of the shape),
    # whatever the logits' strides: Inductor checks the real strides against these
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("opo_kernels::fused_backward_", mutates_args=("logits",))
def backward_inplace_op(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
                         mask: Optional[torch.Tensor], seq_ids: Optional[torch.Tensor],
                         lp: torch.Tensor, stats: torch.Tensor, ent: torch.Tensor,
                         coef: torch.Tensor, scal: torch.Tensor, grad_loss: torch.Tensor,
                         params: torch.Tensor, flags: List[int]) -> None:
    backward_impl(logits, labels, ref, mask, seq_ids, lp, stats, ent, coef, scal, grad_loss, params,
              flags, inplace=True)


def call(op, impl, *args):
    """The custom op under torch.compile; its implementation directly otherwise."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


class CompiledOPOFunction(torch.autograd.Function):
    """loss, metrics = CompiledOPOFunction.apply(logits, labels, ref, mask, seq_ids, rewards,
    group_ids, weights, params, flags, inplace): a general-mode call traced by torch.compile,
    one custom op per phase (the on-policy one-pass mode is eager only; traced, on-policy runs
    the general mode). logits [N, V] or [B, T, V] (the only input with a gradient); params:
    ``epilogue.params_tensor``; flags: ``call_plan.Flags`` as a tuple of ints; inplace: the
    backward writes ∂L/∂logits over the logits. metrics [8]: ``epilogue.METRICS``, not
    differentiable.

    Only tensors and constants go in: Dynamo before torch 2.11 cannot hand a config or Batch
    object made inside the traced function to an autograd.Function. Under torch.compile,
    AOTAutograd functionalizes an in-place scale of a saved gradient into a clone plus the
    scale (a full extra pass over [N, V]), so the gradient is computed in backward (2 reads +
    1 write in all); the in-place backward, a write into a graph input, Inductor keeps in
    place. Both checked on the generated code in tests/test_compile.py."""

    @staticmethod
    def forward(ctx, logits, labels, ref, mask, seq_ids, rewards, group_ids, weights, params,
                flags, inplace):
        flags = list(flags)
        lp, stats, ent, loss, metrics, coef, scal, _ = call(
            forward_op, forward_impl, logits, labels, ref, mask, seq_ids, rewards, group_ids,
            weights, params, flags)
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)  # no zeros for the metrics' (unused) gradient
        ctx.flags, ctx.inplace = flags, inplace
        # copies: nothing checks that the caller's were not changed in place before backward
        # (eager calls check their versions instead; these are O(N) values beside [N, V])
        ctx.batch_tensors = tuple(None if t is None else t.clone()
                                  for t in (labels, ref, mask, seq_ids))
        ctx.save_for_backward(logits, lp, stats, ent, coef, scal, params)
        return loss, metrics

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, grad_metrics=None):
        nones = (None,) * 10
        if grad_loss is None:  # the loss was not used (its metrics carry no gradient)
            return (None, *nones)
        logits, lp, stats, ent, coef, scal, params = ctx.saved_tensors
        labels, ref, mask, seq_ids = ctx.batch_tensors
        args = (logits, labels, ref, mask, seq_ids, lp, stats, ent, coef, scal, grad_loss,
                params, ctx.flags)
        if ctx.inplace:
            call(backward_inplace_op, lambda *a: backward_impl(*a, inplace=True), *args)
            return (logits, *nones)
        return (call(backward_op, lambda *a: backward_impl(*a, inplace=False), *args), *nones)
