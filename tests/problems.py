"""Random OPO problems for the tests, in both layouts, with the awkward parts built in:

- padded logits are a strided view ``full[:, :-1, :]`` (no copy allowed), labels likewise;
- packed logits are rows of a wider buffer (row stride V + 3), tokens of sequences interleaved;
- an empty sequence, a whole empty group, NaN in the logits and ref_logprobs of rows that are not
  counted (the kernels must not read them), label −100 there;
- ref_logprobs = the true log-probs + N(0, noise²), so log-ratios are small as in real RL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict

import torch

import opo_kernels.utils as ok_utils

# The device the whole suite runs on (conftest.py imports it): "cpu" while the Triton
# interpreter is on (CI), "cuda" when TRITON_INTERPRET=0 on a CUDA machine, where the same
# kernel-vs-reference tests then run the compiled kernels. OPO_TEST_DEVICE overrides it (e.g.
# "cuda:1"). Random inputs are always drawn on the CPU with a seeded CPU generator and then
# moved, so both devices see the same values.
DEVICE = os.environ.get("OPO_TEST_DEVICE") or (
    "cuda" if torch.cuda.is_available() and not ok_utils.interpreter_on() else "cpu")


def on_device(x, device=None):
    """x moved to the suite's device: a tensor, or a dict / list / tuple of them (other values
    and meta tensors, which some bad-input tests plant on purpose, are left as they are).

    A view keeps its strides and storage offset (``Tensor.to`` would make ``full[:, :-1]``
    contiguous): its whole storage moves, NaN-poisoned gaps included."""
    device = torch.device(device or DEVICE)
    if isinstance(x, torch.Tensor):
        same = x.device.type == device.type and device.index in (None, x.device.index)
        if x.device.type == "meta" or same:
            return x
        if x.requires_grad or (x.is_contiguous() and x.storage_offset() == 0):
            return x.to(device)
        n = x.untyped_storage().nbytes() // x.element_size()
        flat = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), 0, (n,), (1,))
        return flat.to(device).as_strided(x.size(), x.stride(), x.storage_offset())
    if isinstance(x, dict):
        return {k: on_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(on_device(v, device) for v in x)
    return x


@dataclass
class Problem:
    logits: torch.Tensor  # [B, T, V] view or [N, V] view, requires no grad
    labels: torch.Tensor
    ref_logprobs: torch.Tensor
    rewards: torch.Tensor
    layout: dict = field(default_factory=dict)  # mask / seq_ids / group_size / group_ids

    def leaf(self, dtype=None) -> torch.Tensor:
        """A fresh differentiable copy of the logits that keeps the view's strides."""
        base = self.logits.detach()
        if dtype is not None:
            base = base.to(dtype)
        if self.logits.dim() == 3:  # rebuild the [:, :-1] view of a larger buffer
            full = torch.full((base.shape[0], base.shape[1] + 1, base.shape[2]), float("nan"),
                              dtype=base.dtype, device=base.device)
            full[:, :-1] = base
            return full.requires_grad_()[:, :-1]  # non-leaf view: grads land on `full`
        return base.clone().requires_grad_()

    def args(self):
        return (self.labels, self.ref_logprobs, self.rewards)


def true_logprobs(logits2d: torch.Tensor, labels: torch.Tensor, temperature: float):
    z = logits2d.double() / temperature
    return torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]


def make_problem(B: int, T: int, V: int, dtype: torch.dtype, layout: str, seed: int = 0,
                 device=None, temperature: float = 1.0, noise: float = 0.1,
                 scale: float = 2.0) -> Problem:
    """B must be a multiple of 3 (groups of 3); B >= 6 gets an empty sequence and an empty
    group (the second group), B >= 3 uses every other sequence fully. Drawn on the CPU, then
    put on ``device`` (default: the suite's DEVICE)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(B, generator=g, dtype=torch.float32)
    rewards[0] = rewards[1]  # a tie inside a group
    if layout == "padded":
        counted = torch.rand(B, T, generator=g) < 0.7
        counted[:, 0] = True  # every sequence non-empty ...
        if B >= 6:
            counted[1] = False  # ... but one empty sequence in group 0
            counted[3:6] = False  # and an entirely empty group 1
        full = torch.randn(B, T + 1, V, generator=g) * scale
        full[:, :-1][~counted] = float("nan")  # rows not counted must not be read
        logits = full.to(dtype)[:, :-1]
        labels_full = torch.randint(0, V, (B, T + 1), generator=g)
        labels = labels_full[:, 1:]
        labels = labels.masked_fill(~counted, -100)
        lp = true_logprobs(logits.reshape(-1, V).nan_to_num(), labels.reshape(-1),
                           temperature).view(B, T)
        ref = (lp + noise * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
        ref[~counted] = float("nan")
        # a 0/1 integer mask for one problem in two, bool otherwise
        mask = counted.to(torch.int64) if seed % 2 else counted
        lay: Dict = {"mask": mask, "group_size": 3}
    elif layout == "packed":
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        if B >= 6:
            lengths[1] = 0
            lengths[3:6] = 0
        seq = torch.repeat_interleave(torch.arange(B), lengths)
        seq = seq[torch.randperm(seq.numel(), generator=g)]  # interleaved sequences
        pad = torch.full((max(seq.numel() // 4, 1),), -1)
        seq = torch.cat([seq, pad])[torch.randperm(seq.numel() + pad.numel(), generator=g)]
        n = seq.numel()
        wide = torch.randn(n, V + 3, generator=g) * scale
        wide[seq < 0] = float("nan")
        logits = wide.to(dtype)[:, :V]  # row stride V + 3
        labels = torch.randint(0, V, (n,), generator=g).masked_fill(seq < 0, -100)
        lp = true_logprobs(logits.nan_to_num(), labels, temperature)
        ref = (lp + noise * torch.randn(n, generator=g, dtype=torch.float64)).float()
        ref[seq < 0] = float("nan")
        # groups given by ids (a permutation of 3 ids), not by consecutive blocks
        group_ids = (torch.arange(B) // 3)[torch.randperm(B, generator=g)] * 7 + 5
        if B >= 6:  # keep the empty sequences together as one empty group
            group_ids[3:6] = 999
            group_ids[1] = group_ids[0]
        lay = {"seq_ids": seq.to(torch.int32), "group_ids": group_ids}
    else:
        raise ValueError(layout)
    to = lambda t: on_device(t, device)  # noqa: E731
    return Problem(to(logits), to(labels), to(ref), to(rewards), to(lay))
