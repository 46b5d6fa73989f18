"""``opo_loss`` on vocabulary-parallel logits: the autograd function and the call's checks
(the agreement step across ranks is in ``tensor_parallel.py``; the all-gather and the combine
kernel in ``tp_combine.py``).

Each rank holds logits [..., V_local], the slice [vocab_start, vocab_start + V_local) of the
vocabulary. Two modes, both exact (to rounding) against one process with the whole vocabulary:

  general     forward row kernel over the slice (1 read; the slice's partials) -> one
              all-gather + combine kernel -> epilogue (replicated) ; backward row kernel
              (1 read + 1 write). Used for every batch unless the next mode is asked for.
  one-pass    on-policy (ref_logprobs=None) with ``vocab_parallel_one_pass=True``: the
              coefficients come first (counts-only epilogue), then, per chunk of rows sized to
              stay in L2, the forward kernel's partials, the chunk's all-gather and combine,
              and the backward kernel, which re-reads the chunk (from L2 when it fits) and
              writes the gradient of a unit upstream gradient; backward only rescales. HBM
              traffic 1 read + 1 write, at the price of one all-gather and three launches per
              chunk instead of per call.

Why the one-pass mode is not the default: a row's normalization is global, known only after a
collective, so the re-read can hit L2 only if the collective comes between the two reads of a
chunk that fits in L2. Streaming L2's capacity from HBM takes ~15 µs on an H100 (50 MB at
~3.3 TB/s); a chunk of ~16 MiB saves ~5 µs of HBM reading, and a small all-gather costs
~5–15 µs on NVLink (a typical figure, not measured here; more across nodes). The trade is
close to even at best and depends on the interconnect and tp, so it is an option to measure on
the target machine (no multi-GPU machine has run it yet).
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch

from .config import OPOLossConfig
from .epilogue import Mode, params_tensor, raise_bad_values, run_epilogue, unpack_metrics
from .inputs import Batch, prepare
from .row_launch import Rows, backward_rows, forward_rows, row_outputs, scale_rows_
from .tensor_parallel import prepare_together
from .tp_combine import combine_partials, one_pass_chunk
from .utils import (
    first_order_only,
    mark_written,
    new_output,
    one_pass_mode,
    use_triton,
    wants_grad,
)

# Bytes of one rank's logits per chunk of the one-pass mode: the chunk is read, then re-read
# while its gradient (as many bytes) is written through L2, so two chunks must fit in the L2
# next to everything else (H100 / H200: 50 MB, in two partitions). A starting point, not measured.
_ONE_PASS_CHUNK_BYTES = 16 * 2**20


def one_pass_chunk_rows(vocab: int, world: int, itemsize: int) -> int:
    """Rows per chunk: as many as fit in ``_ONE_PASS_CHUNK_BYTES`` at ⌈V / world⌉ logits per
    row (the global V, not this rank's slice: uneven slices must cut the same chunks on every
    rank, or the chunks' all-gathers would not pair up). At least 1."""
    per_row = -(-vocab // world) * itemsize
    return max(_ONE_PASS_CHUNK_BYTES // max(per_row, 1), 1)


def row_pieces(logits: torch.Tensor, chunk_rows: int) -> Iterator[Tuple[torch.Tensor, int]]:
    """(view of logits, first global row) covering the rows in order, each of at most
    ``chunk_rows`` rows: packed [N, V] -> logits[s:e]; padded [B, T, V] -> whole sequences
    logits[b0:b1] ([b, T, V]) when a chunk holds a sequence, else logits[b, t0:t1] ([R, V]).
    Views only: the row kernels read them through their strides."""
    if logits.dim() == 2:
        for start in range(0, logits.shape[0], chunk_rows):
            yield logits[start:start + chunk_rows], start
        return
    num_seqs, seq_len = logits.shape[0], logits.shape[1]
    if seq_len == 0:
        return
    if chunk_rows >= seq_len:
        per = chunk_rows // seq_len
        for b in range(0, num_seqs, per):
            yield logits[b:b + per], b * seq_len
        return
    for b in range(num_seqs):
        for t in range(0, seq_len, chunk_rows):
            yield logits[b, t:t + chunk_rows], b * seq_len + t


class VocabParallelOPOFunction(torch.autograd.Function):
    """loss, metrics_vector = VocabParallelOPOFunction.apply(logits, batch, cfg, group,
    vocab_start, one_pass): logits [..., V_local] are this rank's vocabulary slice; batch.vocab
    is the global V. one_pass: the on-policy one-pass mode (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits, batch: Batch, cfg: OPOLossConfig, group, vocab_start: int,
                one_pass: bool):
        params = params_tensor(cfg, logits.device, batch.compute_dtype)
        rows = Rows.of(batch)
        mode = Mode.of(cfg, batch.weights is not None)
        counters = torch.zeros(2, dtype=torch.int32, device=logits.device)  # epilogue tickets
        partials = new_output((batch.num_rows, 4), batch.compute_dtype, logits.device)
        grad = None
        if one_pass:
            grad = logits if cfg.inplace_backward else new_output(logits.shape, logits.dtype,
                                                                   logits.device)
            lp, stats, ent = _one_pass(logits, grad, batch, cfg, params, mode, counters[0:1],
                                       partials, rows, group, vocab_start)
        else:
            forward_rows(logits, rows, params, cfg.with_entropy, partials=partials,
                         vocab_start=vocab_start)
            lp, stats, ent = combine_partials(partials, params, cfg.with_entropy, group)
        shape = batch.labels.shape
        out = run_epilogue(batch, mode, params, counters[1:2], logprobs=lp.view(shape),
                           entropy=None if ent is None else ent.view(shape), stats=stats,
                           validate=cfg.validate)
        if cfg.validate:  # the same counts on every rank: every rank raises, none waits
            raise_bad_values(out.errs, batch)
        ctx.mark_non_differentiable(out.metrics)
        ctx.set_materialize_grads(False)
        ctx.cfg, ctx.rows, ctx.vocab_start, ctx.one_pass = cfg, rows, vocab_start, one_pass
        ctx.versions = rows.versions()
        if one_pass:
            ctx.save_for_backward(grad)
            ctx.backward_done = False
        else:
            ctx.save_for_backward(logits, lp, stats, ent if cfg.entropy_in_gradient else None,
                                  out.coef, out.scal, params)
        return out.loss, out.metrics

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, grad_metrics):
        if grad_loss is None:
            return None, None, None, None, None, None
        ctx.rows.check_unchanged(ctx.versions, "opo_loss")
        if ctx.one_pass:
            if ctx.backward_done:
                raise RuntimeError("opo_loss with vocab_parallel_one_pass=True and "
                                   "ref_logprobs=None writes its gradient during forward: run "
                                   "backward once")
            ctx.backward_done = True
            (grad,) = ctx.saved_tensors
            grad = scale_rows_(grad, ctx.rows, grad_loss)
            if ctx.cfg.inplace_backward:  # written in forward, told to autograd here
                mark_written(grad)
            return grad, None, None, None, None, None
        logits, lp, stats, ent, coef, scal, params = ctx.saved_tensors
        cfg = ctx.cfg
        grad = backward_rows(logits, ctx.rows, lp, stats, ent, coef, scal, grad_loss, params,
                             cfg.level, cfg.coordinates, inplace=cfg.inplace_backward,
                             vocab_start=ctx.vocab_start)
        if cfg.inplace_backward:
            mark_written(logits)
        return grad, None, None, None, None, None


def _one_pass(logits, grad, batch: Batch, cfg: OPOLossConfig, params, mode, counter, partials,
              rows: Rows, group, vocab_start: int):
    """The one-pass mode's forward: (logprobs [N], stats [N, 2], entropy [N] or None), with
    ``grad`` (logits-shaped; logits itself in place) written for a unit upstream gradient."""
    unit = run_epilogue(batch, mode, params, counter, logprobs=None)  # c_t without log-probs
    out = row_outputs(batch.num_rows, batch.compute_dtype, logits.device, cfg.with_entropy)
    unit_grad = torch.ones((), dtype=batch.compute_dtype, device=logits.device)
    world = torch.distributed.get_world_size(group)
    chunk = one_pass_chunk_rows(batch.vocab, world, logits.element_size())
    for (piece, start), (grad_piece, _) in zip(row_pieces(logits, chunk),
                                               row_pieces(grad, chunk)):
        one_pass_chunk(piece, piece if cfg.inplace_backward else grad_piece, rows, params, cfg,
                       partials, out, unit, unit_grad, group, vocab_start, start)
    return out


def require_fused_kernels(cfg: OPOLossConfig, batch: Batch) -> None:
    if not use_triton(cfg.backend, batch.device):
        raise ValueError("process_group needs the fused kernels (backend 'triton' or 'auto' "
                         "on CUDA / with TRITON_INTERPRET=1)")


def vocab_parallel_loss(logits, labels, ref_logprobs, rewards, cfg: OPOLossConfig, group,
                        vocab_start, **layout):
    """``opo_loss`` on vocabulary-parallel logits (see ``opo_loss``)."""
    def checked():
        if cfg.grad_to_base:  # (raised inside prepare_together: every rank raises)
            raise ValueError("grad_to_base is not supported with process_group "
                             "(vocabulary-parallel logits)")
        batch = prepare(logits, labels, ref_logprobs, rewards, config=cfg, **layout)
        require_fused_kernels(cfg, batch)
        return batch

    is_tensor = isinstance(logits, torch.Tensor)
    vocab_local = logits.shape[-1] if is_tensor and logits.dim() else 0
    one_pass = (cfg.vocab_parallel_one_pass and is_tensor
                and one_pass_mode(ref_logprobs, cfg, logits.dtype, wants_grad(logits))
                and not torch.compiler.is_compiling())
    # agreed by every rank: the partials' dtype follows the logits', and the one-pass mode runs
    # a collective per chunk where the general mode runs one per call
    batch, start, _ = prepare_together(group, checked, vocab_local, vocab_start, cfg,
                                       agree={"logits dtype": logits.dtype if is_tensor
                                              else None, "one-pass mode": one_pass})
    loss, metrics = VocabParallelOPOFunction.apply(logits, batch, cfg, group, start, one_pass)
    if not cfg.return_metrics:
        return loss
    return loss, unpack_metrics(metrics, cfg.with_entropy)
