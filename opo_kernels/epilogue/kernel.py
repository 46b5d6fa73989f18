"""The epilogue kernel and its launcher (the package docstring says what it computes)."""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple

import torch
import triton
import triton.language as tl

from ..utils import cdiv
from .finish import _finish
from .layout import ERRORS, LEVEL, METRICS, NONFINITE_LOSS, WEIGHTS
from .sums import _phase1_packed, _phase1_padded

# where the log-probs, entropy, statistics, scratch and outputs start in the tensors passed
# for them, in units of 4 elements (see row_kernels._AT_ARGS: the call plan passes its one
# float and one int workspace for all of them)
_AT_ARGS = ["lp_at", "ent_at", "stats_at", "ws_at", "sums_at", "metrics_at", "coef_at",
            "scal_at", "part_errs_at", "counter_at", "errs_at"]


# mode flags are runtime ints (uniform branches), not constexprs: one compiled variant serves
# every option combination (the option grid would otherwise compile hundreds of variants)
@triton.jit(do_not_specialize=["B", "T", "N", "K", "lp_sb", "ref_sb", "ent_sb", "sel_sb",
                               "lab_sb", "num_chunks", "chunk_len", "ON_POLICY", "LEVEL",
                               "RATIO", "WEIGHTS", "CENTER", "ADAPTIVE", "SCALE_REWARDS",
                               "ENT_IN_LOSS", "BONUS", "VALIDATE"] + _AT_ARGS)
def epilogue_kernel(
    lp_ptr, lp_sb, lp_st, ref_ptr, ref_sb, ref_st, ent_ptr, ent_sb, ent_st,
    sel_ptr, sel_sb, sel_st, labels_ptr, lab_sb, lab_st, stats_ptr,
    rewards_ptr, r_st, gid_ptr, gid_st, weights_ptr, w_st, params_ptr,
    ws_ptr, sums_ptr, part_errs_ptr, counter_ptr,
    loss_ptr, metrics_ptr, coef_ptr, scal_ptr, errs_ptr,
    lp_at, ent_at, stats_at, ws_at, sums_at, metrics_at, coef_at, scal_at,
    part_errs_at, counter_at, errs_at,
    B, T, N, V, K, num_chunks, chunk_len,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LP: tl.constexpr,
    HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, ENT_IN_LOSS, BONUS,
    FROM_LOGITS: tl.constexpr,
    ON_POLICY, LEVEL, RATIO, WEIGHTS,
    CENTER, ADAPTIVE, SCALE_REWARDS,
    HAS_IDS: tl.constexpr, VALIDATE, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr,
    NUM_ERR: tl.constexpr, NUM_PROG_BLOCK: tl.constexpr,
):
    """See the module docstring. Per-token tensors are read through (stride over sequences,
    stride over tokens); packed tensors have stride 0 over sequences and T = N.

    Program pid = block · num_chunks + chunk sums the tokens [chunk · chunk_len, + chunk_len)
    (positions t of [B, T], or rows of the packed [N]) of sequences [block · BLOCK_S, +
    BLOCK_S) into its slice of sums [num_chunks, 8, B] (the workspace itself when num_chunks
    is 1); the last program adds the slices up in chunk order. Splitting the tokens keeps each
    program's serial loop short: a whole packed scan of N = 16384 rows was 128 dependent
    iterations in one program. lp_at ... errs_at: see ``_AT_ARGS``."""
    lp_ptr += 4 * lp_at
    ent_ptr += 4 * ent_at
    stats_ptr += 4 * stats_at
    ws_ptr += 4 * ws_at
    sums_ptr += 4 * sums_at
    metrics_ptr += 4 * metrics_at
    coef_ptr += 4 * coef_at
    scal_ptr += 4 * scal_at
    part_errs_ptr += 4 * part_errs_at
    counter_ptr += 4 * counter_at
    errs_ptr += 4 * errs_at
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    block = pid // num_chunks
    chunk = pid - block * num_chunks
    lo = chunk * chunk_len
    sums_ptr += chunk * (8 * B)
    errs = tl.zeros([NUM_ERR], tl.int32)
    inv_temperature = tl.load(params_ptr + 11).to(ACC)
    if PACKED:
        errs = _phase1_packed(
            block * BLOCK_S, lo, tl.minimum(lo + chunk_len, N), B, N, V, sums_ptr, errs,
            block == 0,
            lp_ptr, lp_st, ref_ptr, ref_st, ent_ptr, ent_st, sel_ptr, sel_st, labels_ptr,
            lab_st, stats_ptr, inv_temperature,
            HAS_LP, HAS_REF, HAS_ENT, FROM_LOGITS, ON_POLICY, RATIO, VALIDATE, ACC, BLOCK_S,
            BLOCK_T, NUM_ERR)
    else:
        errs = _phase1_padded(
            block * BLOCK_S, lo, tl.minimum(lo + chunk_len, T), B, T, V, sums_ptr, errs,
            lp_ptr, lp_sb, lp_st, ref_ptr, ref_sb, ref_st, ent_ptr, ent_sb, ent_st,
            sel_ptr, sel_sb, sel_st, labels_ptr, lab_sb, lab_st, stats_ptr, inv_temperature,
            HAS_MASK, HAS_LP, HAS_REF, HAS_ENT, FROM_LOGITS, ON_POLICY, RATIO, VALIDATE, ACC,
            BLOCK_S, BLOCK_T, NUM_ERR)
    if VALIDATE:
        tl.store(part_errs_ptr + pid * NUM_ERR + tl.arange(0, NUM_ERR), errs)
    # every store of this program is made before its ticket is taken (release); the program
    # that draws the last ticket sees all of them (acquire) and finishes the job
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == num_programs - 1:
        tl.debug_barrier()
        if num_chunks > 1:
            _add_chunks(sums_ptr - chunk * (8 * B), ws_ptr, B, num_chunks, ACC, BLOCK)
            tl.debug_barrier()
        _finish(B, V, ws_ptr, params_ptr, rewards_ptr, r_st, gid_ptr, gid_st, K, weights_ptr,
                w_st, loss_ptr, metrics_ptr, coef_ptr, scal_ptr, errs_ptr, part_errs_ptr,
                num_programs, LEVEL, RATIO, WEIGHTS, CENTER, ADAPTIVE, SCALE_REWARDS, HAS_IDS,
                HAS_ENT, ENT_IN_LOSS, BONUS, VALIDATE, ACC, BLOCK, NUM_ERR, NUM_PROG_BLOCK)


