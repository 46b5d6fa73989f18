"""Workspace access and group reductions for phase 2 of the epilogue (one program).

A sequence's group is s // K (group_size = K) or group_ids[s]. Group statistics are reductions
over [BLOCK, BLOCK] tiles of "same group" pairs of sequences, restricted to the non-empty
members: within the groups that overlap the block for group_size, over all B for group_ids."""

import triton
import triton.language as tl

from .layout import W_COUNT


@triton.jit
def _ws(ws_ptr, B, row, s, s_in):
    """Row `row` of the [NUM_WS, B] workspace at sequences s (0 outside [0, B)). Loads bypass
    L1 (.cg): phase-1 sums were written by other programs."""
    return tl.load(ws_ptr + row * B + s, mask=s_in, other=0.0, cache_modifier=".cg")


@triton.jit
def _gid(s, s_in, gid_ptr, gid_st, K, HAS_IDS: tl.constexpr):
    """Group id of sequences s: s // K (group_size) or group_ids[s]."""
    if HAS_IDS:
        return tl.load(gid_ptr + s.to(tl.int64) * gid_st, mask=s_in, other=-1).to(tl.int64)
    return (s // K).to(tl.int64)


@triton.jit
def _j_range(i0, B, K, BLOCK: tl.constexpr, HAS_IDS: tl.constexpr):
    """[lo, hi) of the sequences that can share a group with one of i0 .. i0 + BLOCK − 1."""
    if HAS_IDS:
        return 0, B
    last = tl.minimum(i0 + BLOCK, B) - 1
    return (i0 // K) * K, tl.minimum(B, (last // K + 1) * K)


@triton.jit
def _group_tile(ws_ptr, B, i, gi, j0, gid_ptr, gid_st, K, HAS_IDS: tl.constexpr,
                BLOCK: tl.constexpr):
    """(same [BLOCK, BLOCK], j [BLOCK], j_in): same[a, c] = sequence j[c] is a non-empty member
    of sequence i[a]'s group."""
    j = j0 + tl.arange(0, BLOCK)
    j_in = j < B
    gj = _gid(j, j_in, gid_ptr, gid_st, K, HAS_IDS)
    valid_j = _ws(ws_ptr, B, W_COUNT, j, j_in) > 0
    same = (gi[:, None] == gj[None, :]) & (valid_j & j_in)[None, :]
    return same, j, j_in


@triton.jit
def _group_sum(ws_ptr, B, row, i0, gid_ptr, gid_st, K, ACC: tl.constexpr,
               HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    """Σ over the non-empty members j of each sequence i's group of ws[row, j] (i in block)."""
    i = i0 + tl.arange(0, BLOCK)
    gi = _gid(i, i < B, gid_ptr, gid_st, K, HAS_IDS)
    lo, hi = _j_range(i0, B, K, BLOCK, HAS_IDS)
    acc = tl.zeros([BLOCK], ACC)
    for j0 in range(lo, hi, BLOCK):
        same, j, j_in = _group_tile(ws_ptr, B, i, gi, j0, gid_ptr, gid_st, K, HAS_IDS, BLOCK)
        x = _ws(ws_ptr, B, row, j, j_in)
        acc += tl.sum(tl.where(same, x[None, :], 0.0), 1)
    return acc


@triton.jit
def _group_max(ws_ptr, B, row, i0, gid_ptr, gid_st, K, ACC: tl.constexpr,
               HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    i = i0 + tl.arange(0, BLOCK)
    gi = _gid(i, i < B, gid_ptr, gid_st, K, HAS_IDS)
    lo, hi = _j_range(i0, B, K, BLOCK, HAS_IDS)
    acc = tl.full([BLOCK], float("-inf"), ACC)
    for j0 in range(lo, hi, BLOCK):
        same, j, j_in = _group_tile(ws_ptr, B, i, gi, j0, gid_ptr, gid_st, K, HAS_IDS, BLOCK)
        x = _ws(ws_ptr, B, row, j, j_in)
        acc = tl.maximum(acc, tl.max(tl.where(same, x[None, :], float("-inf")), 1))
    return acc


@triton.jit
def _group_lse(ws_ptr, B, row, i0, gid_ptr, gid_st, K, ACC: tl.constexpr,
               HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    """logsumexp over each sequence's group (non-empty members) of ws[row, ·]: two sweeps, the
    group max first, so no exp overflows."""
    m = _group_max(ws_ptr, B, row, i0, gid_ptr, gid_st, K, ACC, HAS_IDS, BLOCK)
    m = tl.where(m == float("-inf"), 0.0, m)
    i = i0 + tl.arange(0, BLOCK)
    gi = _gid(i, i < B, gid_ptr, gid_st, K, HAS_IDS)
    lo, hi = _j_range(i0, B, K, BLOCK, HAS_IDS)
    total = tl.zeros([BLOCK], ACC)
    for j0 in range(lo, hi, BLOCK):
        same, j, j_in = _group_tile(ws_ptr, B, i, gi, j0, gid_ptr, gid_st, K, HAS_IDS, BLOCK)
        x = _ws(ws_ptr, B, row, j, j_in)
        total += tl.sum(tl.exp(tl.where(same, x[None, :] - m[:, None], float("-inf"))), 1)
    return m + tl.log(tl.where(total > 0, total, 1.0))  # an empty group (not used): m


@triton.jit
def _clamp(x, c):
    return tl.minimum(tl.maximum(x, -c), c)


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)
