"""The epilogue's launcher: ``EpilogueLaunch`` (everything but the tensors, built once per
call signature by ``call_plan``, or per call by ``run_epilogue``) and ``run_epilogue``."""

from __future__ import annotations

from typing import Optional

import torch
import triton.language as tl

from ..launches import Launch
from ..row_launch import small_geometry
from ..utils import cdiv
from . import kernel as _kernel
from .kernel import EpilogueOut, Mode, _chunks
from .layout import METRICS, NUM_ERR, NUM_WS


class EpilogueLaunch:
    """One launch of ``epilogue_kernel`` for one geometry.

    batch: ``inputs.Batch`` (only its layout, strides and dtypes are used: the tensors come
    with each call); mode: ``Mode.of(cfg, ...)``; has_lp: log-probs are given (False: the
    on-policy pre-pass, counts only); lp_geo: (stride over sequences, over tokens) of those
    log-probs; has_ent: entropy is given (same layout as the log-probs); from_logits: the
    log-probs come from the forward kernel (its statistics are checked when validating).

    Sizes of the scratch tensors the caller provides: ``ws_size`` elements of the compute
    dtype (the [NUM_WS, B] workspace), ``sums_size`` (the [chunks, 8, B] partial sums; 0:
    phase 1 writes the workspace itself), ``part_errs_size`` int32 (per-program value-check
    counts, [programs, NUM_ERR]).

    ``at``: where logprobs, entropy, stats, ws, sums, metrics, coef, scal, part_errs, counter
    and errs start in the tensors passed for them, in units of 4 elements (kernel._AT_ARGS):
    0 here; ``call_plan``, which passes one float and one int workspace for them, sets it
    once its layout (made from the sizes above) is known.
    """

    def __init__(self, batch, mode: Mode, *, has_lp: bool, lp_geo=(0, 0), has_ent: bool = False,
                 ent_geo=(0, 0), from_logits: bool = True, validate: bool = False):
        B, N = batch.num_seqs, batch.num_rows
        packed = batch.seq_ids is not None
        T = N if packed else batch.seq_len
        block_s, block_t = (32, 128) if packed else (16, 64)
        chunk_len, num_chunks = _chunks(T, block_t)
        num_programs = max(cdiv(B, block_s), 1) * num_chunks
        validate = bool(validate and has_lp)
        self.has_ref = batch.ref_logprobs is not None and has_lp
        self.has_ent, self.check_labels = has_ent, from_logits and validate
        self.num_seqs = max(B, 1)
        self.ws_size = NUM_WS * self.num_seqs
        self.sums_size = 0 if num_chunks == 1 else num_chunks * 8 * self.num_seqs
        self.part_errs_size = (num_programs if validate else 1) * NUM_ERR
        sel = batch.seq_ids if packed else batch.mask
        self.has_sel = sel is not None
        self.lp_geo = lp_geo if has_lp else (0, 0)
        self.ref_geo = small_geometry(batch.ref_logprobs)
        self.ent_geo = ent_geo if has_ent else (0, 0)
        self.sel_geo = small_geometry(sel)
        self.lab_geo = small_geometry(batch.labels) if self.check_labels else (0, 0)
        self.r_st = batch.rewards.stride(0)
        self.gid_st = batch.group_ids.stride(0) if batch.group_ids is not None else 0
        self.w_st = batch.weights.stride(0) if batch.weights is not None else 0
        self.at = (0,) * 11
        self.tail = (
            B, T, N, batch.vocab, batch.group_size or 1, num_chunks, chunk_len,
            packed, batch.mask is not None, has_lp, self.has_ref, has_ent,
            int(has_ent and mode.bonus), mode.bonus, from_logits,
            int(batch.ref_logprobs is None), mode.level, mode.ratio, mode.weights, mode.center,
            mode.adaptive, mode.scale_rewards, batch.group_ids is not None, int(validate),
            tl.float64 if batch.compute_dtype == torch.float64 else tl.float32,
            block_s, block_t, 32, NUM_ERR, 64)
        # looked up at each build: a tool may stand in for the kernel (tools/gpu/aot_check.py)
        self.launch = Launch(_kernel.epilogue_kernel, (num_programs,), 4)

    def __call__(self, batch, params, counter, out: EpilogueOut, ws, sums, part_errs, *,
                 logprobs=None, entropy=None, stats=None) -> EpilogueOut:
        """ws, sums (None when ``sums_size`` is 0), part_errs: scratch of the sizes above;
        counter: a zeroed int32 slot (the last-program ticket), used once."""
        dummy = ws
        self.launch(
            logprobs if logprobs is not None else ws, *self.lp_geo,
            batch.ref_logprobs if self.has_ref else dummy, *self.ref_geo,
            entropy if self.has_ent else dummy, *self.ent_geo,
            (batch.seq_ids if batch.seq_ids is not None else batch.mask) if self.has_sel
            else dummy, *self.sel_geo,
            batch.labels if self.check_labels else dummy, *self.lab_geo,
            stats if stats is not None else dummy,
            batch.rewards, self.r_st,
            batch.group_ids if batch.group_ids is not None else dummy, self.gid_st,
            batch.weights if batch.weights is not None else dummy, self.w_st,
            params, ws, sums if sums is not None else ws, part_errs, counter,
            out.loss, out.metrics, out.coef, out.scal, out.errs, *self.at, *self.tail)
        return out


