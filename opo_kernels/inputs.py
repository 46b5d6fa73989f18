"""Turns either input layout into one flat token view, and checks the inputs (docs/spec.md "Inputs",
"Bad input").

Both backends call ``prepare`` (shape, dtype and device checks: free, no host sync) and then
``check_values`` (the data-dependent checks: one host sync, skipped with ``validate=False``).
Logits are never copied or reshaped here: the fused kernels read them through their strides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .config import OPOLossConfig
from .utils import host_int, use_triton

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Batch:
    """The inputs of one loss call, checked, as the caller passed them (no copy, no device op:
    the fused kernels read every tensor through its strides), plus flattened views derived on
    first use with torch ops (for the reference and the value checks).

    As passed (B sequences; padded: [B, T] rows, packed: [N] rows):
    logits:        [B, T, V] or [N, V] (a strided view is fine), or None (log-prob API).
    labels:        [B, T] or [N], any integer dtype; None for the log-prob API.
    logprobs:      [B, T] or [N] per-token log-probs (log-prob API only, else None).
    entropy:       [B, T] or [N] per-token entropy (log-prob API only, optional).
    ref_logprobs:  [B, T] or [N] float, detached, or None (on-policy: π_ref = the detached
                   current policy).
    mask:          [B, T] bool or 0/1 (padded layout) or None.
    seq_ids:       [N] int, −1 = not counted (packed layout) or None.
    rewards:       [B], detached, any float dtype as the caller passed it (the kernels cast on
                   load: no device op; the reference casts to the compute dtype).
    group_size:    int (consecutive groups) or None; group_ids: [B] int or None.
    weights:       [B] caller-given ω (detached, any float dtype, like rewards) or None.
    vocab:         V (the global vocabulary: the τ rule's log V).
    seq_len:       T for the padded layout (row r belongs to sequence r // T), else None.
    compute_dtype: float32, or float64 for float64 inputs.
    """

    logits: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    seq_ids: Optional[torch.Tensor]
    rewards: torch.Tensor
    group_size: Optional[int]
    group_ids: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]
    vocab: int
    seq_len: Optional[int]
    num_rows: int
    compute_dtype: torch.dtype
    logprobs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None

    @property
    def num_seqs(self) -> int:
        return self.rewards.shape[0]

    @property
    def device(self) -> torch.device:
        return self.rewards.device

    # ---- flattened views (torch ops; the reference and the checks use them) ----
    # Computed anew at each use (no caching: a cached tensor set inside an autograd.Function
    # under torch.compile would leak out of the traced subgraph).
    @property
    def seq(self) -> torch.Tensor:
        """[N] int64: the token's sequence in [0, B), or −1 when it is not counted."""
        if self.seq_ids is not None:
            return self.seq_ids.reshape(-1).long()
        rows = torch.arange(self.num_rows, device=self.device) // max(self.seq_len, 1)
        return rows if self.mask is None else torch.where(self.mask.reshape(-1) != 0, rows, -1)

    @property
    def group(self) -> torch.Tensor:
        """[B] int64: the sequence's group as a bucket index in [0, B)."""
        if self.group_size is not None:
            return torch.arange(self.num_seqs, device=self.device) // self.group_size
        return _group_buckets(self.group_ids)

    @property
    def counted(self) -> torch.Tensor:
        return self.seq >= 0

    @property
    def flat_labels(self) -> torch.Tensor:
        return self.labels.reshape(-1).long()

    @property
    def flat_ref(self) -> Optional[torch.Tensor]:
        if self.ref_logprobs is None:
            return None
        return self.ref_logprobs.reshape(-1).to(self.compute_dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in float32 (docs/spec.md), or float64 for float64 logits (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


# what a mask may be (the kernels read it as it is): bool, the integer dtypes Triton loads,
# and the float dtypes of FLOAT_DTYPES
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               *[getattr(torch, f"uint{n}") for n in (16, 32, 64) if hasattr(torch, f"uint{n}")],
               *FLOAT_DTYPES)


def check_tensor(name: str, value, *, kind: str) -> torch.Tensor:
    """value, checked to be a tensor of `kind`: "float", "int", "mask" (MASK_DTYPES), "any", or
    "stream" (one of FLOAT_DTYPES, which the kernels read: logits, log-probs, hidden states,
    weights)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if kind == "stream" and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, "
                        f"got {value.dtype}")
    if kind == "float" and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if kind == "int" and (value.is_floating_point() or value.is_complex()
                          or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if kind == "mask" and value.dtype not in MASK_DTYPES:
        raise TypeError(f"{name} must be a bool, integer or float tensor of 0/1, got dtype "
                        f"{value.dtype}")
    return value


def _what(src) -> str:
    """'logits [B, T, V]' for src = ("logits", tensor): called only to build an error message
    (string formatting of shapes does not trace under torch.compile)."""
    return f"{src[0]} {_shape(src[1])}"


def _same_shape(name: str, t: torch.Tensor, rows, src) -> None:
    """t must have the row shape ([B, T] or [N]) of src = (name, tensor) it comes from."""
    if tuple(t.shape) != tuple(rows):
        raise ValueError(f"{name} has shape {_shape(t)} but {_what(src)} implies {list(rows)}")


def _group_size(value) -> int:
    """group_size as a Python int: an int, a NumPy integer or a 0-dim integer tensor (read once
    on the host: a CUDA tensor costs a sync, pass an int in a tuned loop). bool is refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif (isinstance(value, torch.Tensor) and value.dim() == 0
          and not value.dtype.is_floating_point and not value.dtype.is_complex
          and value.dtype != torch.bool):
        n = int(value)
    elif type(value).__module__ == "numpy" and hasattr(value, "dtype") \
            and value.dtype.kind in "iu" and getattr(value, "ndim", 0) == 0:
        n = int(value)
    else:
        raise ValueError("group_size must be a positive integer (int, NumPy integer or 0-dim "
                         f"integer tensor), got {value!r}")
    if n < 1:
        raise ValueError(f"group_size must be a positive integer, got {value!r}")
    return n


def _group_buckets(group_ids: torch.Tensor) -> torch.Tensor:
    """Maps arbitrary group ids [B] to bucket indices in [0, B) without a host sync."""
    sorted_ids, order = torch.sort(group_ids, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    buckets_sorted = starts.long().cumsum(0) - 1
    return torch.empty_like(buckets_sorted).scatter_(0, order, buckets_sorted)


def _may_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of t may share memory: False when, its dimensions of size > 1 taken
    by increasing stride, each stride steps past everything the smaller ones span (every
    layout made by slicing, transposing or permuting a tensor passes)."""
    if t.numel() == 0:
        return False
    span = 0  # the largest offset the dimensions so far reach
    for stride, size in sorted((abs(st), s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def _read_pending(config: OPOLossConfig) -> None:
    """validation.read_pending for a validating call (imported here: validation imports the
    epilogue, which imports this module's users)."""
    if config.validate:
        from .validation import read_pending

        read_pending()


def prepare(logits, labels, ref_logprobs, rewards, *, mask=None, seq_ids=None,
            group_size=None, group_ids=None, config: OPOLossConfig) -> Batch:
    """Checks shapes, dtypes and devices of an ``opo_loss`` call (no host sync, no device op);
    a validating call first raises for an earlier deferred call's bad input (``_read_pending``).
    """
    _read_pending(config)
    logits = check_tensor("logits", logits, kind="stream")
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"logits must be [B, T, V] (padded) or [N, V] (packed), got shape {_shape(logits)}"
        )
    if logits.shape[-1] < 1:
        raise ValueError(f"logits has an empty vocabulary dimension: shape {_shape(logits)}")
    # (the torch backend does not write in place: it warns and computes)
    if config.inplace_backward and use_triton(config.backend, logits.device) \
            and _may_overlap(logits):
        raise ValueError(
            f"inplace_backward=True writes the gradient over the logits, whose elements share "
            f"memory here (shape {_shape(logits)}, strides {tuple(logits.stride())}, e.g. an "
            f"expand()): pass logits that do not, or inplace_backward=False")
    what = ("logits", logits)
    labels = check_tensor("labels", labels, kind="int")
    _same_shape("labels", labels, logits.shape[:-1], what)
    return _prepare_rows(logits.shape[:-1], what, logits.device, compute_dtype(logits.dtype),
                         logits.shape[-1], ref_logprobs, rewards, mask, seq_ids, group_size,
                         group_ids, config, logits=logits, labels=labels)


def prepare_logprobs(logprobs, ref_logprobs, rewards, *, entropy=None, vocab_size=None,
                     mask=None, seq_ids=None, group_size=None, group_ids=None,
                     config: OPOLossConfig) -> Batch:
    """Checks an ``opo_loss_from_logprobs`` call (no host sync, no device op; see ``prepare``
    for the deferred checks)."""
    _read_pending(config)
    logprobs = check_tensor("logprobs", logprobs, kind="stream")
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must be [B, T] (padded) or [N] (packed), got shape "
                         f"{_shape(logprobs)}")
    what = ("logprobs", logprobs)
    if entropy is not None:
        entropy = check_tensor("entropy", entropy, kind="float")
        _same_shape("entropy", entropy, logprobs.shape, what)
    elif config.entropy_coef > 0:
        raise ValueError("entropy_coef > 0 needs the per-token entropy: pass entropy=[B, T] "
                         "or [N] (differentiable, for the bonus's gradient)")
    elif config.compute_entropy:
        raise ValueError("compute_entropy=True reports the mean of the entropy you pass (there "
                         "are no logits here): pass entropy=[B, T] or [N], or leave "
                         "compute_entropy=False")
    if vocab_size is not None:  # an int, a NumPy integer (as group_size)
        size = host_int(vocab_size, 1)
        if size is None:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        vocab_size = size
    if vocab_size is None and config.adaptive_tau:
        raise ValueError("vocab_size is needed by the adaptive tau rule (it uses log V): pass "
                         "vocab_size=V, or adaptive_tau=False")
    if config.temperature != 1.0:
        raise ValueError("temperature applies to logits; log-probs are taken as given (compute "
                         "them at your sampling temperature), so leave temperature at 1.0")
    for name in ("inplace_backward", "grad_to_base", "vocab_parallel_one_pass"):
        if getattr(config, name):
            raise ValueError(f"{name} applies to logits only")
    batch = _prepare_rows(logprobs.shape, what, logprobs.device, compute_dtype(logprobs.dtype),
                          vocab_size or 1, ref_logprobs, rewards, mask, seq_ids, group_size,
                          group_ids, config, logprobs=logprobs, entropy=entropy)
    if entropy is not None and entropy.device != logprobs.device:
        raise ValueError(f"entropy is on {entropy.device} but logprobs is on {logprobs.device}")
    return batch


def _prepare_rows(rows, what, device, cdtype, vocab: int, ref_logprobs, rewards, mask,
                  seq_ids, group_size, group_ids, config: OPOLossConfig, **tensors) -> Batch:
    """The checks common to both entry points; ``rows`` is the row shape ([B, T] or [N]) and
    ``what`` = (name, tensor) it comes from (for messages)."""
    if ref_logprobs is not None:
        ref_logprobs = check_tensor("ref_logprobs", ref_logprobs, kind="float")
        _same_shape("ref_logprobs", ref_logprobs, rows, what)
        ref_logprobs = ref_logprobs.detach()
    rewards = check_tensor("rewards", rewards, kind="float")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {_shape(rewards)}")
    num_seqs = rewards.shape[0]

    if len(rows) == 2:
        if seq_ids is not None:
            raise ValueError(f"seq_ids is for the packed layout ([N] rows); with {_what(what)} "
                             "(padded [B, T] rows) pass mask instead")
        if rows[0] != num_seqs:
            raise ValueError(f"rewards has shape {_shape(rewards)} but {_what(what)} holds "
                             f"{rows[0]} sequences")
        seq_len = rows[1]
        if mask is not None:
            mask = check_tensor("mask", mask, kind="mask")
            _same_shape("mask", mask, rows, what)
    else:
        if mask is not None:
            raise ValueError(f"mask is for the padded layout ([B, T] rows); with {_what(what)} "
                             "(packed [N] rows) pass seq_ids instead")
        if seq_ids is None:
            raise ValueError(f"packed rows ({_what(what)}) need seq_ids [N] (sequence index, "
                             "-1 = token not counted)")
        seq_ids = check_tensor("seq_ids", seq_ids, kind="int")
        _same_shape("seq_ids", seq_ids, rows, what)
        seq_len = None

    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (int) or group_ids ([B] tensor)")
    if group_size is not None:
        group_size = _group_size(group_size)
        if num_seqs % group_size != 0:
            raise ValueError(f"group_size={group_size} does not divide the number of "
                             f"sequences B={num_seqs}")
    else:
        group_ids = check_tensor("group_ids", group_ids, kind="int")
        if tuple(group_ids.shape) != (num_seqs,):
            raise ValueError(f"group_ids must have shape [B]=[{num_seqs}] like rewards, "
                             f"got {_shape(group_ids)}")

    weights = None
    if isinstance(config.weights, torch.Tensor):
        if tuple(config.weights.shape) != (num_seqs,):
            raise ValueError(f"weights tensor must have shape [B]=[{num_seqs}], "
                             f"got {_shape(config.weights)}")
        weights = config.weights.detach()

    named = {"labels": tensors.get("labels"), "ref_logprobs": ref_logprobs, "rewards": rewards,
             "mask": mask, "seq_ids": seq_ids, "group_ids": group_ids, "weights": weights}
    for name, t in named.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but {what[0]} is on {device}")

    num_rows = rows[0] * rows[1] if len(rows) == 2 else rows[0]
    return Batch(
        logits=tensors.get("logits"), labels=tensors.get("labels"), ref_logprobs=ref_logprobs,
        mask=mask, seq_ids=seq_ids, rewards=rewards.detach(),
        group_size=group_size, group_ids=group_ids,
        weights=weights, vocab=vocab,
        seq_len=seq_len, num_rows=num_rows, compute_dtype=cdtype,
        logprobs=tensors.get("logprobs"), entropy=tensors.get("entropy"),
    )


def check_values(batch: Batch, lse: Optional[torch.Tensor], logprobs: torch.Tensor,
                 explain=None) -> None:
    """The data-dependent checks of docs/spec.md "Bad input and edge cases", with ONE host sync.

    lse, logprobs: [N] from the forward pass (any value on rows that are not counted); for the
    log-prob API lse is None and logprobs are the caller's (flattened).
    Non-finite logits are found from the per-row logsumexp (+inf or NaN anywhere in the row
    makes it non-finite) and from the label's log-prob (a −inf label logit), so no extra pass
    over [N, V] is needed. −inf logits elsewhere (a masked vocabulary) are allowed.
    explain(name, count): an op's own message for that argument, or None for the default (as
    ``epilogue.raise_bad_values`` takes it: the fused-linear op names hidden, weight or bias).
    """
    counted = batch.counted
    vocab = batch.vocab
    bad: Dict[str, torch.Tensor] = {}
    if batch.labels is not None:
        labels = batch.flat_labels
        bad["labels"] = (counted & ((labels < 0) | (labels >= vocab))).sum()
    bad["seq_ids"] = ((batch.seq >= batch.num_seqs) | (batch.seq < -1)).sum()
    bad["rewards"] = (~torch.isfinite(batch.rewards)).sum()
    if batch.ref_logprobs is not None:
        bad["ref_logprobs"] = (counted & ~torch.isfinite(batch.flat_ref)).sum()
    if lse is not None:
        bad["logits"] = (counted & ~(torch.isfinite(lse) & torch.isfinite(logprobs))).sum()
    else:
        bad["logprobs"] = (counted & ~torch.isfinite(logprobs)).sum()
        if batch.entropy is not None:
            bad["entropy"] = (counted & ~torch.isfinite(batch.entropy.reshape(-1))).sum()
    if batch.weights is not None:
        bad["weights"] = (~torch.isfinite(batch.weights)).sum()
    if batch.mask is not None:
        bad["mask"] = ((batch.mask != 0) & (batch.mask != 1)).sum()
    counts = torch.stack([v.to(torch.int64) for v in bad.values()]).tolist()  # the one sync
    found = {name: n for name, n in zip(bad, counts) if n}
    if not found:
        return
    messages = {
        # the same words as the fused path's (epilogue/kernel.py), so that an error reads the
        # same whichever backend ran
        "labels": f"counted label(s) outside [0, V) (the vocabulary size V = {vocab})",
        "seq_ids": f"seq_ids value(s) outside [-1, B={batch.num_seqs})",
        "rewards": "non-finite rewards",
        "ref_logprobs": "non-finite ref_logprobs on counted tokens",
        "logits": "counted row(s) of logits with a non-finite value (NaN/+inf, or -inf at "
                  "the label)",
        "logprobs": "non-finite logprobs on counted tokens",
        "entropy": "non-finite entropy on counted tokens",
        "weights": "non-finite values in the weights tensor",
        "mask": "mask value(s) other than 0/1",
    }
    name, n = next(iter(found.items()))
    # seq_ids out of range are reported first: they would make every other index wrong
    if "seq_ids" in found:
        name, n = "seq_ids", found["seq_ids"]
    message = None if explain is None else explain(name, n)
    raise ValueError(message if message is not None else f"{name}: {n} {messages[name]}")
