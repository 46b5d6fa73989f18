"""The OPO loss fused with the LM head (logits = hidden @ weight.T + bias), chunked over token
rows so that the logits of all rows are never materialized: autograd.Function -> API.

The Triton kernels are the ones of ``fused_opo.py``. ``linear_rows.py`` finds the R counted
rows (padded rows with mask == 0 and packed rows with seq_ids == −1 are never read, never
multiplied); ``linear_plan.py`` cuts them into chunks; ``linear_chunks.py`` runs the loops;
``linear_inputs.py`` checks the arguments.
With C = rows per chunk and R_h = rows whose logits fit ``logits_budget``:

  phase 1 (forward):  logits of rows [0, R_h) in one matmul, KEPT for the backward; then per
                      chunk of the other rows: logits_c = hidden_c @ weight.T + bias [C, V]
                      (input dtype), forward_rows(logits_c) -> lp, stats, H_t [C], [C, 2];
                      then ONCE over all R rows: epilogue -> loss, metrics, c_t (epilogue/)
  phase 2 (backward): the kept logits' gradient written IN PLACE by backward_rows, then
                      multiplied (∂hidden of rows [0, R_h), ∂W, ∂b); the other rows' logits
                      recomputed block by block, each block's gradient written in place and
                      multiplied (``linear_chunks.backward_chunks``: blocks of columns when
                      those rows are fewer than V, ∂W written once per block; else chunks
                      of rows with an fp32 [V, H] accumulator)

Matmuls (in units of one [R, H] x [H, V] product): 4 − R_h/R; 3 when the budget holds all.
The epilogue sees all R rows at once, so chunks may cut through sequences and groups: the
loss and gradients are those of ``opo_loss(hidden @ weight.T + bias, ...)`` for any chunk
size and budget.

On-policy (ref_logprobs=None) needs one phase only: π_ref is the detached current policy, so
Δ_t ≡ 0 exactly, v ≡ 0, p̃ is uniform within each group whatever τ is, and c_t (and ∂L/∂H_t)
depend only on rewards, groups, weights and lengths, not on the logits. The coefficients are
computed first (epilogue on counts only, which gives the same c_t bit for bit); then each
chunk's logits go through ONE kernel (``forward_rows`` in its one-pass mode: statistics, then
the gradient for a unit upstream gradient written over the logits) and the chunk's two
gradient matmuls: 3 matmuls in all. The backward only scales the gradients. The epilogue then
runs again on the real log-probs for the loss and the metrics (τ, entropy and k3 do depend on
them). With a vocabulary-parallel weight the same one phase runs with the row statistics
combined chunk by chunk (``linear_chunks.on_policy_chunks``). The math: docs/spec.md.

Example::

    loss = fused_linear_opo_loss(hidden[:, :-1], lm_head.weight, input_ids[:, 1:],
                                 old_logprobs, rewards, bias=lm_head.bias,
                                 mask=completion_mask, group_size=6)
    loss.backward()
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from .config import OPOLossConfig
from .epilogue import ERRORS, Mode, params_tensor, raise_bad_values, run_epilogue, unpack_metrics
from .inputs import compute_dtype
from .linear_chunks import backward_chunks, forward_chunks, kept_logits, on_policy_chunks
from .linear_inputs import check_chunk_size, linear_config, prepare_linear, prepare_parallel
from .linear_plan import LinearPlan, check_logits_budget, plan_chunks
from .linear_rows import CountedRows, counted_rows, explain_nonfinite
from .row_launch import Rows
from .tensor_parallel import config_or_fail_together
from .utils import first_order_only, one_pass_mode, use_triton, wants_grad

# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _scale(grad: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad·grad_loss in ``dtype`` (the parameter's), multiplied in fp32 (fp64) and rounded
    once, in ONE pass: an fp32 accumulator (∂W, ∂b) going to a 16-bit parameter reads 4 and
    writes 2 bytes per element, a 16-bit gradient (∂hidden; ∂W of one chunk) reads 2 and
    writes 2 (against 14 and 20 for a cast, a multiply and a cast: ~4 GB less traffic per
    call for a 128256 × 4096 LM head). The scale is given one dimension per dimension of grad
    so that it takes part in the type promotion: the product is computed in fp32 (fp64), not
    in grad's 16-bit dtype with a rounded scale (a 0-dim tensor would be cast to it). The
    saved gradient is never scaled in place: a retained graph's second backward reads it
    again."""
    acc = compute_dtype(grad.dtype)
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    return torch.mul(grad, grad_loss.to(acc).reshape((1,) * grad.dim()), out=out)


