"""The OPO loss fused with the LM head (logits = hidden @ weight.T + bias), chunked over token
rows so that the [N, V] logits are never materialized: launchers -> autograd.Function -> API.

The Triton kernels are the ones of ``fused_opo.py``; this file only feeds them chunks of rows.
With C = chunk_size and rows flattened to [N, H] (padded [B, T, H] row-major, or packed):

  phase 1 (forward), per chunk:  logits_c = hidden_c @ weight.T + bias        [C, V], input dtype
                                 forward_rows(logits_c) -> lp, stats, H_t     [C], [C, 2]
          then ONCE over all N rows: epilogue -> loss, metrics, c_t           (epilogue.py)
  phase 2 (backward), per chunk: logits_c recomputed, its gradient written IN PLACE by
                                 backward_rows(c_t·grad_loss), then
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
from typing import Optional, Tuple

import torch
import triton

from .config import OPOLossConfig
from .epilogue import Mode, params_tensor, raise_bad_values, run_epilogue, unpack_metrics
from .fused_opo import one_pass_exact
from .inputs import FLOAT_DTYPES, Batch, compute_dtype, prepare
from .row_kernels import Rows, backward_rows, forward_rows
from .tensor_parallel import config_or_fail_together
from .utils import new_output, use_triton

# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Default chunk: the largest power of two of rows whose logits fit in _CHUNK_BYTES, at least
# _MIN_CHUNK rows (so each chunk's matmuls still amortize one read of the weight; only binds for
# V·itemsize > 2 MiB) and at most N. Not measured on a GPU here (no GPU in this session): a
# starting point, e.g. V = 151,936 in bf16 -> 512 rows (148 MiB of logits), V = 32,000 -> 4096.
_CHUNK_BYTES = 256 * 2**20
_MIN_CHUNK = 128


def default_chunk_size(num_rows: int, vocab: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Rows per chunk: largest power of two with rows·V·itemsize <= 256 MiB, clamped to
    [128, N] (N = number of token rows; at least 1).

    The hidden size H does not enter: a chunk's transient memory is its [C, V] logits buffer
    (the gradient is written into it in place); the [C, H] slices are views of the inputs and
    outputs, and the fp32 weight-gradient accumulator is [V, H] whatever C is.
    """
    del hidden_size  # see the docstring: H does not change the chunk's transient memory
    rows = max(_CHUNK_BYTES // max(vocab * dtype.itemsize, 1), 1)
    rows = max(triton.next_power_of_2(rows + 1) // 2, _MIN_CHUNK)  # power of two <= rows
    return max(min(rows, num_rows), 1)


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[C, V] logits of one chunk in the input dtype (a fresh buffer the backward overwrites)."""
    return torch.nn.functional.linear(hidden_c, weight, bias)


def _accumulate(grad_logits: torch.Tensor, hidden_c: torch.Tensor, weight: torch.Tensor,
                grad_hidden_c: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor],
                grad_bias: Optional[torch.Tensor]) -> None:
    """One chunk's contribution to the three gradients (accumulators in fp32 / fp64)."""
    if grad_hidden_c is not None:
        torch.mm(grad_logits, weight, out=grad_hidden_c)
    if grad_weight is not None:
        if grad_weight.dtype == grad_logits.dtype:
            grad_weight.addmm_(grad_logits.t(), hidden_c)
        else:  # 16-bit: the chunk's product (fp32 inside the matmul) is summed in fp32
            grad_weight.add_(grad_logits.t() @ hidden_c)
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0, dtype=grad_bias.dtype))


def _chunks(num_rows: int, chunk_size: int):
    for start in range(0, num_rows, chunk_size):
        yield start, min(start + chunk_size, num_rows)


def _row_outputs(batch: Batch, with_entropy: bool):
    """(logprobs [N], stats [N, 2], entropy [N] or None) that every chunk writes into."""
    n, cdtype, dev = batch.num_rows, batch.compute_dtype, batch.device
    return (new_output((n,), cdtype, dev), new_output((n, 2), cdtype, dev),
            new_output((n,), cdtype, dev) if with_entropy else None)