def run_epilogue(batch, mode: Mode, params: torch.Tensor, counter: torch.Tensor, *,
                 logprobs: Optional[torch.Tensor], entropy: Optional[torch.Tensor] = None,
                 stats: Optional[torch.Tensor] = None, from_logits: bool = True,
                 validate: bool = False) -> EpilogueOut:
    """One launch of ``epilogue_kernel``, with its outputs and scratch allocated here.

    batch: ``inputs.Batch`` (the caller's per-token tensors, read through their strides);
    mode: ``Mode.of(cfg, ...)``; params: ``params_tensor(cfg, ...)``.
    logprobs, entropy: [B, T] or [N] per-token values (the forward kernel's outputs viewed in
    the batch's layout, or the caller's tensors for the log-prob API); logprobs=None: counts
    only (the on-policy pre-pass, whose coefficients do not depend on the log-probs).
    stats: [N, 2] row statistics (from_logits: checked for finiteness when validating).
    counter: a zeroed int32 slot (the last-program ticket), used once.
    """
    launch = EpilogueLaunch(batch, mode, has_lp=logprobs is not None,
                            lp_geo=small_geometry(logprobs), has_ent=entropy is not None,
                            ent_geo=small_geometry(entropy), from_logits=from_logits,
                            validate=validate)
    cdtype, device = batch.compute_dtype, batch.device
    ws = torch.empty(launch.ws_size, dtype=cdtype, device=device)
    sums = torch.empty(launch.sums_size, dtype=cdtype, device=device) if launch.sums_size \
        else None
    part_errs = torch.empty(launch.part_errs_size, dtype=torch.int32, device=device)
    out = new_epilogue_out(launch.num_seqs, cdtype, device)
    return launch(batch, params, counter, out, ws, sums, part_errs, logprobs=logprobs,
                  entropy=entropy, stats=stats)


def new_epilogue_out(num_seqs: int, dtype: torch.dtype, device) -> EpilogueOut:
    """Fresh (uninitialized) outputs of one epilogue launch for max(B, 1) = num_seqs."""
    return EpilogueOut(loss=torch.empty((), dtype=dtype, device=device),
                       metrics=torch.empty(len(METRICS), dtype=dtype, device=device),
                       coef=torch.empty((num_seqs, 2), dtype=dtype, device=device),
                       scal=torch.empty(2, dtype=dtype, device=device),
                       errs=torch.empty(NUM_ERR, dtype=torch.int32, device=device))
