"""Random inputs of one benchmark row: logits rows (padded [B, T+1, V] storage read through
the [:, :-1] view, or packed [N, V]) and fused-linear hidden states and weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from benchmarks import peers
from benchmarks.cases import (
    COUNTED_FRACTION,
    DTYPES,
    GROUP_SIZE,
    MIN_LEN_FRACTION,
    REF_NOISE,
    Shape,
)


def batch_geometry(shape: Shape) -> Tuple[int, int]:
    """(B, T): B a multiple of GROUP_SIZE, T so that B·T·COUNTED_FRACTION ≈ N (fused-linear
    shapes: their own B, T)."""
    if shape.B is not None:
        return shape.B, shape.T
    b = GROUP_SIZE * max(1, shape.N // 4096)
    t = math.ceil(shape.N / (COUNTED_FRACTION * b))
    return b, t


def sequence_lengths(n: int, b: int, t: int, gen: torch.Generator) -> List[int]:
    """b lengths in [1, t], drawn uniform in [0.4·t, t], then adjusted to sum exactly to n."""
    if n > b * t:
        raise ValueError(f"N={n} tokens do not fit in B={b} sequences of T={t}")
    lo = max(1, math.ceil(MIN_LEN_FRACTION * t))
    lengths = torch.randint(lo, t + 1, (b,), generator=gen).tolist()
    order = torch.randperm(b, generator=gen).tolist()
    diff = n - sum(lengths)
    while diff:
        for s in order:
            if diff > 0:
                step = min(diff, t - lengths[s])
            else:
                step = -min(-diff, lengths[s] - 1)
            lengths[s] += step
            diff -= step
            if not diff:
                break
    return lengths


@dataclass
class Inputs:
    """One row's inputs. ``storage`` is the big allocation; ``logits`` what the loss reads."""

    shape: Shape
    B: int
    T: int
    rows: int                     # logits rows the loss sees: B·T (padded) or N (packed)
    storage: torch.Tensor         # [B, T+1, V] padded | [N, V] packed | [rows, V] for CE
    logits: torch.Tensor          # [B, T, V] view storage[:, :-1] | [N, V]
    labels: torch.Tensor          # [B, T] | [N] int64
    ref_logprobs: torch.Tensor    # [B, T] | [N] float32
    rewards: torch.Tensor         # [B] float32
    advantages: torch.Tensor      # [B] float32: rewards normalized in their group (Liger)
    mask: Optional[torch.Tensor] = None      # [B, T] int64 0/1 (padded)
    seq_ids: Optional[torch.Tensor] = None   # [N] int64 (packed)
    targets: Optional[torch.Tensor] = None   # [rows] int64, -100 = ignored (CE)

    @property
    def storage_bytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()


@torch.no_grad()
def make_inputs(shape: Shape, device: torch.device, seed: int, for_ce: bool = False) -> Inputs:
    """Fresh random inputs (never zeros): logits ~ N(0, 1) in the shape's dtype, labels
    uniform in [0, V), ref_logprobs = the logits' own log-probs + small noise, rewards N(0,1).
    """
    from opo_kernels.reference import chunked_logprobs  # after the interpreter is set
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    n, v = shape.N, shape.V
    b, t = batch_geometry(shape)
    lengths = torch.tensor(sequence_lengths(n, b, t, cpu_gen))
    rewards = torch.randn(b, generator=cpu_gen)
    advantages = peers.group_advantages(rewards, GROUP_SIZE)

    def randn(*size):
        return torch.randn(*size, dtype=dtype, device=device, generator=dev_gen)

    if shape.layout == "padded":
        rows = b * t
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        labels = torch.randint(0, v, (b, t), generator=cpu_gen)
        if for_ce:  # Liger's cross entropy takes contiguous [rows, V]
            storage = randn(rows, v)
            logits = storage
        else:       # the model's [B, T+1, V]; the loss reads the view [:, :-1]
            storage = randn(b, t + 1, v)
            logits = storage[:, :-1]
        ref = chunked_logprobs(logits.view(b, t, v) if for_ce else logits, labels.to(device))
        ref = ref.cpu() + REF_NOISE * torch.randn(b, t, generator=cpu_gen)
        inp = Inputs(shape, b, t, rows, storage, logits, labels.to(device), ref.to(device),
                     rewards.to(device), advantages.to(device), mask=mask.to(device))
        if for_ce:
            inp.targets = torch.where(mask.reshape(-1) != 0, labels.reshape(-1), -100).to(device)
        return inp
    if shape.layout != "packed":
        raise ValueError(f"unknown layout {shape.layout!r}")
    storage = randn(n, v)
    labels = torch.randint(0, v, (n,), generator=cpu_gen)
    seq_ids = torch.repeat_interleave(torch.arange(b), lengths)
    ref = chunked_logprobs(storage, labels.to(device)).cpu() + REF_NOISE * torch.randn(
        n, generator=cpu_gen)
    inp = Inputs(shape, b, t, n, storage, storage, labels.to(device), ref.to(device),
                 rewards.to(device), advantages.to(device), seq_ids=seq_ids.to(device))
    if for_ce:
        inp.targets = inp.labels
    return inp


