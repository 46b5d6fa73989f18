"""The fused OPO loss over logits: launchers -> torch.library ops -> autograd.Function -> API.

A call is a handful of launches (shared/SPEC.md; kernels in row_kernels.py and
epilogue/), with N = B·T (padded) or N (packed) token rows:
  general mode:   forward row kernel (1 read of [N, V]) -> epilogue (1 launch over [N] and
                  [B]: loss, metrics, per-sequence coefficients) -> backward row kernel
                  (1 read + 1 write; c_t and the upstream gradient applied in the kernel).
  on-policy mode (ref_logprobs=None): Δ ≡ 0, so c_t depends only on rewards, groups and
                  lengths: a counts-only epilogue first, then ONE pass over the logits that
                  writes the statistics and the gradient, then the epilogue for the loss and
                  the metrics; backward only rescales (and returns at once for a unit upstream
                  gradient). Eager only: under torch.compile, on-policy runs the general mode
                  (see FusedOPOFunction.forward).
Plus one memset (the epilogue's ticket counters) and nothing else: the caller's labels, mask,
seq_ids, ref_logprobs, rewards and group ids are read by the kernels as passed. No host sync
unless validate=True (one read of the value-check counts).

Example::

    loss = opo_loss(logits, labels, ref_logprobs, rewards, mask=mask, group_size=6)
    loss.backward()
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .config import OPOLossConfig, config_from_options
from .epilogue import (
    METRICS,
    NUM_ERR,
    Mode,
    params_tensor,
    raise_bad_values,
    run_epilogue,
    unpack_metrics,
)
from .inputs import Batch, compute_dtype, prepare
from .row_launch import Rows, backward_rows, forward_rows, scale_rows_
from .tensor_parallel import config_or_fail_together
from .utils import new_output, use_triton
from .vocab_parallel import vocab_parallel_loss

# --------------------------------------------------------------------------------------------
# The passes of one call
# --------------------------------------------------------------------------------------------


class Flags(NamedTuple("FlagFields", [(name, int) for name in (
        *Mode._fields, "with_entropy", "validate", "group_size", "num_seqs")])):
    """Everything the passes branch on, as ints (the ops take them as an int list): the
    epilogue's Mode fields (taken from Mode, so that a field added there cannot shift these),
    then with_entropy, validate, group_size (0 = group_ids) and B."""

    __slots__ = ()

    @classmethod
    def of(cls, cfg: OPOLossConfig, batch: Batch) -> List[int]:
        return list(cls(*Mode.of(cfg, batch.weights is not None), int(cfg.with_entropy),
                        int(cfg.validate), batch.group_size or 0,
                        batch.num_seqs))

    @property
    def mode(self) -> Mode:
        return Mode(*self[:len(Mode._fields)])

    def rows(self, labels, mask, seq_ids, ref) -> Rows:
        return Rows(labels, mask, seq_ids, ref, labels.numel(),
                    labels.shape[1] if labels.dim() == 2 else None, self.num_seqs)


def _batch_of(logits, labels, ref, mask, seq_ids, rewards, group_ids, weights,
              group_size: int) -> Batch:
    """The Batch of already checked tensors (inside the ops)."""
    return Batch(logits=logits, labels=labels, ref_logprobs=ref, mask=mask, seq_ids=seq_ids,
                 rewards=rewards, group_size=group_size or None, group_ids=group_ids,
                 weights=weights, vocab=logits.shape[-1],
                 seq_len=labels.shape[1] if labels.dim() == 2 else None,
                 num_rows=labels.numel(), compute_dtype=compute_dtype(logits.dtype))


def _forward(logits, labels, ref, mask, seq_ids, rewards, group_ids, weights, params, flags,
             grad: Optional[torch.Tensor]):
    """Forward passes; ``grad`` is where the one-pass mode writes the gradient (None: general
    mode). Returns (logprobs [N], stats [N, 2], entropy [N] or [0], loss, metrics [8],
    coef [B, 2], scal [2], errs [NUM_ERR])."""
    flags = Flags(*flags)
    batch = _batch_of(logits, labels, ref, mask, seq_ids, rewards, group_ids, weights,
                      flags.group_size)
    mode, with_entropy, validate = flags.mode, bool(flags.with_entropy), bool(flags.validate)
    rows = Rows.of(batch)
    counters = torch.zeros(2, dtype=torch.int32, device=logits.device)  # epilogue tickets
    if grad is not None:
        pre = run_epilogue(batch, mode, params, counters[0:1], logprobs=None)
        lp, stats, ent = forward_rows(logits, rows, params, with_entropy, grad=grad,
                                      coef=pre.coef, scal=pre.scal)
    else:
        lp, stats, ent = forward_rows(logits, rows, params, with_entropy)
    out = run_epilogue(batch, mode, params, counters[1:2], logprobs=lp.view(labels.shape),
                       entropy=None if ent is None else ent.view(labels.shape), stats=stats,
                       validate=validate)
    ent = ent if ent is not None else lp.new_empty(0)
    return lp, stats, ent, out.loss, out.metrics, out.coef, out.scal, out.errs


def _backward(logits, labels, ref, mask, seq_ids, lp, stats, ent, coef, scal, grad_loss, params,
              flags, inplace: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """∂L/∂logits (written into logits when inplace, else into ``out`` or a new tensor)."""
    flags = Flags(*flags)
    rows, mode = flags.rows(labels, mask, seq_ids, ref), flags.mode
    level = ("sequence", "sequence_mean", "token")[mode.level]
    entropy = ent if ent.numel() and mode.bonus else None  # metric-only entropy: no term
    return backward_rows(logits, rows, lp, stats, entropy, coef, scal, grad_loss, params, level,
                         "ratio" if mode.ratio else "log", inplace=inplace, out=out)


class RowSlice(NamedTuple):
    """logits = base.narrow(dim, start, length): whole positions (dim 1 of [B, T, V]) or rows
    (dim 0 of [N, V]) of a contiguous ``base`` that requires grad, as ``logits[:, :-1]`` or
    ``outputs.logits[:, -(C + 1):-1]`` are. With ``grad_to_base`` the loss differentiates
    ``base`` directly: its gradient is written base-shaped (the slice's rows by the backward
    kernel, zeros elsewhere), so autograd never runs the slice's backward, which allocates a
    zero-filled base-sized tensor and copies the slice's gradient into it (one more
    logits-sized buffer and ~3 more passes over it per step)."""

    base: Optional[torch.Tensor]
    dim: int
    start: int
    length: int

    @classmethod
    def of(cls, logits: torch.Tensor) -> Optional[RowSlice]:
        base = logits._base
        if (base is None or not base.requires_grad or base.dim() != logits.dim()
                or logits.dim() not in (2, 3) or not base.is_contiguous()
                or logits.stride() != base.stride()):
            return None
        dim = logits.dim() - 2
        if any(logits.shape[d] != base.shape[d] for d in range(logits.dim()) if d != dim):
            return None
        step, offset = base.stride(dim), logits.storage_offset() - base.storage_offset()
        if step <= 0 or offset < 0 or offset % step or logits.shape[dim] == base.shape[dim]:
            return None
        start = offset // step
        if start + logits.shape[dim] > base.shape[dim]:
            return None
        return cls(base, dim, start, logits.shape[dim])

    def rows(self, full: torch.Tensor) -> torch.Tensor:
        """The slice's rows of a base-shaped tensor (a view)."""
        return full.narrow(self.dim, self.start, self.length)

    def zero_outside(self, full: torch.Tensor) -> None:
        """Zeros at the rows of a base-shaped tensor outside the slice (at most two fills)."""
        end = self.start + self.length
        if self.start:
            full.narrow(self.dim, 0, self.start).zero_()
        if end < full.shape[self.dim]:
            full.narrow(self.dim, end, full.shape[self.dim] - end).zero_()