def forward_chunks(hidden2d, weight, bias, batch: Batch, cfg: OPOLossConfig, params,
                   chunk_size: int, tp=None):
    """Phase 1: per-row (logprobs [N], stats [N, 2], entropy [N] or None) over all rows, chunk
    by chunk (stats: the row statistics of ``forward_rows``). tp = (group, vocab_start): the
    weight is this rank's vocabulary slice; the chunks write partials, combined once."""
    rows = Rows.of(batch)
    if tp is None:
        out = _row_outputs(batch, cfg.with_entropy)
        for start, end in _chunks(hidden2d.shape[0], chunk_size):
            logits = _chunk_logits(hidden2d[start:end], weight, bias)
            forward_rows(logits, rows, params, cfg.with_entropy, row_start=start, out=out)
        return out
    from .tensor_parallel import combine_partials

    group, vocab_start = tp
    partials = new_output((batch.num_rows, 4), batch.compute_dtype, batch.device)
    for start, end in _chunks(hidden2d.shape[0], chunk_size):
        logits = _chunk_logits(hidden2d[start:end], weight, bias)
        forward_rows(logits, rows, params, cfg.with_entropy, row_start=start,
                     partials=partials, vocab_start=vocab_start)
    return combine_partials(partials, batch.counted, 1.0 / cfg.temperature, cfg.with_entropy,
                            group)


def _grad_buffers(hidden2d, weight, bias, needs: Tuple[bool, bool, bool]):
    acc = compute_dtype(hidden2d.dtype)
    grad_hidden = (new_output(hidden2d.shape, hidden2d.dtype, hidden2d.device)
                   if needs[0] else None)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
    grad_bias = (torch.zeros(bias.shape, dtype=acc, device=bias.device)
                 if needs[2] and bias is not None else None)
    return grad_hidden, grad_weight, grad_bias


def backward_chunks(hidden2d, weight, bias, rows: Rows, saved, grad_loss, params,
                    cfg: OPOLossConfig, chunk_size: int, needs: Tuple[bool, bool, bool],
                    vocab_start: int = 0):
    """Phase 2: (grad_hidden [N, H] in hidden's dtype, grad_weight [V, H], grad_bias [V]) in
    fp32 (fp64 for fp64 inputs), each None when not needed. saved = (logprobs, stats,
    entropy or None, coef, scal) of phase 1 and the epilogue; grad_loss: 0-dim (on device)."""
    logprobs, stats, entropy, coef, scal = saved
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden2d, weight, bias, needs)
    for start, end in _chunks(hidden2d.shape[0], chunk_size):
        hidden_c = hidden2d[start:end]
        logits = _chunk_logits(hidden_c, weight, bias)
        grad_logits = backward_rows(logits, rows, logprobs, stats, entropy, coef, scal,
                                    grad_loss, params, cfg.level, cfg.coordinates, inplace=True,
                                    row_start=start, vocab_start=vocab_start)
        _accumulate(grad_logits, hidden_c, weight,
                    None if grad_hidden is None else grad_hidden[start:end],
                    grad_weight, grad_bias)
    return grad_hidden, grad_weight, grad_bias