def _raise_bad_values(errs: torch.Tensor, rows: CountedRows, hidden_c, weight, bias,
                      group) -> None:
    """The epilogue's value checks (one host sync), plus the mask values the counted-rows
    batch cannot see; non-finite logits are reported as what the caller passed: hidden,
    weight or bias (``explain_nonfinite``)."""
    if rows.mask_errors is not None:
        errs[ERRORS.index("mask")] += rows.mask_errors.to(errs.dtype)
    raise_bad_values(errs, rows.batch, explain=_explain_logits(hidden_c, weight, bias, group))


def _explain_logits(hidden_c, weight, bias, group=None):
    """The value checks' ``explain``: non-finite logits reported as hidden, weight or bias
    (``explain_nonfinite``), every other argument with the default message."""
    def explain(name, count):
        if name == "logits":
            return explain_nonfinite(hidden_c, weight, bias, count, group)
        return None
    return explain


def _take_held(ctx, hidden_c, weight, bias) -> Optional[torch.Tensor]:
    """The kept logits, taken from ctx (consumed: the backward writes their gradient over
    them, and backward_chunks then holds their only reference, dropped before it recomputes
    the other rows); a retained graph's second backward finds none and recomputes them."""
    held, ctx.held = ctx.held, None
    if held is None and ctx.plan.held_rows:
        held = kept_logits(hidden_c, weight, bias, ctx.plan.held_rows)
    return held