@triton.jit
def _add_chunks(sums_ptr, ws_ptr, B, num_chunks, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """ws rows 0..7 = Σ over chunks of sums [num_chunks, 8, B], in chunk order (a fixed order:
    the result does not depend on which program finished last). Loads bypass L1: the other
    programs wrote the slices."""
    CHUNKS: tl.constexpr = 16
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_in = i < B
        for row in tl.static_range(8):
            acc = tl.zeros([BLOCK], ACC)
            for c0 in range(0, num_chunks, CHUNKS):
                c = c0 + tl.arange(0, CHUNKS)
                part = tl.load(sums_ptr + (c[:, None] * 8 + row) * B + i[None, :],
                               mask=(c < num_chunks)[:, None] & i_in[None, :], other=0.0,
                               cache_modifier=".cg")
                acc += tl.sum(part, 0)
            tl.store(ws_ptr + row * B + i, acc, mask=i_in)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

_PARAMS_CACHE: Dict[tuple, torch.Tensor] = {}


def params_tensor(cfg, device, dtype) -> torch.Tensor:
    """The float hyperparameters (``PARAMS`` order, then 1/temperature) as a device tensor the
    kernels read: eager calls reuse one cached tensor per value set (no device op after the
    first call, so a captured CUDA graph replays with no host copy); under torch.compile the
    values may be symbolic and the tensor is part of the graph (changing α does not
    recompile)."""
    values = (cfg.alpha, cfg.mu, cfg.tau, cfg.tau_range[0], cfg.tau_range[1],
              cfg.reward_temperature, cfg.entropy_coef, _or_inf(cfg, "delta_clip"),
              _or_inf(cfg, "score_clip"), getattr(cfg, "direction_scale", 1.0),
              getattr(cfg, "logit_reg_coef", 0.0), 1.0 / cfg.temperature)
    if torch.compiler.is_compiling():
        # Each value times a tensor: Inductor turns a symbolic float used so into a graph input
        # (tensorify), while torch.tensor([...symbolic floats]) made it specialize on the value
        # and recompile whenever α, μ or τ changed (seen on Inductor, CPU and CUDA).
        one = torch.ones((), dtype=dtype, device=device)
        return torch.stack([one * v for v in values])
    key = (values, str(device), dtype)
    cached = _PARAMS_CACHE.get(key)
    if cached is None:
        if len(_PARAMS_CACHE) > 256:
            _PARAMS_CACHE.clear()
        cached = _PARAMS_CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
    return cached


def _or_inf(cfg, name: str) -> float:
    value = getattr(cfg, name, None)
    return math.inf if value is None else value


class EpilogueOut(NamedTuple):
    """loss: 0-dim; metrics: [8] (``METRICS`` order; entropy_mean only when known);
    coef: [B, 2] per-sequence (a_s, z_s); scal: [2] = (b, ∂L/∂H_t), all per unit upstream
    gradient; errs: [NUM_ERR] int32 value-check counts (``ERRORS`` order; only when validating).
    (A NamedTuple: made on every call, and cheaper to make than a dataclass.)
    """

    loss: torch.Tensor
    metrics: torch.Tensor
    coef: torch.Tensor
    scal: torch.Tensor
    errs: torch.Tensor


class Mode(NamedTuple):
    """The options the epilogue branches on, as ints (they travel through torch.library custom
    ops as an int list): level code, ratio coordinates, weights code, center, adaptive τ,
    scale_rewards="group", entropy bonus (β > 0)."""

    level: int
    ratio: int
    weights: int
    center: int
    adaptive: int
    scale_rewards: int
    bonus: int

    @classmethod
    def of(cls, cfg, has_weights: bool) -> Mode:
        return cls(LEVEL[cfg.level], int(cfg.coordinates == "ratio"),
                   WEIGHTS["tensor" if has_weights else cfg.weights], int(cfg.center_weights),
                   int(cfg.adaptive_tau), int(getattr(cfg, "scale_rewards", "none") == "group"),
                   int(cfg.entropy_coef > 0))


# Tokens per program in phase 1: ITERS iterations of BLOCK_T, so that the longest serial chain
# of loads is ITERS round trips to memory; at most MAX_CHUNKS slices (what the last program
# adds up), the chunks growing beyond that (T > MAX_CHUNKS · ITERS · BLOCK_T).
_ITERS = 8
_MAX_CHUNKS = 64


def _chunks(T: int, block_t: int) -> tuple:
    """(chunk_len, num_chunks) of the T positions (padded) or N rows (packed) of phase 1."""
    per_chunk = block_t * max(_ITERS, cdiv(cdiv(T, _MAX_CHUNKS), block_t))
    return per_chunk, max(cdiv(T, per_chunk), 1)


def metric_keys(with_entropy: bool) -> List[str]:
    return list(METRICS if with_entropy else METRICS[:-1])


def unpack_metrics(metrics: torch.Tensor, with_entropy: bool) -> Dict[str, torch.Tensor]:
    """The [8] metrics vector as a dict of 0-dim views (no device op)."""
    return dict(zip(metric_keys(with_entropy), metrics.unbind(0)))


_MESSAGES = {
    "labels": "counted label(s) outside [0, V) (the vocabulary size V = {vocab})",
    "seq_ids": "seq_ids value(s) outside [-1, B={num_seqs})",
    "rewards": "non-finite rewards",
    "ref_logprobs": "non-finite ref_logprobs on counted tokens",
    "logits": "counted row(s) of logits with a non-finite value (NaN/+inf, or -inf at the label)",
    "weights": "non-finite values in the weights tensor",
    "mask": "mask value(s) other than 0/1",
    "logprobs": "non-finite logprobs on counted tokens",
    "entropy": "non-finite entropy on counted tokens",
}


def raise_bad_values(errs: torch.Tensor, batch, explain=None) -> None:
    """Reads the value-check counts (the one host sync of validate=True) and raises a
    ValueError naming the first bad argument (seq_ids first: a bad one makes every other index
    wrong). explain(name, count): an op's own message for that argument, or None for the
    default (the fused-linear op names hidden, weight or bias where the logits are
    non-finite)."""
    counts = dict(zip(ERRORS, errs[:len(ERRORS)].tolist()))
    found = [name for name in ("seq_ids",) + ERRORS if counts[name]]
    if found:
        name = found[0]
        message = None if explain is None else explain(name, counts[name])
        if message is not None:
            raise ValueError(message)
        if name == "loss":  # no argument to name: what overflowed, and what bounds it
            raise ValueError(NONFINITE_LOSS)
        message = _MESSAGES[name].format(vocab=batch.vocab, num_seqs=batch.num_seqs)
        raise ValueError(f"{name}: {counts[name]} {message}")