# --------------------------------------------------------------------------------------------
# torch.library custom ops: torch.compile (fullgraph) sees each phase as one opaque op with a
# shape-only fake implementation. Eager calls skip the op layer and run the same functions.
# --------------------------------------------------------------------------------------------


def _fake_forward(logits, labels, rewards, flags):
    n, cdtype = labels.numel(), compute_dtype(logits.dtype)
    new = lambda *shape, dtype=cdtype: logits.new_empty(shape, dtype=dtype)  # noqa: E731
    return (new(n), new(n, 2), new(n if Flags(*flags).with_entropy else 0), new(),
            new(len(METRICS)),
            new(max(rewards.shape[0], 1), 2), new(2), new(NUM_ERR, dtype=torch.int32))


@torch.library.custom_op("opo_kernels::fused_forward", mutates_args=())
def _forward_op(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
                mask: Optional[torch.Tensor], seq_ids: Optional[torch.Tensor],
                rewards: torch.Tensor, group_ids: Optional[torch.Tensor],
                weights: Optional[torch.Tensor], params: torch.Tensor, flags: List[int]
                ) -> List[torch.Tensor]:
    """The general mode's forward (the one-pass mode is eager only: FusedOPOFunction)."""
    return list(_forward(logits, labels, ref, mask, seq_ids, rewards, group_ids, weights,
                         params, flags, None))