class FusedLinearOPOFunction(torch.autograd.Function):
    """loss, metrics_vector = FusedLinearOPOFunction.apply(hidden, weight, bias, hidden_c,
    rows, cfg, plan, tp).

    hidden, weight and bias receive gradients (ω, τ, p̃, Q are constants; ref_logprobs and
    rewards are data). hidden_c [M, H]: the counted rows of hidden (``rows.gather``, detached),
    the only ones read; rows: ``linear_rows.CountedRows``; plan: ``linear_plan.LinearPlan``.
    tp = (group, vocab_start, reduce_hidden_grad) for a vocabulary-parallel LM head (weight and
    bias: this rank's slice), else None: the gradient of hidden is then this slice's part,
    summed over the group here when reduce_hidden_grad (the caller's layer does it otherwise).
    The logits kept for the backward (plan.held_rows) are held on ctx, not saved: the backward
    writes their gradient over them and drops them (their memory goes before the other rows'
    blocks are recomputed); a retained graph's second backward recomputes them in the same
    matmul, so that it gives the first one's gradients bit for bit.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, hidden_c, rows: CountedRows, cfg: OPOLossConfig,
                plan: LinearPlan, tp):
        batch = rows.batch
        needs = tuple(ctx.needs_input_grad[:3])
        params = params_tensor(cfg, hidden.device, batch.compute_dtype)
        counters = torch.zeros(2, dtype=torch.int32, device=hidden.device)  # epilogue tickets
        local_tp = None if tp is None else tp[:2]
        held = None
        if plan.one_phase:
            (logprobs, stats, entropy), grads = on_policy_chunks(
                hidden_c, weight, bias, batch, cfg, params, counters[0:1], plan.chunk_rows,
                needs, local_tp)
        else:
            (logprobs, stats, entropy), held = forward_chunks(
                hidden_c, weight, bias, batch, cfg, params, plan.chunk_rows, plan.held_rows,
                local_tp)
        shape = batch.labels.shape
        out = run_epilogue(batch, Mode.of(cfg, batch.weights is not None), params,
                           counters[1:2], logprobs=logprobs.view(shape),
                           entropy=None if entropy is None else entropy.view(shape), stats=stats,
                           validate=cfg.validate)
        if cfg.validate:
            _raise_bad_values(out.errs, rows, hidden_c, weight, bias,
                              None if tp is None else tp[0])
        ctx.mark_non_differentiable(out.metrics)
        ctx.set_materialize_grads(False)  # no zeros for the metrics' (unused) gradient
        ctx.cfg, ctx.plan, ctx.needs, ctx.rows, ctx.tp = cfg, plan, needs, rows, tp
        ctx.hidden_shape, ctx.dtypes = hidden.shape, (hidden.dtype, weight.dtype,
                                                      None if bias is None else bias.dtype)
        ctx.held = held
        if plan.one_phase:
            ctx.save_for_backward(*grads)
        else:
            # the backward reads labels, mask, seq_ids, ref_logprobs again: the caller's own
            # tensors when every row counts (else copies of the counted rows)
            ctx.row_view = Rows.of(batch)
            ctx.versions = ctx.row_view.versions()
            ctx.save_for_backward(hidden_c, weight, bias, logprobs, stats,
                                  entropy if cfg.entropy_in_gradient else None, out.coef,
                                  out.scal, params)
        return out.loss, out.metrics

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, grad_metrics):
        if grad_loss is None:  # the loss was not used (its metrics carry no gradient)
            return (None,) * 8
        # the forward ran with autocast off (the operands cast first): so does the backward,
        # which on the CPU runs on the caller's thread, in its autocast state
        with _autocast_off(_autocast_device(grad_loss)):
            return FusedLinearOPOFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        cfg, tp = ctx.cfg, ctx.tp
        if ctx.plan.one_phase:  # gradients were formed in forward for a unit upstream gradient
            grad_hidden, grad_weight, grad_bias = (
                None if g is None else _scale(g, grad_loss, dtype)
                for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        else:
            (hidden_c, weight, bias, logprobs, stats, entropy, coef, scal,
             params) = ctx.saved_tensors
            ctx.row_view.check_unchanged(ctx.versions, "fused_linear_opo_loss")
            grad_hidden, grad_weight, grad_bias = backward_chunks(
                hidden_c, weight, bias, ctx.row_view,
                (logprobs, stats, entropy, coef, scal), grad_loss, params, cfg,
                ctx.plan.chunk_rows, ctx.needs, vocab_start=0 if tp is None else tp[1],
                held=_take_held(ctx, hidden_c, weight, bias))
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if grad_hidden is not None:
            # cast before the all-reduce: it moves hidden's dtype whichever loop ran; the
            # counted rows only, scattered after it
            grad_hidden = grad_hidden.to(hidden_dtype)
            if tp is not None and tp[2]:
                torch.distributed.all_reduce(grad_hidden, group=tp[0])  # Σ over the slices
            grad_hidden = ctx.rows.scatter(grad_hidden, ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Functional API and module
# --------------------------------------------------------------------------------------------


def fused_linear_opo_loss(hidden, weight, labels, ref_logprobs, rewards, *, bias=None,
                          chunk_size=None, logits_budget=None, mask=None, seq_ids=None,
                          group_size=None, group_ids=None, process_group=None,
                          vocab_start=None, reduce_hidden_grad=True, **options):
    """The OPO loss (docs/spec.md) of the logits ``hidden @ weight.T + bias``, computed chunk
    by chunk on the counted rows only, without materializing the logits of all rows.

    Padded layout: hidden [B, T, H], labels / ref_logprobs / mask [B, T]. Packed layout:
    hidden [N, H], labels / ref_logprobs / seq_ids [N] (−1 = not counted). weight: [V, H],
    bias: [V] or None, same dtype as hidden (fp32/bf16/fp16/fp64); rewards [B]; exactly one of
    group_size / group_ids. ref_logprobs=None: on-policy (π_ref = detached current policy).
    options: those of ``opo_kernels.opo_loss`` (the fields of ``OPOLossConfig``).
    Under ``torch.autocast``, hidden, weight and bias (other than fp64) are cast to its dtype
    as a linear layer's operands would be, and the loss runs on them: the logits in that
    dtype, the gradients returned in each argument's own dtype.

    Gradients flow to hidden, weight and bias. The result equals
    ``opo_loss(hidden @ weight.T + bias, ...)`` for any chunk size and budget, up to rounding.

    Counted rows only: the R rows with mask != 0 (padded) or seq_ids != −1 (packed) are
    gathered once ([R, H], in hidden's dtype) and every matmul runs on them: the time follows
    the counted tokens, not B·T, and an uncounted row of hidden is never read (a NaN there
    leaves the loss and every gradient finite); hidden's gradient is zero on those rows.
    Finding them costs ONE device-to-host sync per call (``torch.nonzero``: the count R sizes
    the buffers), none for a padded call without mask; with validate=True the value checks
    add their own one. A non-finite value in hidden (at a counted row), weight or bias is
    reported naming that argument.

    chunk_size: counted rows per chunk. Default: the largest power of two whose logits take
    at most 256 MiB (rows·V·itemsize), clamped to [128, R]. The backward recomputes the logits
    it did not keep, once the kept ones are freed, in blocks of as many logits as a chunk or
    the kept rows hold, whichever is more: blocks of columns when those rows are fewer than
    V, else chunks of rows (docs/kernels.md "From hidden states").

    logits_budget: bytes (int >= 0) of logits, in the input dtype, that the general mode keeps
    from forward to backward instead of recomputing them; None = the default, 1 GiB (reasoned,
    not measured). The first R_h = min(R, ⌊budget / (V·itemsize)⌋) counted rows are kept;
    their gradient is written over their logits in backward and multiplied: matmuls, in units
    of one [R, H] × [H, V] product, 4 − R_h/R (4 with budget 0: every logit recomputed; 3 with a
    budget that holds all R rows, like materializing the logits).
    On-policy the budget sets the chunk instead: chunks of max(chunk_size, ⌊budget /
    (V·itemsize)⌋) rows.

    Memory beyond the inputs, the returned gradients and O(R) fp32 per-row statistics: the
    counted rows of hidden when some rows are dropped or hidden cannot be viewed as [R, H]
    (a copy, held to the backward); logits
    of at most ``logits_budget`` bytes kept from forward to backward PLUS one chunk's
    workspace (chunk_size·V logits; the backward's blocks hold as many, or as many as the
    kept logits once those are freed): the logits never take more than
    budget + chunk_size·V·itemsize bytes (on-policy: one chunk of at most
    max(budget, chunk_size·V·itemsize) bytes); while the gradients are formed, one fp32
    accumulator and, for 16-bit inputs off CUDA, one 16-bit product per block before it is
    added (on CUDA the matmul adds it in fp32 itself):
      rows not kept < V (the usual case): [R − R_h, H] for ∂hidden (none when one block holds
                            all of V); ∂W is written in the weight's dtype;
      rows not kept >= V, and on-policy:   [V, H] for ∂W ([V] for ∂b; none for ∂W when one
                            chunk holds all the rows).

    On-policy with gradients wanted, the loop runs ONCE (forward and gradients together, exact:
    Δ ≡ 0, so the gradient coefficients are known before the logits, except with
    logit_reg_coef > 0 and the adaptive τ, which run the general mode), 3 matmuls, and the
    [R, H] / [V, H] gradients are held from forward to backward (a second backward with
    retain_graph=True works: it scales them again). Its ∂W sums over the chunks in the fp32
    [V, H] accumulator, read and written once per chunk: 8·V·H bytes, 12 for 16-bit inputs
    off CUDA (4.2 GB at V = 128,256, H = 4096), the reason its chunks take the whole budget;
    one chunk writes ∂W once, in the weight's dtype (then scaled by the upstream gradient:
    for 16-bit weights a second rounding unless that gradient is a power of two, 1 included).

    backend="torch" runs the reference on the logits of the counted rows (for testing).

    Vocabulary-parallel LM head: with ``process_group``, weight [V_local, H] (and bias
    [V_local]) are this rank's slice of the vocabulary, starting at ``vocab_start`` (default
    rank·V_local); labels are global ids. The loss and metrics are those of the whole
    vocabulary on every rank; weight/bias get their slice's gradient. hidden's gradient is
    Σ over the slices: with reduce_hidden_grad=True (default) this op all-reduces it (the
    counted rows only), so every rank gets the full gradient; pass False when hidden comes
    through a layer whose backward does that all-reduce itself (Megatron's
    ``copy_to_tensor_model_parallel_region`` before a column-parallel head), and each rank
    gets its slice's part. Every rank must pass the same mask / seq_ids (hence the same
    counted rows), chunk_size and logits_budget: with validate=True they are compared.

    Example::

        loss = fused_linear_opo_loss(hidden, lm_head.weight, labels, old_logprobs, rewards,
                                     bias=lm_head.bias,   # None for a head without bias
                                     mask=mask, group_size=6, logits_budget=2**30)
    """
    sizes = {}

    def checked_config():
        sizes["chunk"] = check_chunk_size(chunk_size)
        sizes["budget"] = check_logits_budget(logits_budget)
        return linear_config(options)

    cfg = config_or_fail_together(process_group, checked_config)
    chunk_size, logits_budget = sizes["chunk"], sizes["budget"]
    return fused_linear_opo_loss_with_config(
        hidden, weight, labels, ref_logprobs, rewards, cfg, bias=bias, chunk_size=chunk_size,
        logits_budget=logits_budget, mask=mask, seq_ids=seq_ids, group_size=group_size,
        group_ids=group_ids, process_group=process_group, vocab_start=vocab_start,
        reduce_hidden_grad=reduce_hidden_grad,
    )


# Eager only: its chunk loops (host-side plans, collectives per chunk, launches into
# buffers it sizes itself) are not traced; in a compiled region the call is a graph break
# and runs as it does eagerly.
@torch.compiler.disable
def fused_linear_opo_loss_with_config(hidden, weight, labels, ref_logprobs, rewards,
                                      cfg: OPOLossConfig, *, bias=None, chunk_size=None,
                                      logits_budget=None, mask=None, seq_ids=None,
                                      group_size=None, group_ids=None, process_group=None,
                                      vocab_start=None, reduce_hidden_grad=True):
    """``fused_linear_opo_loss`` with an already validated config (used by the module)."""
    autocast_type = _autocast_device(hidden)
    if autocast_type is not None:  # once more with the operands cast, and autocast off
        hidden, weight, bias = _autocast_operands(autocast_type, hidden, weight, bias)
        with _autocast_off(autocast_type):
            return fused_linear_opo_loss_with_config(
                hidden, weight, labels, ref_logprobs, rewards, cfg, bias=bias,
                chunk_size=chunk_size, logits_budget=logits_budget, mask=mask, seq_ids=seq_ids,
                group_size=group_size, group_ids=group_ids, process_group=process_group,
                vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad)
    layout = dict(mask=mask, seq_ids=seq_ids, group_size=group_size, group_ids=group_ids)
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    grad_wanted = all(isinstance(t, torch.Tensor) for t in tensors) and wants_grad(*tensors)
    # on-policy: one phase, also vocabulary-parallel (see on_policy_chunks); with a process
    # group every rank must agree on it (non-tensors: the checks below name them)
    one_phase = grad_wanted and one_pass_mode(ref_logprobs, cfg, hidden.dtype, grad_wanted)
    tp = None
    if process_group is not None:
        # planned for the widest slice, the same on every rank (the on-policy chunks each
        # run collectives; slices of uneven sizes could round to different chunk sizes), and
        # no rank's logits above the budget and chunk
        rows, hidden_c, tp, vocab = prepare_parallel(
            hidden, weight, bias, labels, ref_logprobs, rewards, cfg, process_group,
            vocab_start, reduce_hidden_grad, chunk_size, logits_budget, layout, one_phase)
    else:
        if vocab_start is not None:
            raise ValueError("vocab_start applies to a vocabulary-parallel weight: pass "
                             "process_group too")
        if not isinstance(reduce_hidden_grad, bool):  # (with a group: checked together)
            raise TypeError(f"reduce_hidden_grad must be a bool, got {reduce_hidden_grad!r}")
        batch = prepare_linear(hidden, weight, bias, labels, ref_logprobs, rewards, cfg,
                               **layout)
        rows = counted_rows(batch, cfg.validate)
        if not use_triton(cfg.backend, hidden.device):
            return _torch_reference(hidden, weight, bias, rows, cfg)
        hidden_c = rows.gather(hidden.detach())
        vocab = weight.shape[0]
    plan = plan_chunks(rows.batch.num_rows, vocab, hidden.dtype, chunk_size, logits_budget,
                       one_phase, grad_wanted)
    loss, metrics = FusedLinearOPOFunction.apply(hidden, weight, bias, hidden_c, rows, cfg,
                                                 plan, tp)
    if not cfg.return_metrics:
        return loss
    return loss, unpack_metrics(metrics, cfg.with_entropy)


def _autocast_device(hidden) -> Optional[str]:
    """hidden's device type when ``torch.autocast`` is on for it, else None."""
    if not isinstance(hidden, torch.Tensor):
        return None
    try:
        return hidden.device.type if torch.is_autocast_enabled(hidden.device.type) else None
    except RuntimeError:  # a device type autocast does not know (meta)
        return None


