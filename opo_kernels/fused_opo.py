"""The fused OPO loss over logits: Triton kernels -> launchers -> autograd.Function -> API.

Passes over the logits [N, V] (N = B·T rows, flattened on grid axis 0, one program per row):
  forward  (1 read):  online max/sum over V in blocks -> lp_t, row statistics (m, log s) with
                      logsumexp = m + log s (fp32), entropy H_t.
  epilogue (O(N+B)):  sequence sums, groups, τ, Q, p̃, ω, v, loss, metrics, c_t (epilogue.py).
  backward (1 read + 1 write): p = exp(z − m − log s) recomputed from the saved row statistics;
           ∂L/∂logits = (1/temperature)·[c_t·(onehot − p) − ∂L/∂H_t·p·(log p + H_t)].
Rows that are not counted are never read: the forward writes zeros for them, the backward
writes a zero gradient row.

Example::

    loss = opo_loss(logits, labels, ref_logprobs, rewards, mask=mask, group_size=6)
    loss.backward()
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .config import OPOLossConfig
from .epilogue import batch_epilogue, on_policy_coefficients, pack_metrics, unpack_metrics
from .inputs import Batch, check_values, compute_dtype, prepare
from .utils import new_output, use_triton

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _zero_row(grad_base, grad_stride_v, V, BLOCK_V: tl.constexpr):
    """A row that is not counted gets a zero gradient (its logits are never read)."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        zero = tl.zeros([BLOCK_V], grad_base.dtype.element_ty)
        tl.store(grad_base + offs * grad_stride_v, zero, mask=offs < V)