def on_policy_chunks(hidden2d, weight, bias, batch: Batch, cfg: OPOLossConfig, params, counter,
                     chunk_size: int, needs: Tuple[bool, bool, bool], tp=None):
    """One phase (ref_logprobs=None): forward statistics AND the gradients for a unit upstream
    gradient, in one pass over the chunks. Returns ((logprobs, stats, entropy), grads).

    tp = (group, vocab_start): the weight is this rank's vocabulary slice. A row's gradient
    needs the row's global normalization, so each chunk's slice partials are combined (two
    all-reduces of the chunk's rows: O(C) values) before the backward kernel writes the
    chunk's gradient over its logits — still one matmul per chunk instead of the general
    path's two (the logits are not recomputed in backward)."""
    mode = Mode.of(cfg, batch.weights is not None)
    unit = run_epilogue(batch, mode, params, counter, logprobs=None)  # c_t without log-probs
    rows, out = Rows.of(batch), _row_outputs(batch, cfg.with_entropy)
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden2d, weight, bias, needs)
    if tp is not None:
        from .tensor_parallel import combine_partials

        group, vocab_start = tp
        partials = new_output((batch.num_rows, 4), batch.compute_dtype, batch.device)
        unit_grad = torch.ones((), dtype=batch.compute_dtype, device=batch.device)
    for start, end in _chunks(hidden2d.shape[0], chunk_size):
        hidden_c = hidden2d[start:end]
        logits = _chunk_logits(hidden_c, weight, bias)
        if tp is None:  # one kernel: statistics, then the row's gradient over its logits
            forward_rows(logits, rows, params, cfg.with_entropy, row_start=start, out=out,
                         grad=logits, coef=unit.coef, scal=unit.scal)
        else:
            forward_rows(logits, rows, params, cfg.with_entropy, row_start=start,
                         partials=partials, vocab_start=vocab_start)
            chunk_out = combine_partials(partials[start:end], batch.counted[start:end],
                                         1.0 / cfg.temperature, cfg.with_entropy, group)
            for full, part in zip(out, chunk_out):
                if full is not None:
                    full[start:end] = part
            # the one-pass kernel's coefficients: c_t from the on-policy epilogue (Δ ≡ 0:
            # no per-token term, whatever the level), a unit upstream gradient
            backward_rows(logits, rows, out[0], out[1],
                          out[2] if cfg.entropy_in_gradient else None, unit.coef, unit.scal,
                          unit_grad, params, "sequence", "log", inplace=True,
                          row_start=start, vocab_start=vocab_start)
        _accumulate(logits, hidden_c, weight,
                    None if grad_hidden is None else grad_hidden[start:end],
                    grad_weight, grad_bias)
    return out, (grad_hidden, grad_weight, grad_bias)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _scale(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad·grad_loss, multiplied in fp32 (fp64) so a 16-bit grad is rounded only once more."""
    acc = compute_dtype(grad.dtype)
    return (grad.to(acc) * grad_loss.to(acc)).to(grad.dtype)


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
            grad_hidden, grad_weight, grad_bias = map(
                lambda g: None if g is None else _scale(g, grad_loss), ctx.saved_tensors)
            if tp is not None and tp[2] and grad_hidden is not None:
                torch.distributed.all_reduce(grad_hidden, group=tp[0])  # Σ over the slices
        else:
            (hidden, weight, bias, logprobs, stats, entropy, coef, scal,
             params) = ctx.saved_tensors
            grad_hidden, grad_weight, grad_bias = backward_chunks(
                hidden.reshape(-1, hidden.shape[-1]), weight, bias, ctx.rows,
                (logprobs, stats, entropy, coef, scal), grad_loss, params, cfg,
                ctx.chunk_size, ctx.needs, vocab_start=0 if tp is None else tp[1],
            )
            if tp is not None and tp[2] and grad_hidden is not None:
                torch.distributed.all_reduce(grad_hidden, group=tp[0])  # Σ over the slices
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden_dtype).view(ctx.hidden_shape)
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
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, "
                            f"got {t.dtype}")
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
    cfg = OPOLossConfig(**options)
    if cfg.inplace_backward:
        raise ValueError("inplace_backward does not apply: the fused-linear backward "
                         "always writes into its own chunk buffer")
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

    Gradients flow to hidden, weight and bias (weight/bias gradients are accumulated over the
    chunks in fp32 and cast to the parameter dtype). The result equals
    ``opo_loss(hidden @ weight.T + bias, ...)`` for any chunk size, up to rounding.

    chunk_size: token rows per chunk. Default: the largest power of two whose logits take at
    most 256 MiB (rows·V·itemsize), clamped to [128, N] (``default_chunk_size``). Memory
    beyond the inputs: one [chunk, V] logits buffer in the input dtype (the gradient is written
    into it), O(N) fp32 statistics, and while gradients are formed the fp32 [V, H] weight (and
    [V] bias) gradient accumulators (for 16-bit inputs plus one [V, H] 16-bit product per chunk
    before it is added) and the [N, H] hidden gradient. Never an [N, V] tensor. A padded hidden
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
                                      process_group, vocab_start, reduce_hidden_grad, layout)
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
        chunk_size = default_chunk_size(batch.num_rows, weight.shape[0], hidden.shape[-1],
                                        hidden.dtype)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    # on-policy: one phase, also vocabulary-parallel (see on_policy_chunks)
    one_phase = batch.ref_logprobs is None and wants_grad and one_pass_exact(cfg)
    loss, metrics = FusedLinearOPOFunction.apply(hidden, weight, bias, batch, cfg, chunk_size,
                                                 one_phase, tp)
    if not cfg.return_metrics:
        return loss
    return loss, unpack_metrics(metrics, cfg.with_entropy)


def _prepare_parallel(hidden, weight, bias, labels, ref_logprobs, rewards, cfg, group,
                      vocab_start, reduce_hidden_grad, layout):
    """Checks of a vocabulary-parallel call, agreed by every rank (see tensor_parallel)."""
    from .tensor_parallel import check_layout

    error, batch = None, None
    try:
        if not use_triton(cfg.backend, hidden.device):
            raise ValueError("process_group needs the fused kernels (backend 'triton' or "
                             "'auto' on CUDA / with TRITON_INTERPRET=1)")
        if vocab_start is not None and (isinstance(vocab_start, bool) or
                                        not isinstance(vocab_start, int) or vocab_start < 0):
            raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
        if not isinstance(reduce_hidden_grad, bool):
            raise TypeError(f"reduce_hidden_grad must be a bool, got {reduce_hidden_grad!r}")
        batch = prepare_linear(hidden, weight, bias, labels, ref_logprobs, rewards, cfg,
                               **layout)
    except (TypeError, ValueError) as err:
        error = err
    vocab_local = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() else 0
    start, vocab = check_layout(group, vocab_local, vocab_start,
                                batch.num_rows if batch is not None else -1, error,
                                cfg.validate)
    return dataclasses.replace(batch, vocab=vocab), (group, start, reduce_hidden_grad)


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