@_forward_op.register_fake
def _(logits, labels, ref, mask, seq_ids, rewards, group_ids, weights, params, flags):
    return list(_fake_forward(logits, labels, rewards, flags))


@torch.library.custom_op("opo_kernels::fused_backward", mutates_args=())
def _backward_op(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
                 mask: Optional[torch.Tensor], seq_ids: Optional[torch.Tensor],
                 lp: torch.Tensor, stats: torch.Tensor, ent: torch.Tensor, coef: torch.Tensor,
                 scal: torch.Tensor, grad_loss: torch.Tensor, params: torch.Tensor,
                 flags: List[int]) -> torch.Tensor:
    return _backward(logits, labels, ref, mask, seq_ids, lp, stats, ent, coef, scal, grad_loss,
                     params, flags, inplace=False)


@_backward_op.register_fake
def _(logits, labels, ref, mask, seq_ids, lp, stats, ent, coef, scal, grad_loss, params, flags):
    return torch.empty_like(logits)


@torch.library.custom_op("opo_kernels::fused_backward_", mutates_args=("logits",))
def _backward_inplace_op(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
                         mask: Optional[torch.Tensor], seq_ids: Optional[torch.Tensor],
                         lp: torch.Tensor, stats: torch.Tensor, ent: torch.Tensor,
                         coef: torch.Tensor, scal: torch.Tensor, grad_loss: torch.Tensor,
                         params: torch.Tensor, flags: List[int]) -> None:
    _backward(logits, labels, ref, mask, seq_ids, lp, stats, ent, coef, scal, grad_loss, params,
              flags, inplace=True)