@triton.jit
def _row_gradient(base, stride_v, grad_base, grad_stride_v, V, label, row_max, log_sum, coef,
                  entropy, d_entropy, inv_t, WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """Writes (1/temperature)·[c·(onehot − p) − ∂L/∂H·p·(log p + H)] for one row (SPEC
    "Gradient"), log p = (z − m) − log s recomputed from the saved row statistics. grad_base may
    alias base (in place): each block is read before it is written, by this program only."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < V
        x = tl.load(base + offs * stride_v, mask=in_row, other=float("-inf"))
        log_p = (x.to(ACC) * inv_t - row_max) - log_sum
        p = tl.exp(log_p)
        g = tl.where(offs == label, coef, 0.0) - coef * p
        if WITH_ENTROPY:  # ∂H/∂z = −p·(log p + H); p = 0 contributes 0 (no 0·−inf)
            g -= d_entropy * p * tl.where(p > 0, log_p + entropy, 0.0)
        tl.store(grad_base + offs * grad_stride_v, (g * inv_t).to(grad_base.dtype.element_ty),
                 mask=in_row)


@triton.jit(do_not_specialize=["seq_len", "stride_b", "grad_stride_b"])
def _opo_fwd_kernel(
    logits_ptr, labels_ptr, seq_ptr,          # [rows of logits], [N] int64, [N] int64
    logprobs_ptr, stats_ptr, entropy_ptr,     # [N], [N, 2], [N] outputs (compute dtype)
    grad_ptr, coef_ptr, entropy_coef_ptr,     # one-pass mode only (WRITE_GRAD)
    seq_len, V, stride_b, stride_t, stride_v, grad_stride_b, grad_stride_t, grad_stride_v,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: online logsumexp (and entropy) over V in blocks; with WRITE_GRAD
    (on-policy mode: c_t known before the pass) the same program then writes the row's
    gradient, re-reading the row right after its first read."""
    row = tl.program_id(0).to(tl.int64)
    # padded rows are (b, t) of a [B, T, V] view; packed rows use seq_len = N, stride_b = 0
    b = row // seq_len
    t = row - b * seq_len
    if tl.load(seq_ptr + row) < 0:  # not counted: do not read the row
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(stats_ptr + 2 * row, 0.0)
        tl.store(stats_ptr + 2 * row + 1, 0.0)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        if WRITE_GRAD:
            _zero_row(grad_ptr + b * grad_stride_b + t * grad_stride_t, grad_stride_v, V,
                      BLOCK_V)
        return
    base = logits_ptr + b * stride_b + t * stride_t
    inv_t = tl.full([], inv_temperature, ACC)

    m = tl.full([], float("-inf"), ACC)  # running max of z
    s = tl.zeros([], ACC)                # Σ exp(z − m)
    w = tl.zeros([], ACC)                # Σ exp(z − m)·(z − m) (entropy only)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs * stride_v, mask=offs < V, other=float("-inf"))
        z = x.to(ACC) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        # a block (or row prefix) of only −inf keeps m = −inf: shift by 0 to avoid inf − inf
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        scale = tl.exp(m - shift)
        e = tl.exp(z - shift)
        if WITH_ENTROPY:
            # kept relative to the running max, so H = log s − w/s has no cancellation between
            # two O(|z|) terms (H of a confident row is tiny next to |z|); re-centred as m moves
            w = scale * (w + tl.where(s > 0, m - shift, 0.0) * s) \
                + tl.sum(e * tl.where(e > 0, z - shift, 0.0), 0)  # 0·(−inf) -> 0
        s = s * scale + tl.sum(e, 0)
        m = m_new
    # log p_j = (z_j − m) − log s: for confident tokens (z near m) this keeps the small
    # log-probs accurate, where z − logsumexp would lose ε·|z| to cancellation
    shift = tl.where(m == float("-inf"), 0.0, m).to(ACC)
    log_sum = tl.log(s)
    entropy = log_sum - w / s

    label = tl.load(labels_ptr + row)
    in_vocab = (label >= 0) & (label < V)  # out-of-range labels give NaN, caught by validation
    x_label = tl.load(base + tl.where(in_vocab, label, 0) * stride_v, mask=in_vocab,
                      other=float("nan"))
    tl.store(logprobs_ptr + row, (x_label.to(ACC) * inv_t - shift) - log_sum)
    tl.store(stats_ptr + 2 * row, shift)  # logsumexp = shift + log_sum
    tl.store(stats_ptr + 2 * row + 1, log_sum)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    if WRITE_GRAD:
        d_entropy = tl.zeros([], ACC)
        if WITH_ENTROPY:
            d_entropy = tl.load(entropy_coef_ptr).to(ACC)
        _row_gradient(base, stride_v, grad_ptr + b * grad_stride_b + t * grad_stride_t,
                      grad_stride_v, V, label, shift, log_sum, tl.load(coef_ptr + row).to(ACC),
                      entropy, d_entropy, inv_t, WITH_ENTROPY, ACC, BLOCK_V)


@triton.jit(do_not_specialize=["seq_len", "stride_b", "grad_stride_b"])
def _opo_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, seq_ptr,  # grad_ptr may equal logits_ptr (in place)
    stats_ptr, entropy_ptr, coef_ptr, entropy_coef_ptr,
    seq_len, V, stride_b, stride_t, stride_v, grad_stride_b, grad_stride_t, grad_stride_v,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row - b * seq_len
    grad_base = grad_ptr + b * grad_stride_b + t * grad_stride_t
    if tl.load(seq_ptr + row) < 0:  # not counted: zero gradient, logits not read
        _zero_row(grad_base, grad_stride_v, V, BLOCK_V)
        return
    entropy = tl.zeros([], ACC)
    d_entropy = tl.zeros([], ACC)
    if WITH_ENTROPY:
        entropy = tl.load(entropy_ptr + row).to(ACC)
        d_entropy = tl.load(entropy_coef_ptr).to(ACC)
    _row_gradient(logits_ptr + b * stride_b + t * stride_t, stride_v, grad_base, grad_stride_v,
                  V, tl.load(labels_ptr + row), tl.load(stats_ptr + 2 * row).to(ACC),
                  tl.load(stats_ptr + 2 * row + 1).to(ACC), tl.load(coef_ptr + row).to(ACC),
                  entropy, d_entropy,
                  tl.full([], inv_temperature, ACC), WITH_ENTROPY, ACC, BLOCK_V)


@triton.jit(do_not_specialize=["seq_len", "grad_stride_b"])
def _scale_kernel(grad_ptr, scale_ptr, seq_ptr, seq_len, V, grad_stride_b, grad_stride_t,
                  grad_stride_v, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """grad_row *= upstream gradient, for the one-pass mode whose forward wrote the gradient of
    a unit upstream gradient. Every program returns at once when the scale is exactly 1 (the
    usual ``loss.backward()``), so that case costs no pass over [N, V] and no host sync."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr).to(ACC)
    if (scale == 1.0) | (tl.load(seq_ptr + row) < 0):
        return
    b = row // seq_len
    base = grad_ptr + b * grad_stride_b + (row - b * seq_len) * grad_stride_t
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        g = tl.load(base + offs * grad_stride_v, mask=offs < V)
        tl.store(base + offs * grad_stride_v, (g.to(ACC) * scale).to(g.dtype), mask=offs < V)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Launch table (block over V, warps). One program streams one row, so the block only has to be
# wide enough to keep loads 16 bytes wide and enough bytes in flight; reductions per block are
# amortized over BLOCK_V elements. Starting point, NOT yet measured on a GPU here (see
# benchmarks/NOTES.md): 8192 elements for 16-bit logits, 4096 for 32/64-bit, 16 warps.
_MAX_BLOCK = {2: 8192, 4: 4096, 8: 2048}


def launch_config(vocab: int, dtype: torch.dtype) -> Tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of `vocab` logits of `dtype`."""
    block = min(triton.next_power_of_2(vocab), _MAX_BLOCK[dtype.itemsize])
    num_warps = 16 if block >= 4096 else (8 if block >= 1024 else 4)
    return block, num_warps


def _acc_type(dtype: torch.dtype):
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def _row_geometry(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """(rows per sequence, stride over sequences, stride over rows, stride over V) of a
    [B, T, V] or [N, V] tensor; packed rows are one "sequence" of N rows."""
    if t.dim() == 3:
        return t.shape[1], t.stride(0), t.stride(1), t.stride(2)
    return max(t.shape[0], 1), 0, t.stride(0), t.stride(1)


def forward_rows(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor,
                 temperature: float, with_entropy: bool, *, grad: Optional[torch.Tensor] = None,
                 coef: Optional[torch.Tensor] = None,
                 entropy_coef: Optional[torch.Tensor] = None):
    """Forward pass over the logits rows.

    logits: [B, T, V] or [N, V] (any strides); labels, seq: [N] int64 (seq −1 = not counted).
    Returns (logprobs [N], stats [N, 2], entropy [N] or None), float32 (float64 for float64
    logits); stats[:, 0] is the row max m of z, stats[:, 1] = log Σ exp(z − m), so the
    logsumexp is their sum (see ``logsumexp``). Rows not counted get zeros.
    One-pass mode: with ``grad`` (shaped like logits; may be logits itself), ``coef`` [N] and
    ``entropy_coef`` (0-dim), the same kernel also writes the gradient (see ``backward_rows``).
    """
    num_rows, vocab = seq.shape[0], logits.shape[-1]
    cdtype = compute_dtype(logits.dtype)
    logprobs = new_output((num_rows,), cdtype, logits.device)
    stats = new_output((num_rows, 2), cdtype, logits.device)
    entropy = new_output((num_rows,), cdtype, logits.device) if with_entropy else None
    write_grad = grad is not None
    if num_rows:
        block, num_warps = launch_config(vocab, logits.dtype)
        seq_len, stride_b, stride_t, stride_v = _row_geometry(logits)
        _opo_fwd_kernel[(num_rows,)](
            logits, labels, seq, logprobs, stats, entropy if with_entropy else logprobs,
            grad if write_grad else logits, coef if write_grad else logprobs,
            entropy_coef if write_grad and with_entropy else logprobs,
            seq_len, vocab, stride_b, stride_t, stride_v,
            *_row_geometry(grad if write_grad else logits)[1:],
            1.0 / temperature,
            WITH_ENTROPY=with_entropy, WRITE_GRAD=write_grad, ACC=_acc_type(logits.dtype),
            BLOCK_V=block, num_warps=num_warps,
        )
    return logprobs, stats, entropy


def logsumexp(stats: torch.Tensor) -> torch.Tensor:
    """The per-row logsumexp [N] from ``forward_rows``' statistics [N, 2]."""
    return stats.sum(-1)


def backward_rows(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor,
                  stats: torch.Tensor, entropy: Optional[torch.Tensor], coef: torch.Tensor,
                  entropy_coef: torch.Tensor, temperature: float, inplace: bool) -> torch.Tensor:
    """Backward pass: ∂L/∂logits, same shape and dtype as logits.

    stats: [N, 2] row statistics from ``forward_rows``.
    coef: [N] c_t = ∂L/∂lp_t; entropy_coef: 0-dim ∂L/∂H_t (used when entropy is given).
    With inplace=True the gradient overwrites `logits` (which is returned).
    """
    num_rows, vocab = seq.shape[0], logits.shape[-1]
    grad = logits if inplace else new_output(logits.shape, logits.dtype, logits.device)
    if num_rows:
        block, num_warps = launch_config(vocab, logits.dtype)
        seq_len, stride_b, stride_t, stride_v = _row_geometry(logits)
        with_entropy = entropy is not None
        _opo_bwd_kernel[(num_rows,)](
            logits, grad, labels, seq, stats, entropy if with_entropy else coef, coef,
            entropy_coef, seq_len, vocab, stride_b, stride_t, stride_v,
            *_row_geometry(grad)[1:], 1.0 / temperature,
            WITH_ENTROPY=with_entropy, ACC=_acc_type(logits.dtype), BLOCK_V=block,
            num_warps=num_warps,
        )
    return grad


def scale_rows_(grad: torch.Tensor, seq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale (0-dim tensor) on counted rows, in place; free when scale == 1."""
    num_rows, vocab = seq.shape[0], grad.shape[-1]
    if num_rows:
        block, num_warps = launch_config(vocab, grad.dtype)
        seq_len, stride_b, stride_t, stride_v = _row_geometry(grad)
        _scale_kernel[(num_rows,)](grad, scale, seq, seq_len, vocab, stride_b, stride_t,
                                   stride_v, ACC=_acc_type(grad.dtype), BLOCK_V=block,
                                   num_warps=num_warps)
    return grad


# The launchers as torch.library custom ops: torch.compile (fullgraph) sees each launch as one
# opaque op with a shape-only fake implementation, instead of tracing into Triton's launcher.
# Ops that write into an argument say so (mutates_args); none returns an alias of an input.


def _empty_rows(logits, with_entropy):
    n = logits.numel() // logits.shape[-1]
    cdtype = compute_dtype(logits.dtype)
    new = lambda k: logits.new_empty((k,), dtype=cdtype)  # noqa: E731
    return new(n), logits.new_empty((n, 2), dtype=cdtype), new(n if with_entropy else 0)


@torch.library.custom_op("opo_kernels::forward_rows", mutates_args=())
def _forward_op(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor,
                temperature: float, with_entropy: bool
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp, stats, ent = forward_rows(logits, labels, seq, temperature, with_entropy)
    return lp, stats, ent if ent is not None else lp.new_empty(0)


@_forward_op.register_fake
def _(logits, labels, seq, temperature, with_entropy):
    return _empty_rows(logits, with_entropy)


@torch.library.custom_op("opo_kernels::forward_rows_grad", mutates_args=())
def _forward_grad_op(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor,
                     coef: torch.Tensor, entropy_coef: torch.Tensor, temperature: float,
                     with_entropy: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad = new_output(logits.shape, logits.dtype, logits.device)
    lp, stats, ent = forward_rows(logits, labels, seq, temperature, with_entropy, grad=grad,
                                coef=coef, entropy_coef=entropy_coef)
    return lp, stats, ent if ent is not None else lp.new_empty(0), grad


@_forward_grad_op.register_fake
def _(logits, labels, seq, coef, entropy_coef, temperature, with_entropy):
    return (*_empty_rows(logits, with_entropy), torch.empty_like(logits))


@torch.library.custom_op("opo_kernels::forward_rows_grad_", mutates_args=("logits",))
def _forward_grad_inplace_op(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor,
                             coef: torch.Tensor, entropy_coef: torch.Tensor,
                             temperature: float, with_entropy: bool
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp, stats, ent = forward_rows(logits, labels, seq, temperature, with_entropy, grad=logits,
                                coef=coef, entropy_coef=entropy_coef)
    return lp, stats, ent if ent is not None else lp.new_empty(0)


@_forward_grad_inplace_op.register_fake
def _(logits, labels, seq, coef, entropy_coef, temperature, with_entropy):
    return _empty_rows(logits, with_entropy)


@torch.library.custom_op("opo_kernels::backward_rows", mutates_args=())
def _backward_op(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor,
                 stats: torch.Tensor, entropy: torch.Tensor, coef: torch.Tensor,
                 entropy_coef: torch.Tensor, temperature: float) -> torch.Tensor:
    return backward_rows(logits, labels, seq, stats, entropy if entropy.numel() else None, coef,
                         entropy_coef, temperature, inplace=False)


@_backward_op.register_fake
def _(logits, labels, seq, stats, entropy, coef, entropy_coef, temperature):
    return torch.empty_like(logits)


@torch.library.custom_op("opo_kernels::backward_rows_", mutates_args=("logits",))
def _backward_inplace_op(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor,
                         stats: torch.Tensor, entropy: torch.Tensor, coef: torch.Tensor,
                         entropy_coef: torch.Tensor, temperature: float) -> None:
    backward_rows(logits, labels, seq, stats, entropy if entropy.numel() else None, coef,
                  entropy_coef, temperature, inplace=True)


@torch.library.custom_op("opo_kernels::scale_rows_", mutates_args=("grad",))
def _scale_op(grad: torch.Tensor, seq: torch.Tensor, scale: torch.Tensor) -> None:
    scale_rows_(grad, seq, scale)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


class FusedOPOFunction(torch.autograd.Function):
    """loss, metrics_vector = FusedOPOFunction.apply(logits, batch, cfg).

    Only logits receive a gradient (ω, τ, p̃, Q are constants; ref_logprobs and rewards are
    data). metrics_vector holds the values of ``epilogue.metric_keys(cfg)``, not differentiable.

    Two modes:
    - general: forward kernel (1 read) -> epilogue -> backward kernel (1 read + 1 write).
    - on-policy one-pass (``batch.ref_logprobs is None``): π_ref is the detached current policy,
      so Δ ≡ 0, v = 0, p̃ is uniform and c_t depends only on rewards, groups and lengths. c_t is
      computed first and the forward kernel writes the gradient of a unit upstream gradient
      in the same launch; backward only scales it (free when the upstream gradient is 1).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, batch: Batch, cfg: OPOLossConfig):
        one_pass = batch.ref_logprobs is None
        rows = (logits, batch.flat_labels.contiguous(), batch.seq.contiguous())
        if one_pass:
            pre = on_policy_coefficients(cfg, batch)
            if cfg.inplace_backward:
                logprobs, stats, entropy = _forward_grad_inplace_op(
                    *rows, pre.coef, pre.entropy_coef, cfg.temperature, cfg.with_entropy)
                grad = logits
            else:
                logprobs, stats, entropy, grad = _forward_grad_op(
                    *rows, pre.coef, pre.entropy_coef, cfg.temperature, cfg.with_entropy)
        else:
            logprobs, stats, entropy = _forward_op(*rows, cfg.temperature, cfg.with_entropy)
        if cfg.validate and not torch.compiler.is_compiling():  # the one host sync
            check_values(batch, logsumexp(stats), logprobs)
        entropy = entropy if cfg.with_entropy else None
        out = batch_epilogue(cfg, batch, logprobs, entropy)
        metrics = pack_metrics(cfg, out)
        ctx.mark_non_differentiable(metrics)
        ctx.cfg = cfg
        ctx.one_pass = one_pass
        if one_pass:
            ctx.save_for_backward(grad, rows[2])
            ctx.backward_done = False
        else:
            in_grad = entropy if cfg.entropy_in_gradient else None  # metric-only otherwise
            ctx.save_for_backward(logits, *rows[1:], stats, out.coef,
                                  out.entropy_coef, *([in_grad] if in_grad is not None else []))
        return out.loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        cfg = ctx.cfg
        if ctx.one_pass:
            if ctx.backward_done:
                raise RuntimeError("opo_loss with ref_logprobs=None (one-pass on-policy mode) "
                                   "writes its gradient during forward: run backward once")
            ctx.backward_done = True
            grad, seq = ctx.saved_tensors
            _scale_op(grad, seq, grad_loss.to(compute_dtype(grad.dtype)))
            return grad, None, None
        logits, labels, seq, stats, coef, entropy_coef, *entropy = ctx.saved_tensors
        grad_loss = grad_loss.to(coef.dtype)
        args = (logits, labels, seq, stats, entropy[0] if entropy else coef.new_empty(0),
                coef * grad_loss, entropy_coef * grad_loss, cfg.temperature)
        if cfg.inplace_backward:
            _backward_inplace_op(*args)
            grad = logits
        else:
            grad = _backward_op(*args)
        return grad, None, None


# --------------------------------------------------------------------------------------------
# Functional API and module
# --------------------------------------------------------------------------------------------


def loss_from_batch(batch: Batch, cfg: OPOLossConfig):
    """The fused path on prepared inputs (see ``inputs.prepare``)."""
    loss, metrics = FusedOPOFunction.apply(batch.logits, batch, cfg)
    if not cfg.return_metrics:
        return loss
    return loss, unpack_metrics(cfg, metrics)


def opo_loss(logits, labels, ref_logprobs, rewards, *, mask=None, seq_ids=None,
             group_size=None, group_ids=None, **options):
    """The OPO loss (shared/SPEC.md) from LLM logits, with a fused Triton backward.

    Padded layout: logits [B, T, V] (fp32/bf16/fp16; a view like ``logits[:, :-1]`` is read
    in place), labels [B, T] int, ref_logprobs [B, T] float, mask [B, T] (bool or 0/1).
    Packed layout: logits [N, V], labels [N], ref_logprobs [N], seq_ids [N] (−1 = not counted).
    rewards: [B] float; exactly one of group_size (int) or group_ids [B] int.
    ref_logprobs=None means on-policy (π_ref = the detached current policy).

    validate=True (default) checks labels, seq_ids, mask values and finiteness with one host
    sync per call; validate=False skips it (no host sync at all). inplace_backward=True writes
    the gradient into the logits buffer (saves one logits-sized allocation; logits are
    overwritten by backward).

    options: the fields of ``OPOLossConfig`` as keywords (alpha=0.6, mu=1.0, tau=0.5,
    adaptive_tau=True, tau_range=(0.2, 1.5), reward_temperature=0.15, weights="seed",
    center_weights=False, level="sequence_mean", coordinates="ratio", temperature=1.0,
    entropy_coef=0.0, backend="auto", return_metrics=False, validate=True,
    inplace_backward=False, compute_entropy=False, ...); an unknown name is a TypeError.

    Returns the 0-dim loss (float32; float64 for float64 logits), or (loss, metrics) with
    return_metrics=True: log_ratio_mean, kl_k3, v_mean, omega_mean, omega_max, tau, penalty
    (+ entropy_mean when entropy_coef > 0 or compute_entropy=True: the entropy is computed in
    the same pass over the logits, at no extra traffic).

    Example::

        loss = opo_loss(logits[:, :-1], input_ids[:, 1:], old_logprobs, rewards,
                        mask=completion_mask, group_size=6)
    """
    cfg = OPOLossConfig(**options)
    return opo_loss_with_config(logits, labels, ref_logprobs, rewards, cfg, mask=mask,
                                seq_ids=seq_ids, group_size=group_size, group_ids=group_ids)


def opo_loss_with_config(logits, labels, ref_logprobs, rewards, cfg: OPOLossConfig, *,
                         mask=None, seq_ids=None, group_size=None, group_ids=None):
    """``opo_loss`` with an already validated ``OPOLossConfig`` (used by ``OPOLoss``)."""
    from . import reference  # local import: the reference is only needed for backend="torch"

    batch = prepare(logits, labels, ref_logprobs, rewards, mask=mask, seq_ids=seq_ids,
                    group_size=group_size, group_ids=group_ids, config=cfg)
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
                group_size=None, group_ids=None):
        return opo_loss_with_config(logits, labels, ref_logprobs, rewards, self.config,
                                    mask=mask, seq_ids=seq_ids, group_size=group_size,
                                    group_ids=group_ids)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self.config, k)!r}" for k in
                         ("alpha", "mu", "level", "coordinates", "weights", "backend"))
