"""The fused OPO loss over logits: the passes of one call -> autograd.Function -> API (the
torch.library ops that torch.compile sees: compile_ops.py; ``grad_to_base``'s slices:
row_slice.py).

A call is a handful of launches (docs/spec.md; kernels in row_kernels.py and
epilogue/), with N = B·T (padded) or N (packed) token rows:
  general mode:   forward row kernel (1 read of [N, V]) -> epilogue (1 launch over [N] and
                  [B]: loss, metrics, per-sequence coefficients) -> backward row kernel
                  (1 read + 1 write; c_t and the upstream gradient applied in the kernel).
  on-policy mode (ref_logprobs=None): Δ ≡ 0, so c_t depends only on rewards, groups and
                  lengths: a counts-only epilogue first, then ONE pass over the logits that
                  writes the statistics and the gradient, then the epilogue for the loss and
                  the metrics; backward only rescales (and returns at once for a unit upstream
                  gradient). Eager only: under torch.compile, on-policy runs the general mode
                  (compile_ops.CompiledOPOFunction).
Plus one memset (the epilogue's ticket counters) and nothing else: the caller's labels, mask,
seq_ids, ref_logprobs, rewards and group ids are read by the kernels as passed. No host sync
unless validate=True (one read of the value-check counts; validate="deferred" reads them
later, without a stall: validation.py). Eager calls reuse per call signature what the call
derives from its inputs' metadata (checks, launches, workspace layout: call_plan.py).

Example::

    loss = opo_loss(logits, labels, ref_logprobs, rewards, mask=mask, group_size=6)
    loss.backward()
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import row_launch
from .call_plan import CallPlan, Flags, PlanCache, call_key
from .compile_ops import CompiledOPOFunction
from .config import OPOLossConfig, config_from_options, make_config
from .epilogue import EpilogueOut, params_tensor, unpack_metrics
from .inputs import Batch, prepare
from .row_launch import Rows
from .row_slice import RowSlice
from .tensor_parallel import config_or_fail_together
from .utils import first_order_only, mark_written, new_output_like, use_triton
from .validation import check_at_backward, check_values_of, read_pending
from .vocab_parallel import vocab_parallel_loss

# --------------------------------------------------------------------------------------------
# The passes of one call
# --------------------------------------------------------------------------------------------

_CALL_PLANS = PlanCache()  # eager calls, by call_key


def _forward_batch(batch: Batch, plan: CallPlan, params, grad: Optional[torch.Tensor],
                   zero: Tuple[int, int] = (0, 0)):
    """Forward passes; ``grad`` is where the one-pass mode writes the gradient (None: general
    mode), and ``zero`` the (before, after) rows around each sequence's rows of it that get
    zeros too. Returns (rows, the call's ``Scratch``): the kernels read and write its float
    and int workspaces at the plan's offsets (``CallPlan._set_offsets``), the loss in its own
    tensor."""
    s = plan.scratch()
    f, i = s.floats, s.ints
    rows = Rows.of(batch)
    out = EpilogueOut(s.loss, f, f, f, i)
    if grad is not None:
        plan.pre(batch, params, i, out, f, f, i)
        plan.onepass_launch(grad)(batch.logits, rows, params, f, f, f, grad=grad, coef=f, scal=f,
                                  zero_before=zero[0], zero_after=zero[1])
    else:
        plan.forward(batch.logits, rows, params, f, f, f)
    plan.epilogue(batch, params, i, out, f, f, i, logprobs=f, entropy=f, stats=f)
    return rows, s


def _backward_rows(plan: CallPlan, logits, rows: Rows, floats, grad_loss, params,
                   grad: torch.Tensor, zero_before: int = 0, zero_after: int = 0) -> None:
    """∂L/∂logits written into ``grad`` (logits itself for the in-place backward), and zeros
    into the zero_before / zero_after rows around each sequence's rows of it; floats: the
    forward's float workspace (``_forward_batch``)."""
    plan.backward_launch(grad)(logits, grad, rows, floats, floats, floats, floats, floats,
                               grad_loss, params, zero_before, zero_after)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


class FusedOPOFunction(torch.autograd.Function):
    """loss, metrics_vector = FusedOPOFunction.apply(x, batch, cfg, sliced, plan, None), or
    loss = FusedOPOFunction.apply(x, batch, cfg, sliced, plan, box) with the call's float
    workspace, which holds the metrics vector (``CallPlan.metrics``), appended to the list
    ``box`` (eager calls: a second output costs autograd ~2 µs a call).

    x is batch.logits, or with ``sliced`` (a ``RowSlice`` of batch.logits) its base, which
    then receives the base-shaped gradient. Only x receives a gradient (ω, τ, p̃, Q are
    constants; ref_logprobs and rewards are data). metrics_vector [8] holds
    ``epilogue.METRICS`` (not differentiable). plan: the call signature's ``CallPlan``. Eager
    calls only: under torch.compile, ``compile_ops.CompiledOPOFunction``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, batch: Batch, cfg: OPOLossConfig,
                sliced: Optional[RowSlice], plan: CallPlan, box: Optional[list]):
        logits, full = batch.logits, None
        params = plan.params
        grad, zero = None, (0, 0)
        if plan.one_pass:
            full = grad = x if cfg.inplace_backward else new_output_like(x)
            if sliced is not None:  # the kernel writes the zeros outside the slice too
                grad, zero = sliced.rows_at(full), sliced.outside(full)
                if not plan.has_rows:  # no rows, no launch
                    sliced.zero_outside(full)
        rows, s = _forward_batch(batch, plan, params, grad, zero)
        # the int workspace starts with the check counts (read only when validating)
        loss, floats, errs = s.loss, s.floats, s.ints
        # with a box, the workspace goes there and the caller views the metrics if asked
        metrics = floats if box is not None else plan.metrics(floats)
        # validate=True: the one host sync; "deferred": read at backward or the next call
        ctx.deferred = check_values_of(cfg, errs, batch)
        if box is None:
            ctx.mark_non_differentiable(metrics)
            ctx.set_materialize_grads(False)  # no zeros for the metrics' (unused) gradient
        ctx.cfg, ctx.plan, ctx.rows = cfg, plan, rows
        ctx.versions = rows.versions()
        # the geometry only: ctx holding the base itself would be a reference cycle
        ctx.sliced = None if sliced is None else RowSlice(None, *sliced[1:])
        # the slice itself (a view of x, whose in-place writes save_for_backward catches):
        # narrowing x again in backward costs more than the launch. Dropped at backward, as
        # autograd drops x, so that the logits do not outlive the backward with the loss.
        ctx.logits = logits if sliced is not None and full is None else None
        if full is not None:
            ctx.save_for_backward(full)
            ctx.backward_done = False
        else:
            # the forward's own intermediates ride on ctx (saving them costs a pack and an
            # unpack each; only the input needs autograd's in-place check)
            ctx.save_for_backward(x)
            ctx.intermediates = (floats, params)
        if box is None:
            return loss, metrics
        box.append(metrics)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, grad_metrics=None):
        check_at_backward(ctx.deferred)
        if grad_loss is None:  # the loss was not used (its metrics carry no gradient)
            return None, None, None, None, None, None
        sliced, inplace, plan = ctx.sliced, ctx.cfg.inplace_backward, ctx.plan
        if plan.one_pass:
            if ctx.backward_done:
                raise RuntimeError("opo_loss with ref_logprobs=None (one-pass on-policy mode) "
                                   "writes its gradient during forward: run backward once")
            ctx.rows.check_unchanged(ctx.versions, "opo_loss")
            ctx.backward_done = True
            (full,) = ctx.saved_tensors  # (its rows outside a slice: zeros, from forward)
            grad = full if sliced is None else sliced.rows(full)
            plan.scale_launch(grad)(grad, ctx.rows, grad_loss)
            if inplace:  # written in forward, told to autograd here (see mark_written)
                mark_written(full)
            return full, None, None, None, None, None
        ctx.rows.check_unchanged(ctx.versions, "opo_loss")
        (x,), (floats, params) = ctx.saved_tensors, ctx.intermediates
        logits = x if sliced is None else ctx.logits
        if logits is None:  # a second backward (retain_graph=True)
            logits = sliced.rows(x)
        ctx.logits = None
        full = x if inplace else new_output_like(x)
        if sliced is None:
            _backward_rows(plan, logits, ctx.rows, floats, grad_loss, params, full)
        else:  # the base-shaped gradient: the kernel writes the zeros outside the slice too
            _backward_rows(plan, logits, ctx.rows, floats, grad_loss, params,
                           sliced.rows_at(full), *sliced.outside(full))
            if not plan.has_rows:  # no rows, no launch
                sliced.zero_outside(full)
        if inplace:
            mark_written(x)
        return full, None, None, None, None, None


def _c_apply():
    """FusedOPOFunction's C++ ``apply``, which ``autograd.Function.apply`` ends with after a
    Python prologue (a check for ``setup_context``, which this Function does not define, and
    functorch's dead-wrapper unwrapping of each argument): ~3 µs of a call's host time. None
    where this torch has no such method (the public ``apply`` then)."""
    method = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
    return None if method is None else method.__get__(None, FusedOPOFunction)


_APPLY = _c_apply()


def _apply_eager(*args):
    """FusedOPOFunction.apply for eager calls: the C++ apply directly, unless a functorch
    transform (vmap, grad, ...) is active, which needs the public one's handling."""
    if _APPLY is None or torch._C._are_functorch_transforms_active():
        return FusedOPOFunction.apply(*args)
    return _APPLY(*args)


# --------------------------------------------------------------------------------------------
# Functional API and module
# --------------------------------------------------------------------------------------------


# torch.compile of an in-place backward into a leaf tensor that requires grad (AOTAutograd
# copies the mutation back into the graph input): torch 2.11 fails on it deep inside AOTAutograd
# ("a leaf Variable that requires grad is being used in an in-place operation"); 2.12 and 2.13
# compile it (checked on CPU, 2026-12-04). Non-leaf logits, as from a model, compile on all.
_COMPILES_LEAF_MUTATION = torch.torch_version.TorchVersion(torch.__version__) >= (2, 12)


def _check_inplace_under_compile(logits: torch.Tensor, cfg: OPOLossConfig) -> None:
    if not (cfg.inplace_backward and not _COMPILES_LEAF_MUTATION and logits.requires_grad
            and torch.compiler.is_compiling()):
        return
    base = logits._base if logits._base is not None else logits  # a view writes its base
    if base.is_leaf:
        raise ValueError(
            f"inplace_backward=True under torch.compile needs torch >= 2.12 when logits is "
            f"(a view of) a leaf tensor that requires grad (torch {torch.__version__} cannot "
            f"compile the write into it): pass logits computed from the model (not a leaf), "
            f"or inplace_backward=False, or run this call eagerly")


def loss_from_batch(batch: Batch, cfg: OPOLossConfig, plan: Optional[CallPlan] = None):
    """The fused path on prepared inputs (see ``inputs.prepare``); plan: the call signature's
    ``CallPlan`` (eager), or None (traced by torch.compile)."""
    _check_inplace_under_compile(batch.logits, cfg)
    sliced = (RowSlice.of(batch.logits) if cfg.grad_to_base and not torch.compiler.is_compiling()
              else None)
    x = batch.logits if sliced is None else sliced.base
    if plan is None:  # traced: only tensors and constants into the Function
        loss, metrics = CompiledOPOFunction.apply(
            x, batch.labels, batch.ref_logprobs, batch.mask, batch.seq_ids, batch.rewards,
            batch.group_ids, batch.weights, params_tensor(cfg, x.device, batch.compute_dtype),
            tuple(Flags.of(cfg, batch)), cfg.inplace_backward)
    else:
        box = []  # receives the float workspace, which holds the metrics
        loss = _apply_eager(x, batch, cfg, sliced, plan, box)
    if not cfg.return_metrics:
        return loss
    if plan is not None:
        metrics = plan.metrics(box[0])
    return loss, unpack_metrics(metrics, cfg.with_entropy)


def opo_loss(logits, labels, ref_logprobs, rewards, *, mask=None, seq_ids=None,
             group_size=None, group_ids=None, process_group=None, vocab_start=None,
             **options):
    """The OPO loss (docs/spec.md) from LLM logits, with a fused Triton backward.

    Padded layout: logits [B, T, V] (fp32/bf16/fp16/fp64; a view like ``logits[:, :-1]`` is read
    in place), labels [B, T] int, ref_logprobs [B, T] float, mask [B, T] (bool or 0/1).
    Packed layout: logits [N, V], labels [N], ref_logprobs [N], seq_ids [N] (−1 = not counted).
    rewards: [B] float; exactly one of group_size (int) or group_ids [B] int.
    ref_logprobs=None means on-policy (π_ref = the detached current policy): when a gradient
    is wanted and the logits are not fp16, the forward pass writes it too (one pass over the
    logits; backward then runs once). fp16 logits run the general passes, which round the
    gradient after the loss scale, not before.

    Vocabulary-parallel logits: with ``process_group``, logits are this rank's slice
    [..., V_local] of the vocabulary, starting at ``vocab_start`` (default rank·V_local, equal
    slices); labels are global token ids. Every rank gets the loss and metrics of the whole
    vocabulary and the gradient of its own slice (vocab_parallel.py; O(N) communication).

    validate=True (default) checks labels, seq_ids, mask values and finiteness with one host
    sync per call (and, with a process group, every rank's arguments and slice); validate=False
    skips it (no host sync at all); a counted label outside [0, V) then makes the loss NaN, on
    both backends. inplace_backward=True writes the gradient into the logits buffer (saves one
    logits-sized allocation): backward overwrites the logits you passed, a leaf tensor included
    (``loss.backward()`` then still copies a leaf's gradient into ``.grad``: no memory saved;
    use it on the model's own logits). Autograd sees the write (the logits' version counter):
    an op that saved the logits for its own backward (tanh, exp) then raises PyTorch's
    in-place error instead of reading the gradient. Logits whose elements share memory (an
    expand) are refused. The torch backend cannot do it and warns.
    The backward is computed by kernels: it cannot be differentiated again (create_graph=True
    raises; backend="torch" can).
    ref_logprobs: keep them in float32; bf16 holds ~3 significant digits (a log-prob of −2.3 is
    off by up to 0.008), which enters Δ = lp − ref directly. group_size: an int, a NumPy integer
    or a 0-dim integer tensor (read on the host).
    grad_to_base=True: when logits are a slice of whole positions of a tensor that requires
    grad (``logits[:, :-1]``), that tensor gets the gradient directly (zeros outside the slice)
    and autograd's slice backward, a zero-filled copy of the whole tensor, never runs; the slice
    itself is then not in the graph (eager calls only; docs/kernels.md).

    options: the fields of ``OPOLossConfig`` as keywords (alpha=0.6, mu=1.0, tau=0.5,
    adaptive_tau=True, tau_range=(0.2, 1.5), reward_temperature=0.15, weights="seed",
    center_weights=False, level="sequence_mean", coordinates="ratio", temperature=1.0,
    entropy_coef=0.0, backend="auto", return_metrics=False, validate=True,
    inplace_backward=False, grad_to_base=False, compute_entropy=False,
    vocab_parallel_one_pass=False, ...); an
    unknown name is a TypeError. validate="deferred": the same checks, read without a host
    stall, at the call's backward when they are ready, else at the next validating call or
    ``opo_kernels.check_deferred()``; the error names the failing call (opo_kernels/validation.py
    says what is caught and when). vocab_parallel_one_pass=True: with process_group and
    ref_logprobs=None, the one-pass mode over the slice in L2-sized chunks (vocab_parallel.py).

    Returns the 0-dim loss (float32; float64 for float64 logits), or (loss, metrics) with
    return_metrics=True: log_ratio_mean, kl_k3, v_mean, omega_mean, omega_max, tau, penalty
    (+ entropy_mean when entropy_coef > 0 or compute_entropy=True: the entropy is computed in
    the same pass over the logits, at no extra traffic).

    Example::

        loss = opo_loss(logits[:, :-1], input_ids[:, 1:], old_logprobs, rewards,
                        mask=completion_mask, group_size=6, grad_to_base=True)
    """
    cfg = (config_from_options(options) if process_group is None else
           config_or_fail_together(process_group, lambda: config_from_options(options)))
    return opo_loss_with_config(logits, labels, ref_logprobs, rewards, cfg, mask=mask,
                                seq_ids=seq_ids, group_size=group_size, group_ids=group_ids,
                                process_group=process_group, vocab_start=vocab_start)


def opo_loss_with_config(logits, labels, ref_logprobs, rewards, cfg: OPOLossConfig, *,
                         mask=None, seq_ids=None, group_size=None, group_ids=None,
                         process_group=None, vocab_start=None):
    """``opo_loss`` with an already validated ``OPOLossConfig`` (used by ``OPOLoss``).

    Eager calls look their signature up first (``call_plan``): a call whose tensors have the
    shapes, strides, dtypes and devices of an earlier call with an equal config (by value; a
    weights tensor by its shape and layout) skips the checks that call passed and reuses its
    launches."""
    if process_group is not None:
        return vocab_parallel_loss(logits, labels, ref_logprobs, rewards, cfg, process_group,
                                   vocab_start, mask=mask, seq_ids=seq_ids,
                                   group_size=group_size, group_ids=group_ids)
    if vocab_start is not None:
        raise ValueError("vocab_start applies to vocabulary-parallel logits: pass "
                         "process_group too")
    key = None
    compiling = torch.compiler.is_compiling()
    # a launch-config override (tests, the sweep) may change between calls: no plan kept
    if not compiling and row_launch.LAUNCH_OVERRIDE is None:
        try:
            key = call_key(logits, labels, ref_logprobs, rewards, mask, seq_ids, group_size,
                           group_ids, cfg)
        except AttributeError:  # not a tensor: prepare names it
            pass
        plan = _CALL_PLANS.get(key)
        if plan is not None:
            if cfg.validate:  # an earlier deferred call's error, before any kernel runs
                read_pending()
            batch = plan.batch(logits, labels, ref_logprobs, rewards, mask, seq_ids, group_size,
                               group_ids, cfg)
            return loss_from_batch(batch, cfg, plan)
    batch = prepare(logits, labels, ref_logprobs, rewards, config=cfg, mask=mask,
                    seq_ids=seq_ids, group_size=group_size, group_ids=group_ids)
    if not use_triton(cfg.backend, logits.device):
        from . import reference  # only needed for backend="torch"

        return reference.loss_from_batch(batch, cfg)
    plan = None
    if not compiling:  # eager: a plan, kept for the next call of this signature if it has one
        plan = CallPlan(batch, cfg)
        if key is not None:
            _CALL_PLANS.put(key, plan)
    return loss_from_batch(batch, cfg, plan)


class OPOLoss(torch.nn.Module):
    """``nn.Module`` form of ``opo_loss``; options are fixed (and validated) at construction.

    Example::

        loss_fn = OPOLoss(alpha=0.6, mu=1.0)
        loss = loss_fn(logits, labels, ref_logprobs, rewards, mask=mask, group_size=6)
    """

    def __init__(self, **options):
        super().__init__()
        self.config = make_config(options)

    def forward(self, logits, labels, ref_logprobs, rewards, *, mask=None, seq_ids=None,
                group_size=None, group_ids=None, process_group=None, vocab_start=None):
        """The loss (and metrics with return_metrics=True) of ``opo_loss`` with this module's
        options: the same arguments, shapes and layouts (padded: logits [B, T, V], labels /
        ref_logprobs / mask [B, T]; packed: logits [N, V], labels / ref_logprobs / seq_ids
        [N]; rewards [B]; group_size or group_ids [B]; ref_logprobs=None: on-policy)."""
        return opo_loss_with_config(logits, labels, ref_logprobs, rewards, self.config,
                                    mask=mask, seq_ids=seq_ids, group_size=group_size,
                                    group_ids=group_ids, process_group=process_group,
                                    vocab_start=vocab_start)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self.config, k)!r}" for k in
                         ("alpha", "mu", "level", "coordinates", "weights", "backend"))
