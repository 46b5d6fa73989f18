"""Vocabulary-parallel logits (tensor parallelism: docs/integrations.md; the loss: docs/spec.md).

Each rank of a torch.distributed process group holds a contiguous slice [vocab_start,
vocab_start + V_local) of the vocabulary: logits [..., V_local] (Megatron's column-parallel LM
head, torchtitan's ``Shard(-1)`` loss parallel). Per call, with N token rows:

  1. the forward row kernel reads the local slice once and writes per-row partials
     (x_max, the label's logit or −inf when another rank holds it, Σ_{j≠label} e^{(x−x_max)/t},
     and the entropy's Σ e·(x − x_max)/t);
  2. ``tp_combine.combine_partials``: ONE all-gather of the [N, 4] partials (16 bytes per
     row and rank in fp32, 32 for fp64 logits; never O(N·V)) and one kernel that combines
     them: every rank then has the exact row statistics, log-probs and entropies of the whole
     vocabulary, bitwise the same on every rank;
  3. the epilogue runs replicated (same inputs on every rank -> the same loss, metrics and
     coefficients, deterministically);
  4. backward is local: each rank writes the gradient of its own slice.

Checks (``check_layout``, with validate=True): every rank's arguments, slice and N are
gathered with one ``all_gather_object``, so that a bad input on ONE rank raises the same error
on EVERY rank instead of leaving the others waiting in a collective. The same gather carries a
fingerprint of the replicated arguments (labels, mask / seq_ids, ref_logprobs, rewards,
group_ids, weights; the counted rows of fused-linear's hidden states too) and the options
(``replicated_summary``): each rank computes the loss from its own copy, so a copy that differs
on one rank would give the ranks different losses and coefficients without any error.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

# group -> {(V_local, this rank's first id): (V_global, the widest rank's V_local)}: layouts
# already checked. Weakly keyed, so a destroyed group's entries go with it (an id() key could
# be reused by a new group).
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layouts_of(group) -> dict:
    group = group if group is not None else dist.group.WORLD
    try:
        return _LAYOUTS.setdefault(group, {})
    except TypeError:  # a group object without weak references: do not cache
        return {}


def rank_in_group(group) -> int:
    """This process's rank in ``group``, which must be a process group it belongs to (raised
    locally: a wrong object, or a group without this rank, has no collective to share the error
    with). ``dist.new_group`` gives the processes outside the group a marker instead of a
    group."""
    process_group_type = getattr(dist, "ProcessGroup", None)
    outside = group is getattr(dist.GroupMember, "NON_GROUP_MEMBER", object())
    if not outside and process_group_type is not None \
            and not isinstance(group, process_group_type):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"dist.new_group(...) or a DeviceMesh's get_group()), got "
                        f"{type(group).__name__}")
    rank = -1 if outside else dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"process_group: this process (global rank {dist.get_rank()}) is not "
                         "a member of it; call the loss with a group of the ranks that hold "
                         "the vocabulary slices, on those ranks only")
    return rank


def check_layout(group, vocab_local: int, vocab_start: Optional[int], num_rows: int,
                 error: Optional[BaseException], validate: bool,
                 replicated: Optional[dict] = None) -> Tuple[int, int, int]:
    """(vocab_start of this rank, global vocabulary size V, the widest rank's V_local).

    vocab_start None: equal slices, rank r starts at r·V_local. With validate=True (or the
    first time a layout is seen) every rank's (error, vocab_start, V_local, N, replicated) is
    gathered and checked: slices must tile [0, V) in rank order, N must agree, and so must
    ``replicated`` ({name: summary}, see ``replicated_summary``; None = not compared); any
    problem raises the same ValueError on every rank (a rank whose own arguments failed
    re-raises its error).
    """
    # every path to a collective of these checks comes here first, the group checked once
    rank, world = rank_in_group(group), dist.get_world_size(group)
    start = rank * vocab_local if vocab_start is None else vocab_start
    # the slice as resolved: vocab_start=None on one rank and its value spelled out on another
    # are one layout (keyed as passed, the two ranks would disagree on whether to gather)
    key, known = (vocab_local, start), _layouts_of(group)
    if not validate:  # trusted inputs: no agreement step once the layout is known
        if error is not None:
            try:  # (see below)
                raise error
            finally:
                error = None
        if key in known:
            return (start, *known[key])
    info = [None] * world
    message = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(info, (message, start, vocab_local, num_rows, replicated,
                                  bool(validate)), group=group)
    failed = [(r, m) for r, (m, *_) in enumerate(info) if m is not None]
    if error is not None:
        # cleared as it leaves: a frame in the traceback holding the exception is a cycle that
        # keeps the frames (and the process group in them) alive until a garbage collection,
        # which may come at interpreter exit, after destroy_process_group, where freeing the
        # group aborts the process ("terminate called without an active exception")
        try:
            raise error
        finally:
            error = None
    if failed:
        r, m = failed[0]
        raise ValueError(f"rank {r} of the process group failed its input checks ({m}); "
                         "every rank stops with it")
    checks = [i[5] for i in info]
    if len(set(checks)) != 1:  # once the layout is known, validate=False skips this gather
        raise ValueError(f"validate is not the same on every rank of the process group (by "
                         f"rank: {checks}): the ranks with validate=False skip the agreement "
                         "step once the layout is known, so the ranks' collectives would not "
                         "pair up; pass the same validate everywhere")
    starts = [i[1] for i in info]
    sizes = [i[2] for i in info]
    rows = [i[3] for i in info]
    if len(set(rows)) != 1:
        raise ValueError(f"the ranks' logits hold different numbers of token rows N: "
                         f"{rows} (rank order); every rank must pass the same tokens")
    expected = 0
    for r, (s, v) in enumerate(zip(starts, sizes)):
        if s != expected:
            raise ValueError(
                f"vocab_start of rank {r} is {s} but the slices before it end at {expected}: "
                f"slices (vocab_start, V_local) by rank = {list(zip(starts, sizes))} must "
                "tile the vocabulary contiguously in rank order")
        expected = s + v
    _check_replicated([i[4] for i in info])
    known[key] = (expected, max(sizes))
    return (start, *known[key])


def _check_replicated(summaries) -> None:
    """Every rank's ``replicated_summary`` must be rank 0's (None: a caller without one).
    Names present on one side only count too: a tensor passed on one rank and None on another
    (ref_logprobs: off-policy there, on-policy here) is a difference."""
    if any(s is None for s in summaries):
        return
    first = summaries[0]
    for r, summary in enumerate(summaries[1:], 1):
        for name in [*first, *(n for n in summary if n not in first)]:
            if summary.get(name) != first.get(name):
                raise ValueError(
                    f"{name} is not the same on every rank of the process group (rank 0: "
                    f"{first.get(name)}; rank {r}: {summary.get(name)}): every argument but the "
                    "vocabulary slice (logits, or weight and bias) and every option must be "
                    "identical on every rank, whose epilogue computes the loss from its own "
                    "copy")


# The fingerprint's mixing constants (splitmix64's), as signed int64: each element's bits and
# position go through a bijection of 64-bit integers, so that two inputs differing in one
# element always differ in that element's term, and the terms, summed modulo 2^64, differ
# unless a whole other term happens to cancel the change (chance 2^-64).
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
# Elements hashed per step: the int64 temporaries stay ~32 MB each whatever the tensor (the
# fused-linear hidden states' counted rows are M x H, e.g. 67M elements at M = 16384,
# H = 4096).
_HASH_CHUNK = 1 << 22
# Fields of OPOLossConfig that only affect this rank's own work (not the replicated loss).
_LOCAL_OPTIONS = ("backend", "return_metrics", "inplace_backward", "followed", "weights")


def _slices(t: torch.Tensor, offset: int = 0):
    """(slice, flat offset of its first element) covering t in row-major order, each of at most
    ``_HASH_CHUNK`` elements (or one 1-D row): whole rows of the first dimension when a row is
    small, else each row split the same way (a [B, T, H] with T·H above the chunk)."""
    if t.dim() <= 1 or t.numel() <= _HASH_CHUNK:
        yield t, offset
        return
    per_row = t[0].numel()
    step = _HASH_CHUNK // per_row
    if step:
        for row in range(0, t.shape[0], step):
            yield t[row:row + step], offset + row * per_row
    else:
        for row in range(t.shape[0]):
            yield from _slices(t[row], offset + row * per_row)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits as unsigned 64-bit integers (torch shifts int64 arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Σ_i mix(bits_i + i·G) mod 2^64 over the row-major elements (i from 1; bits: the
    element's bit pattern, sign-extended to 64; mix: splitmix64's finalizer, a bijection): a
    0-dim int64 on the tensor's device, summed over ``_slices`` (int64 temporaries of a slice,
    and a strided view copied one slice at a time, never whole). Integer arithmetic that
    wraps, so every device and every summation order gives the same number."""
    total = torch.zeros((), dtype=torch.int64, device=tensor.device)
    for part, offset in _slices(tensor.detach()):
        flat = part.reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.long()
        elif flat.is_floating_point():  # bit patterns: exact, whatever the values
            flat = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        x = torch.arange(offset + 1, offset + flat.numel() + 1, device=flat.device,
                         dtype=torch.int64)
        x.mul_(_GOLDEN).add_(flat.long())
        x.bitwise_xor_(_shift_right(x, 30)).mul_(_MIX1)
        x.bitwise_xor_(_shift_right(x, 27)).mul_(_MIX2)
        x.bitwise_xor_(_shift_right(x, 31))
        total += x.sum()
    return total


def fingerprints(tensors: dict) -> dict:
    """{name: "shape [..], fingerprint h"} of device tensors, with ONE host sync: the hash is a
    sum of mixed (bit pattern, position) terms modulo 2^64 (``_fingerprint``: integer
    arithmetic, so every device and every reduction order gives the same number)."""
    names = [n for n, t in tensors.items() if t is not None]
    hashes = [_fingerprint(tensors[name]) for name in names]
    values = torch.stack(hashes).tolist() if hashes else []
    return {n: f"shape {list(tensors[n].shape)}, fingerprint {h}" for n, h in zip(names, values)}


def replicated_summary(batch, cfg, agree: Optional[dict] = None,
                       agree_tensors: Optional[dict] = None) -> dict:
    """What must be identical on every rank, in a form ``all_gather_object`` can carry: the
    options that shape the loss, ``agree`` (the op's own host-side arguments, e.g. the
    fused-linear chunk size and logits budget, whose chunks each run collectives), the group
    layout, and ``fingerprints`` of the replicated tensors of ``batch`` (an ``inputs.Batch``)
    and of ``agree_tensors`` (the op's own replicated tensors, e.g. the counted rows of the
    fused-linear hidden states; labels and ref_logprobs on counted tokens only). One host
    sync (validate=True only)."""
    summary = {f"option {f.name}": repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if f.name not in _LOCAL_OPTIONS}
    summary.update({name: repr(value) for name, value in (agree or {}).items()})
    summary["group_size"] = repr(batch.group_size)
    # labels and ref_logprobs of tokens not counted are never read (docs/spec.md): -100 on one
    # rank and 0 on another is no difference
    counted = batch.counted.view(batch.labels.shape)
    labels = torch.where(counted, batch.labels, 0)
    ref = (None if batch.ref_logprobs is None
           else torch.where(counted, batch.ref_logprobs, 0.0))
    # the mask by its values (a mask's dtype is the caller's choice: a bool mask on one rank
    # and a 0/1 float or integer one on another select the same tokens); float64 holds every
    # value a mask may have exactly but int64 beyond 2^53, which is not 0/1 either way
    mask = None if batch.mask is None else batch.mask.to(torch.float64) + 0.0  # (-0.0 -> 0.0)
    summary.update(fingerprints({  # (the mask first: it decides which labels are compared)
        "mask": mask, "seq_ids": batch.seq_ids, "labels": labels,
        "ref_logprobs": ref, "rewards": batch.rewards,
        "group_ids": batch.group_ids, "weights": batch.weights, **(agree_tensors or {})}))
    if isinstance(cfg.weights, str):  # (a tensor is fingerprinted above, under the same name)
        summary["weights"] = repr(cfg.weights)
    return summary


def prepare_together(group, prepare: Callable, vocab_local: int, vocab_start, cfg,
                     agree: Optional[dict] = None,
                     agree_tensors: Optional[Callable[[], dict]] = None):
    """(batch, this rank's vocab_start, the widest rank's V_local): ``prepare()`` (the
    call's own input checks, returning an ``inputs.Batch``) on this rank, ``vocab_start``
    checked, then ``check_layout``'s agreement, so that an error on ONE rank raises on EVERY
    rank (with cfg.validate, also a replicated argument, option or ``agree`` value that
    differs between ranks); the batch gets the global vocabulary size. ``agree_tensors``: a
    function returning {name: tensor} replicated beyond the batch's, fingerprinted with it
    (under a name of the batch's, in its place); called after ``prepare()``, so that it can
    return tensors that prepare() derives."""
    validate = cfg.validate
    # any error of this rank's own work (a bad argument, or e.g. out of memory in the
    # fingerprints) is shared: the other ranks would otherwise wait in the gather
    try:
        if vocab_start is not None and (isinstance(vocab_start, bool) or
                                        not isinstance(vocab_start, int) or vocab_start < 0):
            raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
        batch = prepare()
        replicated = None
        if validate:
            replicated = replicated_summary(batch, cfg, agree,
                                            None if agree_tensors is None else agree_tensors())
    except Exception as err:  # (`err` is deleted when this block is left)
        check_layout(group, vocab_local, vocab_start, -1, err, validate)
        raise  # check_layout re-raised err; not reached
    start, vocab, widest = check_layout(group, vocab_local, vocab_start, batch.num_rows, None,
                                        validate, replicated)
    return dataclasses.replace(batch, vocab=vocab), start, widest


def config_or_fail_together(group, make_config):
    """``make_config()`` (an ``OPOLossConfig``, or anything that validates the options); with a
    process group, an option error on one rank is first shared through the same agreement
    step as ``check_layout`` so that every rank raises instead of the others waiting in a
    collective (the options cannot say validate=False yet, so the agreement always runs; with
    validate=False on the other ranks and their layout known, they do not wait for it: such a
    caller promises identical options)."""
    try:
        return make_config()
    except Exception as err:
        if group is None:
            raise
        check_layout(group, 0, None, -1, err, validate=True)
        raise  # check_layout re-raises err; kept for clarity
