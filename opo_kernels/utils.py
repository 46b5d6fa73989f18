"""Small helpers shared by the ops: backend detection and output allocation."""

from __future__ import annotations

import os

import torch

# Tests set this to True so every freshly allocated kernel output starts as NaN: a row that a
# kernel forgets to write then fails the comparison instead of passing as zeros.
POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled (integers: -1) while POISON_OUTPUTS is on."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def new_output_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of t's shape, dtype and device, as ``new_output`` (torch.empty_like
    costs about half of torch.empty with the shape, dtype and device read from t)."""
    if not POISON_OUTPUTS:
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return new_output(t.shape, t.dtype, t.device)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. ``triton.cdiv`` is a constexpr function whose Python call costs
    ~1 µs of argument unwrapping; a loss call computes a handful of these (host_time.py)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), on the host (see ``cdiv``); a symbolic size
    (torch.compile) goes to triton's."""
    if type(n) is int:
        return 1 << (n - 1).bit_length() if n > 1 else 1
    import triton

    return triton.next_power_of_2(n)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton is a dependency, but keep torch usable
        return False
    return True


def use_triton(backend: str, device: torch.device) -> bool:
    """The backend rule of docs/spec.md: "triton" / "torch" as asked; "auto" = triton for CUDA
    tensors, and for CPU tensors when TRITON_INTERPRET=1; torch otherwise."""
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but triton is not installed")
        if device.type != "cuda" and not interpreter_on():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 "
                "set before triton is imported to run the kernels on the CPU"
            )
        return True
    return triton_available() and (device.type == "cuda" or interpreter_on())
