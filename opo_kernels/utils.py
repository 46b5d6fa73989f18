"""Small helpers shared by the ops: backend detection and output allocation."""

from __future__ import annotations

import functools
import numbers
import os
import sys
from typing import Optional

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


def wants_grad(*tensors) -> bool:
    """Whether autograd will ask for a gradient of any of tensors (None: skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def one_pass_mode(ref_logprobs, cfg, dtype: torch.dtype, grad_wanted: bool) -> bool:
    """Whether an on-policy call forms its gradient during its forward pass (the one-pass
    modes of opo_loss, vocabulary-parallel logits and fused_linear_opo_loss; docs/kernels.md),
    else the general passes. It needs ref_logprobs=None and the coefficients known before the
    pass (``cfg.one_pass_exact``), and:
    - a gradient to form (grad_wanted, ``wants_grad``): under ``torch.no_grad()`` or for inputs
      that do not require grad the call computes the loss only, and with ``inplace_backward``
      leaves the logits as they are;
    - inputs (dtype) that are not fp16: the gradient is stored before the upstream gradient is
      known, so at unit scale, and fp16's range would lose the small entries that a loss scale
      (GradScaler's 2^16) keeps in the general mode, which applies it before rounding. bf16
      and fp32 have fp32's exponent range."""
    return (ref_logprobs is None and cfg.one_pass_exact and dtype != torch.float16
            and grad_wanted)


def mark_written(t: torch.Tensor) -> None:
    """Tells autograd that a kernel wrote t in place (its version counter, as an in-place
    torch op bumps it): a graph node that saved t, such as tanh, which saves its output, then
    refuses its backward ("modified by an inplace operation") instead of reading the gradient
    as if it were the logits. Called in backward, also when the write came in forward (the
    on-policy one-pass mode): a view's version change makes autograd rebuild the view's
    grad_fn when next asked, and in forward that would hide the view from
    ``torch.autograd.grad(loss, view)``; in backward the graph's edges are already taken."""
    torch.autograd.graph.increment_version(t)


def first_order_only(backward):
    """Decorates the backward of an autograd.Function whose gradients come from kernels, not
    from differentiable torch ops: under ``create_graph=True`` (a gradient penalty, a
    Hessian-vector product) it raises at once. Returned as they are, its gradients would enter
    the new graph as constants, and a second differentiation would be silently wrong; torch's
    ``once_differentiable`` marks them, but its mark is skipped by ``autograd.grad(...,
    inputs=...)``, which runs only the nodes on the paths to the inputs it is asked for. Under
    torch.compile's tracing the backward runs as it is."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                "opo_kernels: the fused loss's backward is computed by kernels and cannot be "
                "differentiated (backward or autograd.grad with create_graph=True through it, "
                "e.g. a gradient penalty): use backend='torch' for higher-order gradients")
        return backward(ctx, *grads)

    return wrapper


def host_int(value, minimum: int) -> Optional[int]:
    """value as a Python int when it is an int or a NumPy integer (not a bool) >= minimum, else
    None (the caller raises, naming its argument)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        return None
    return int(value)


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


_INTERPRETED = []  # the answer of interpreter_on once the kernels exist (it cannot change)


def interpreter_on() -> bool:
    """Whether the package's kernels run in Triton's interpreter. Triton decides that when a
    kernel is defined (``@triton.jit`` reads TRITON_INTERPRET then, at the package's import),
    so once the kernels exist their type says; TRITON_INTERPRET set later changes nothing
    (and must not make a CPU call pick kernels that were compiled for a GPU). The package's
    import asks once, so that a call traced by torch.compile reads a remembered bool (torch
    2.4's Dynamo cannot look at a kernel object)."""
    if _INTERPRETED:
        return _INTERPRETED[0]
    kernels = sys.modules.get("opo_kernels.row_kernels")
    kernel = getattr(kernels, "row_seq", None)
    if kernel is not None:
        _INTERPRETED.append(type(kernel).__name__ == "InterpretedFunction")
        return _INTERPRETED[0]
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
                "set before opo_kernels (and triton) is imported to run the kernels on the CPU"
            )
        return True
    return triton_available() and (device.type == "cuda" or interpreter_on())