def group_ids_for(b: int) -> torch.Tensor:
    """Consecutive groups of GROUP_SIZE sequences; the last one smaller when GROUP_SIZE does
    not divide B (fused-linear B=16: groups of 6, 6, 4)."""
    return torch.arange(b) // GROUP_SIZE


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Rewards normalized within their group, (r - mean) / (std + 1e-4) (Liger's input);
    0 for a group of one."""
    out = torch.zeros_like(rewards)
    for g in torch.unique(group_ids).tolist():
        sel = group_ids == g
        r = rewards[sel]
        if r.numel() > 1:
            out[sel] = (r - r.mean()) / (r.std() + 1e-4)
    return out


@dataclass
class LinearInputs:
    """One fused-linear row's inputs: padded hidden [B, T, H] (labels, ref_logprobs, mask
    [B, T]) or packed hidden [N, H] (labels, ref_logprobs, seq_ids [N], every row counted);
    weight [V, H]."""

    shape: Shape
    B: int
    T: int
    rows: int                     # token rows the matmuls see: B·T (padded) or N (packed)
    hidden: torch.Tensor          # [B, T, H] | [N, H] contiguous, the shape's dtype
    weight: torch.Tensor          # [V, H]
    labels: torch.Tensor          # [B, T] | [N] int64
    ref_logprobs: torch.Tensor    # [B, T] | [N] float32
    rewards: torch.Tensor         # [B] float32
    advantages: torch.Tensor      # [B] float32, normalized within the groups (Liger)
    mask: Optional[torch.Tensor]  # [B, T] int64 0/1 (padded)
    group_ids: torch.Tensor       # [B] int64
    seq_ids: Optional[torch.Tensor] = None   # [N] int64 (packed)

    @property
    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))

    @property
    def counted(self) -> torch.Tensor:
        """bool, labels' shape: the rows the loss counts."""
        return self.mask != 0 if self.mask is not None else self.seq_ids >= 0

    def layout_kwargs(self):
        return {"mask": self.mask} if self.mask is not None else {"seq_ids": self.seq_ids}


@torch.no_grad()
def make_linear_inputs(shape: Shape, device: torch.device, seed: int) -> LinearInputs:
    """Fresh random inputs: hidden ~ N(0, 1), weight ~ N(0, 1/H) (so the logits are ~ N(0, 1)
    like the logits rows'), labels uniform in [0, V), ref_logprobs = the logits' own log-probs
    + small noise (computed a sequence at a time, never [B, T, V] at once), rewards N(0, 1)."""
    from opo_kernels.reference import chunked_logprobs  # after the interpreter is set
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    b, t, h, v = shape.B, shape.T, shape.H, shape.V
    lengths = torch.tensor(sequence_lengths(shape.N, b, t, cpu_gen))
    rewards = torch.randn(b, generator=cpu_gen)
    group_ids = group_ids_for(b)
    advantages = group_advantages(rewards, group_ids)
    packed = shape.layout == "packed"
    rows = shape.N if packed else b * t
    hidden = torch.randn(*((rows,) if packed else (b, t)), h, dtype=dtype, device=device,
                         generator=dev_gen)
    weight = torch.randn(v, h, dtype=dtype, device=device, generator=dev_gen).mul_(h ** -0.5)
    labels = torch.randint(0, v, (rows,) if packed else (b, t), generator=cpu_gen).to(device)
    if packed:
        ref = torch.cat([chunked_logprobs(hidden[i:i + 2048] @ weight.t(), labels[i:i + 2048])
                         for i in range(0, rows, 2048)])
        ref = ref.cpu() + REF_NOISE * torch.randn(rows, generator=cpu_gen)
        seq_ids = torch.repeat_interleave(torch.arange(b), lengths).to(device)
        return LinearInputs(shape, b, t, rows, hidden, weight, labels, ref.to(device),
                            rewards.to(device), advantages.to(device), None,
                            group_ids.to(device), seq_ids=seq_ids)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ref = torch.stack([chunked_logprobs(hidden[i] @ weight.t(), labels[i]) for i in range(b)])
    ref = ref.cpu() + REF_NOISE * torch.randn(b, t, generator=cpu_gen)
    return LinearInputs(shape, b, t, rows, hidden, weight, labels, ref.to(device),
                        rewards.to(device), advantages.to(device), mask.to(device),
                        group_ids.to(device))