def _call(op, impl, *args):
    """The custom op under torch.compile; its implementation directly otherwise."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


class FusedOPOFunction(torch.autograd.Function):
    """loss, metrics_vector = FusedOPOFunction.apply(x, batch, cfg, sliced).

    x is batch.logits, or with ``sliced`` (a ``RowSlice`` of batch.logits, eager only) its
    base, which then receives the base-shaped gradient. Only x receives a gradient (ω, τ, p̃, Q
    are constants; ref_logprobs and rewards are data). metrics_vector [8] holds
    ``epilogue.METRICS`` (not differentiable).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, batch: Batch, cfg: OPOLossConfig,
                sliced: Optional[RowSlice]):
        logits = batch.logits
        # The one-pass mode runs eagerly only. Under torch.compile, AOTAutograd functionalizes
        # the backward's in-place scale of the saved gradient (a forward output, not a graph
        # input) into a clone plus the scale: a full extra pass over [N, V] on every call
        # (>= 2R + 2W), where the general passes cost 2R + 1W; and their in-place backward,
        # which writes into the logits (a graph input), Inductor keeps in place. Both checked
        # on the generated code in tests/test_compile.py.
        one_pass = (batch.ref_logprobs is None and cfg.one_pass_exact
                    and not torch.compiler.is_compiling())
        params = params_tensor(cfg, logits.device, batch.compute_dtype)
        flags = Flags.of(cfg, batch)
        inputs = (logits, batch.labels, batch.ref_logprobs, batch.mask, batch.seq_ids,
                  batch.rewards, batch.group_ids, batch.weights, params, flags)
        if one_pass:
            full = x if cfg.inplace_backward else new_output(x.shape, x.dtype, x.device)
            out = _forward(*inputs, full if sliced is None else sliced.rows(full))
        else:
            out = _call(_forward_op, lambda *a: _forward(*a, None), *inputs)
        lp, stats, ent, loss, metrics, coef, scal, errs = out
        if cfg.validate and not torch.compiler.is_compiling():  # the one host sync
            raise_bad_values(errs, batch)
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)  # no zeros for the metrics' (unused) gradient
        ctx.cfg, ctx.one_pass, ctx.flags = cfg, one_pass, flags
        # the geometry only: ctx holding the base itself would be a reference cycle
        ctx.sliced = None if sliced is None else sliced._replace(base=None)
        ctx.batch_tensors = (batch.labels, batch.ref_logprobs, batch.mask, batch.seq_ids)
        if one_pass:
            ctx.save_for_backward(full)
            ctx.backward_done = False
        else:
            ctx.save_for_backward(x, lp, stats, ent, coef, scal, params)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        if grad_loss is None:  # the loss was not used (its metrics carry no gradient)
            return None, None, None, None
        labels, ref, mask, seq_ids = ctx.batch_tensors
        sliced, inplace = ctx.sliced, ctx.cfg.inplace_backward
        if ctx.one_pass:
            if ctx.backward_done:
                raise RuntimeError("opo_loss with ref_logprobs=None (one-pass on-policy mode) "
                                   "writes its gradient during forward: run backward once")
            ctx.backward_done = True
            (full,) = ctx.saved_tensors
            scale_rows_(full if sliced is None else sliced.rows(full),
                        Flags(*ctx.flags).rows(labels, mask, seq_ids, None), grad_loss)
            if sliced is not None:
                sliced.zero_outside(full)
            return full, None, None, None
        x, lp, stats, ent, coef, scal, params = ctx.saved_tensors
        logits = x if sliced is None else sliced.rows(x)
        args = (logits, labels, ref, mask, seq_ids, lp, stats, ent, coef, scal, grad_loss,
                params, ctx.flags)
        if sliced is not None:  # eager only: the base-shaped gradient, zeros outside
            full = x if inplace else new_output(x.shape, x.dtype, x.device)
            _backward(*args, inplace=inplace, out=None if inplace else sliced.rows(full))
            sliced.zero_outside(full)
            return full, None, None, None
        if inplace:
            _call(_backward_inplace_op, lambda *a: _backward(*a, inplace=True), *args)
            return logits, None, None, None
        return (_call(_backward_op, lambda *a: _backward(*a, inplace=False), *args), None, None,
                None)


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


def loss_from_batch(batch: Batch, cfg: OPOLossConfig):
    """The fused path on prepared inputs (see ``inputs.prepare``)."""
    _check_inplace_under_compile(batch.logits, cfg)
    sliced = (RowSlice.of(batch.logits) if cfg.grad_to_base and not torch.compiler.is_compiling()
              else None)
    loss, metrics = FusedOPOFunction.apply(batch.logits if sliced is None else sliced.base,
                                           batch, cfg, sliced)
    if not cfg.return_metrics:
        return loss
    return loss, unpack_metrics(metrics, cfg.with_entropy)


