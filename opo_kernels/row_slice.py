"""``RowSlice``: a view of whole rows of a base tensor, for ``grad_to_base`` (docs/kernels.md):
the loss then differentiates the base directly, and the kernel that writes the gradient writes
the zeros outside the slice too."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


class RowSlice(NamedTuple):
    """logits = base.narrow(dim, start, length): whole positions (dim 1 of [B, T, V]) or rows
    (dim 0 of [N, V]) of a contiguous ``base`` that requires grad, as ``logits[:, :-1]`` or
    ``outputs.logits[:, -(C + 1):-1]`` are. With ``grad_to_base`` the loss differentiates
    ``base`` directly: its gradient is written base-shaped (the slice's rows and the zeros
    outside them, by the kernel that writes the gradient), so autograd never runs the slice's
    backward, which allocates a
    zero-filled base-sized tensor and copies the slice's gradient into it (one more
    logits-sized buffer and ~3 more passes over it per step)."""

    base: Optional[torch.Tensor]
    dim: int
    start: int
    length: int

    @classmethod
    def of(cls, logits: torch.Tensor) -> Optional[RowSlice]:
        base = logits._base
        if base is None or not base.requires_grad:
            return None
        ndim, shape, bshape = logits.dim(), logits.shape, base.shape
        if (ndim not in (2, 3) or base.dim() != ndim or logits.stride() != base.stride()
                or not base.is_contiguous()):
            return None
        dim = ndim - 2  # every other dimension must be whole
        if shape[dim + 1:] != bshape[dim + 1:] or shape[:dim] != bshape[:dim]:
            return None
        step, offset = base.stride(dim), logits.storage_offset() - base.storage_offset()
        if step <= 0 or offset < 0 or offset % step or shape[dim] == bshape[dim]:
            return None
        start = offset // step
        if start + shape[dim] > bshape[dim]:
            return None
        return cls(base, dim, start, shape[dim])

    def rows(self, full: torch.Tensor) -> torch.Tensor:
        """The slice's rows of a base-shaped tensor (a view)."""
        return full.narrow(self.dim, self.start, self.length)

    def rows_at(self, full: torch.Tensor) -> torch.Tensor:
        """The slice's rows of a base-shaped tensor for a kernel that reads only its pointer
        and strides (the row kernels take the rows' count and geometry from the logits): the
        base itself when the slice starts at row 0, as ``logits[:, :-1]`` does (the same
        pointer and strides; no view to make), else ``rows``."""
        return full if self.start == 0 else self.rows(full)

    def outside(self, full: torch.Tensor) -> Tuple[int, int]:
        """(rows before, rows after) the slice along its dimension of a base-shaped tensor."""
        return self.start, full.shape[self.dim] - self.start - self.length

    def zero_outside(self, full: torch.Tensor) -> None:
        """Zeros at the rows of a base-shaped tensor outside the slice (at most two fills):
        where no kernel launches to write them (a slice without rows)."""
        end = self.start + self.length
        if self.start:
            full.narrow(self.dim, 0, self.start).zero_()
        if end < full.shape[self.dim]:
            full.narrow(self.dim, end, full.shape[self.dim] - end).zero_()
