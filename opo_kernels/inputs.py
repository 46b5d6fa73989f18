"""Turns either input layout into one flat token view, and checks the inputs (SPEC "Inputs",
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

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Batch:
    """The inputs of one loss call, flattened to tokens.

    logits:        [B, T, V] or [N, V] exactly as passed (a strided view is fine).
    labels:        [N] int64, N = B·T for the padded layout.
    ref_logprobs:  [N] compute dtype, or None (on-policy: π_ref = detached current policy).
    seq:           [N] int64, the token's sequence in [0, B), or −1 when it is not counted.
    rewards:       [B] compute dtype.
    group:         [B] int64, the sequence's group as a bucket index in [0, B).
    weights:       [B] compute dtype (caller-given ω) or None.
    seq_len:       T for the padded layout (row r belongs to sequence r // T), else None.
    mask:          the caller's [B, T] mask (padded layout) or None.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    ref_logprobs: Optional[torch.Tensor]
    seq: torch.Tensor
    rewards: torch.Tensor
    group: torch.Tensor
    weights: Optional[torch.Tensor]
    seq_len: Optional[int]
    mask: Optional[torch.Tensor] = None  # the caller's [B, T] mask, kept for its value check

    @property
    def num_seqs(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_rows(self) -> int:
        return self.seq.shape[0]

    @property
    def vocab(self) -> int:
        return self.logits.shape[-1]

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.logits.dtype)

    @property
    def counted(self) -> torch.Tensor:
        return self.seq >= 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in float32 (SPEC), or float64 for float64 logits (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _tensor(name: str, value, *, kind: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if kind == "float" and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if kind == "int" and (value.is_floating_point() or value.is_complex()
                          or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    return value


def _same_shape(name: str, t: torch.Tensor, logits: torch.Tensor) -> None:
    """t must have the row shape of logits ([B, T] or [N]); the message is built only on error
    (string formatting of shapes does not trace under torch.compile)."""
    if tuple(t.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{name} has shape {_shape(t)} but logits {_shape(logits)} implies "
                         f"{list(logits.shape[:-1])}")


def _group_buckets(group_ids: torch.Tensor) -> torch.Tensor:
    """Maps arbitrary group ids [B] to bucket indices in [0, B) without a host sync."""
    sorted_ids, order = torch.sort(group_ids, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    buckets_sorted = starts.long().cumsum(0) - 1
    return torch.empty_like(buckets_sorted).scatter_(0, order, buckets_sorted)


def prepare(logits, labels, ref_logprobs, rewards, *, mask=None, seq_ids=None,
            group_size=None, group_ids=None, config: OPOLossConfig) -> Batch:
    """Checks shapes, dtypes and devices (no host sync) and flattens the small tensors."""
    logits = _tensor("logits", logits, kind="float")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"logits must be [B, T, V] (padded) or [N, V] (packed), got shape {_shape(logits)}"
        )
    if logits.shape[-1] < 1:
        raise ValueError(f"logits has an empty vocabulary dimension: shape {_shape(logits)}")
    device = logits.device
    cdtype = compute_dtype(logits.dtype)

    labels = _tensor("labels", labels, kind="int")
    _same_shape("labels", labels, logits)
    if ref_logprobs is not None:
        ref_logprobs = _tensor("ref_logprobs", ref_logprobs, kind="float")
        _same_shape("ref_logprobs", ref_logprobs, logits)
    rewards = _tensor("rewards", rewards, kind="float")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {_shape(rewards)}")
    num_seqs = rewards.shape[0]

    if logits.dim() == 3:
        if seq_ids is not None:
            raise ValueError("seq_ids is for the packed layout (logits [N, V]); "
                             "with padded logits [B, T, V] pass mask instead")
        if logits.shape[0] != num_seqs:
            raise ValueError(f"rewards has shape {_shape(rewards)} but logits "
                             f"{_shape(logits)} holds {logits.shape[0]} sequences")
        seq_len = logits.shape[1]
        rows = torch.arange(num_seqs * seq_len, device=device) // max(seq_len, 1)
        if mask is None:
            seq = rows
        else:
            mask = _tensor("mask", mask, kind="any")
            _same_shape("mask", mask, logits)
            seq = torch.where(mask.reshape(-1).to(device) != 0, rows, -1)
    else:
        if mask is not None:
            raise ValueError("mask is for the padded layout (logits [B, T, V]); "
                             "with packed logits [N, V] pass seq_ids instead")
        if seq_ids is None:
            raise ValueError("packed logits [N, V] need seq_ids [N] (sequence index, -1 = "
                             "token not counted)")
        seq_ids = _tensor("seq_ids", seq_ids, kind="int")
        _same_shape("seq_ids", seq_ids, logits)
        seq = seq_ids.long().contiguous()
        seq_len = None

    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (int) or group_ids ([B] tensor)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if num_seqs % group_size != 0:
            raise ValueError(f"group_size={group_size} does not divide the number of "
                             f"sequences B={num_seqs}")
        group = torch.arange(num_seqs, device=device) // group_size
    else:
        group_ids = _tensor("group_ids", group_ids, kind="int")
        if tuple(group_ids.shape) != (num_seqs,):
            raise ValueError(f"group_ids must have shape [B]=[{num_seqs}] like rewards, "
                             f"got {_shape(group_ids)}")
        group = _group_buckets(group_ids.to(device))

    weights = None
    if isinstance(config.weights, torch.Tensor):
        if tuple(config.weights.shape) != (num_seqs,):
            raise ValueError(f"weights tensor must have shape [B]=[{num_seqs}], "
                             f"got {_shape(config.weights)}")
        weights = config.weights.detach()

    named = {"labels": labels, "ref_logprobs": ref_logprobs, "rewards": rewards,
             "mask": mask, "seq_ids": seq_ids, "group_ids": group_ids, "weights": weights}
    for name, t in named.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but logits is on {device}")

    return Batch(
        logits=logits,
        labels=labels.reshape(-1).long().contiguous(),  # the kernels index it with stride 1
        ref_logprobs=None if ref_logprobs is None else ref_logprobs.detach().reshape(-1).to(cdtype),
        seq=seq,
        rewards=rewards.detach().to(cdtype),
        group=group,
        weights=None if weights is None else weights.to(cdtype),
        seq_len=seq_len,
        mask=mask,
    )


def check_values(batch: Batch, lse: torch.Tensor, logprobs: torch.Tensor) -> None:
    """The data-dependent checks of SPEC "Bad input", with ONE host sync.

    lse, logprobs: [N] from the forward pass (any value on rows that are not counted).
    Non-finite logits are found from the per-row logsumexp (+inf or NaN anywhere in the row
    makes it non-finite) and from the label's log-prob (a −inf label logit), so no extra pass
    over [N, V] is needed. −inf logits elsewhere (a masked vocabulary) are allowed.
    """
    counted = batch.counted
    vocab = batch.vocab
    bad: Dict[str, torch.Tensor] = {}
    bad["labels"] = (counted & ((batch.labels < 0) | (batch.labels >= vocab))).sum()
    bad["seq_ids"] = ((batch.seq >= batch.num_seqs) | (batch.seq < -1)).sum()
    bad["rewards"] = (~torch.isfinite(batch.rewards)).sum()
    if batch.ref_logprobs is not None:
        bad["ref_logprobs"] = (counted & ~torch.isfinite(batch.ref_logprobs)).sum()
    bad["logits"] = (counted & ~(torch.isfinite(lse) & torch.isfinite(logprobs))).sum()
    if batch.weights is not None:
        bad["weights"] = (~torch.isfinite(batch.weights)).sum()
    if batch.mask is not None:
        bad["mask"] = ((batch.mask != 0) & (batch.mask != 1)).sum()
    counts = torch.stack([v.to(torch.int64) for v in bad.values()]).tolist()  # the one sync
    found = {name: n for name, n in zip(bad, counts) if n}
    if not found:
        return
    messages = {
        "labels": f"counted label(s) outside [0, {vocab}) (the vocabulary size V)",
        "seq_ids": f"seq_ids value(s) outside [-1, B={batch.num_seqs})",
        "rewards": "non-finite rewards",
        "ref_logprobs": "non-finite ref_logprobs on counted tokens",
        "logits": "counted row(s) of logits with a non-finite value (NaN/+inf, or -inf at "
                  "the label)",
        "weights": "non-finite values in the weights tensor",
        "mask": "mask value(s) other than 0/1",
    }
    name, n = next(iter(found.items()))
    # seq_ids out of range are reported first: they would make every other index wrong
    if "seq_ids" in found:
        name, n = "seq_ids", found["seq_ids"]
    raise ValueError(f"{name}: {n} {messages[name]}")