def opo_loss(logits, labels, ref_logprobs, rewards, *, mask=None, seq_ids=None,
             group_size=None, group_ids=None, process_group=None, vocab_start=None,
             **options):
    """The OPO loss (shared/SPEC.md) from LLM logits, with a fused Triton backward.

    Padded layout: logits [B, T, V] (fp32/bf16/fp16; a view like ``logits[:, :-1]`` is read
    in place), labels [B, T] int, ref_logprobs [B, T] float, mask [B, T] (bool or 0/1).
    Packed layout: logits [N, V], labels [N], ref_logprobs [N], seq_ids [N] (−1 = not counted).
    rewards: [B] float; exactly one of group_size (int) or group_ids [B] int.
    ref_logprobs=None means on-policy (π_ref = the detached current policy).

    Vocabulary-parallel logits: with ``process_group``, logits are this rank's slice
    [..., V_local] of the vocabulary, starting at ``vocab_start`` (default rank·V_local, equal
    slices); labels are global token ids. Every rank gets the loss and metrics of the whole
    vocabulary and the gradient of its own slice (vocab_parallel.py; O(N) communication).

    validate=True (default) checks labels, seq_ids, mask values and finiteness with one host
    sync per call (and, with a process group, every rank's arguments and slice); validate=False
    skips it (no host sync at all). inplace_backward=True writes the gradient into the logits
    buffer (saves one logits-sized allocation; logits are overwritten by backward).
    grad_to_base=True: when logits are a slice of whole positions of a tensor that requires
    grad (``logits[:, :-1]``), that tensor gets the gradient directly (zeros outside the slice)
    and autograd's slice backward, a zero-filled copy of the whole tensor, never runs; the slice
    itself is then not in the graph (see ``RowSlice``; eager calls only).

    options: the fields of ``OPOLossConfig`` as keywords (alpha=0.6, mu=1.0, tau=0.5,
    adaptive_tau=True, tau_range=(0.2, 1.5), reward_temperature=0.15, weights="seed",
    center_weights=False, level="sequence_mean", coordinates="ratio", temperature=1.0,
    entropy_coef=0.0, backend="auto", return_metrics=False, validate=True,
    inplace_backward=False, grad_to_base=False, compute_entropy=False,
    vocab_parallel_one_pass=False, ...); an
    unknown name is a TypeError. vocab_parallel_one_pass=True: with process_group and
    ref_logprobs=None, the one-pass mode over the slice in L2-sized chunks (vocab_parallel.py).

    Returns the 0-dim loss (float32; float64 for float64 logits), or (loss, metrics) with
    return_metrics=True: log_ratio_mean, kl_k3, v_mean, omega_mean, omega_max, tau, penalty
    (+ entropy_mean when entropy_coef > 0 or compute_entropy=True: the entropy is computed in
    the same pass over the logits, at no extra traffic).

    Example::

        loss = opo_loss(logits[:, :-1], input_ids[:, 1:], old_logprobs, rewards,
                        mask=completion_mask, group_size=6, grad_to_base=True)
    """
    cfg = config_or_fail_together(process_group, lambda: config_from_options(options))
    return opo_loss_with_config(logits, labels, ref_logprobs, rewards, cfg, mask=mask,
                                seq_ids=seq_ids, group_size=group_size, group_ids=group_ids,
                                process_group=process_group, vocab_start=vocab_start)


def opo_loss_with_config(logits, labels, ref_logprobs, rewards, cfg: OPOLossConfig, *,
                         mask=None, seq_ids=None, group_size=None, group_ids=None,
                         process_group=None, vocab_start=None):
    """``opo_loss`` with an already validated ``OPOLossConfig`` (used by ``OPOLoss``)."""
    from . import reference  # local import: the reference is only needed for backend="torch"

    layout = dict(mask=mask, seq_ids=seq_ids, group_size=group_size, group_ids=group_ids)
    if process_group is not None:
        return vocab_parallel_loss(logits, labels, ref_logprobs, rewards, cfg, process_group,
                                   vocab_start, **layout)
    if vocab_start is not None:
        raise ValueError("vocab_start applies to vocabulary-parallel logits: pass "
                         "process_group too")
    batch = prepare(logits, labels, ref_logprobs, rewards, config=cfg, **layout)
    if use_triton(cfg.backend, logits.device):
        return loss_from_batch(batch, cfg)
    return reference.loss_from_batch(batch, cfg)


class OPOLoss(torch.nn.Module):
    """``nn.Module`` form of ``opo_loss``; options are fixed (and validated) at construction.

    Example::

        loss_fn = OPOLoss(alpha=0.6, mu=1.0)
        loss = loss_fn(logits, labels, ref_logprobs, rewards, mask=mask, group_size=6)
    """

    def __init__(self, **options):
        super().__init__()
        self.config = OPOLossConfig(**options)

    def forward(self, logits, labels, ref_logprobs, rewards, *, mask=None, seq_ids=None,
                group_size=None, group_ids=None, process_group=None, vocab_start=None):
        return opo_loss_with_config(logits, labels, ref_logprobs, rewards, self.config,
                                    mask=mask, seq_ids=seq_ids, group_size=group_size,
                                    group_ids=group_ids, process_group=process_group,
                                    vocab_start=vocab_start)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self.config, k)!r}" for k in
                         ("alpha", "mu", "level", "coordinates", "weights", "backend"))