def _autocast_off(device_type: Optional[str]):
    """A context with autocast off for ``device_type`` (None: autocast is not on, nothing)."""
    if device_type is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _autocast_operands(device_type: str, *tensors):
    """The LM head's operands as autocast would give them to a linear layer: floating-point
    tensors other than fp64 cast to autocast's dtype (the cast's backward returns each
    gradient in its tensor's own dtype, e.g. fp32 for fp32 master weights); the loss then
    runs with autocast off, so that the logits of forward and backward are the same matmul's,
    in that dtype, and the chunk buffers are the dtype the kernels were given."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


def _torch_reference(hidden, weight, bias, rows: CountedRows, cfg: OPOLossConfig):
    """backend="torch": the in-package reference on the logits of the counted rows (autograd
    does the backward, through the gather: zeros on the other rows of hidden)."""
    from . import reference  # local import: the reference is only needed here

    if rows.mask_errors is not None and rows.mask_errors.item():
        raise ValueError(f"mask: {rows.mask_errors.item()} mask value(s) other than 0/1")
    hidden_c = rows.gather(hidden)
    logits = torch.nn.functional.linear(hidden_c, weight, bias)
    explain = _explain_logits(hidden_c.detach(), weight.detach(),
                              None if bias is None else bias.detach())
    return reference.loss_from_batch(dataclasses.replace(rows.batch, logits=logits), cfg,
                                     explain)


class FusedLinearOPOLoss(torch.nn.Module):
    """``nn.Module`` form of ``fused_linear_opo_loss`` (the loss: docs/spec.md; the chunks and
    the budget: docs/kernels.md "From hidden states"). chunk_size, logits_budget and the
    options of ``opo_loss`` (the fields of ``OPOLossConfig``) are fixed, and validated, at
    construction; the LM head's weight [V, H] and bias [V] (or None) are passed to forward (as
    in Liger's ``LigerFusedLinearGRPOLoss``), so the module holds no parameters.

    Example::

        loss_fn = FusedLinearOPOLoss(alpha=0.6, chunk_size=1024, logits_budget=2**30)
        loss = loss_fn(hidden, lm_head.weight, labels, old_logprobs, rewards,
                       bias=lm_head.bias, mask=mask, group_size=6)
    """

    def __init__(self, chunk_size: Optional[int] = None, logits_budget: Optional[int] = None,
                 **options):
        super().__init__()
        self.chunk_size = check_chunk_size(chunk_size)
        self.logits_budget = check_logits_budget(logits_budget)
        self.config = linear_config(options)

    def forward(self, hidden, weight, labels, ref_logprobs, rewards, bias=None, *, mask=None,
                seq_ids=None, group_size=None, group_ids=None, process_group=None,
                vocab_start=None, reduce_hidden_grad=True):
        """The loss, as ``fused_linear_opo_loss`` with this module's options.

        Padded: hidden [B, T, H], labels / ref_logprobs / mask [B, T]. Packed: hidden [N, H],
        labels / ref_logprobs / seq_ids [N] (−1 = not counted). weight [V, H] (with
        process_group: this rank's [V_local, H]), bias [V] or None, the dtype of hidden;
        rewards [B]; exactly one of group_size / group_ids [B]; ref_logprobs=None: on-policy.
        Returns the 0-dim loss (float32; float64 for float64 inputs), or (loss, metrics) with
        return_metrics=True.
        """
        return fused_linear_opo_loss_with_config(
            hidden, weight, labels, ref_logprobs, rewards, self.config, bias=bias,
            chunk_size=self.chunk_size, logits_budget=self.logits_budget, mask=mask,
            seq_ids=seq_ids, group_size=group_size, group_ids=group_ids,
            process_group=process_group, vocab_start=vocab_start,
            reduce_hidden_grad=reduce_hidden_grad,
        )

    def extra_repr(self) -> str:
        return ", ".join([f"chunk_size={self.chunk_size!r}",
                          f"logits_budget={self.logits_budget!r}"] + [
            f"{k}={getattr(self.config, k)!r}" for k in
            ("alpha", "mu", "level", "coordinates", "weights", "backend")])
