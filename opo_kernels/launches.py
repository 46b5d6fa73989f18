"""One Triton launch, with Triton's argument binding skipped when the same launch was made
before (``Launch``).

``kernel[grid](*args)`` costs Triton 15-30 µs of Python before the kernel starts, most of it
in its binder, which specializes every argument anew (dtype and 16-byte alignment of each
pointer, value class of each integer) to find the compiled variant (measured on the CPU,
benchmarks/NOTES.md "Host time per call"). A launcher that already knows its signature (the
geometry of a call, ``call_plan``) can remember the compiled variant instead: ``Launch``
keeps it per alignment pattern of the tensors, and later launches go straight to the compiled
kernel's launcher (``CompiledKernel[grid](*args)``, the call Triton itself ends with).

The remembered variant is only used when it is the one Triton would pick:
- every integer and constexpr argument, the dtype of every tensor and the launch options are
  fixed by the launcher's signature (the caller builds one ``Launch`` per signature and passes
  the tensors only);
- the 16-byte alignment of each tensor, the current device and the stream are read at every
  launch (the alignment is the key of the remembered variant);
- anything that would make Triton behave differently falls back to ``kernel[grid]``: the
  interpreter (``TRITON_INTERPRET=1``, no compiled kernels), a Triton older than 3.4 or newer
  than the versions checked (3.6, 3.8, 3.9: the launcher's calling convention), no CUDA
  (tensors elsewhere, or a machine without a driver), a wrapped ``run`` or a stand-in kernel
  (profilers, the launch-counting tests, recorders), launch hooks set in ``triton.knobs``,
  and ``OPO_KERNELS_LAUNCH_CACHE=0`` in the environment.
- a direct launch that Triton's runner refuses before launching (a calling convention this
  module has not seen: TypeError, AttributeError, ...) turns the cache off for the process,
  with a RuntimeWarning, and the launch goes through ``kernel[grid]`` as usual.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple

import triton

from .utils import interpreter_on

_VERSION = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])
# Triton versions whose JITFunction.run ends with ``kernel.run(grid..., *bound_args.values())``
# and whose CompiledKernel[grid] runner takes the same arguments (read in their sources).
_CHECKED = ((3, 4), (3, 10))


def _enabled() -> bool:
    if os.environ.get("OPO_KERNELS_LAUNCH_CACHE", "1") in ("0", ""):
        return False
    if interpreter_on() or not (_CHECKED[0] <= _VERSION < _CHECKED[1]):
        return False
    try:
        from triton import knobs  # noqa: F401  (3.4+)
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover - other Triton layouts take the plain path
        return False
    return hasattr(JITFunction, "run")


ENABLED = _enabled()
if ENABLED:
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    _TRITON_RUN = JITFunction.run


def _on_cuda(t) -> bool:
    return t.is_cuda


def _direct_ok(kernel) -> bool:
    """Nothing between us and Triton's own launch: a JITFunction whose ``run`` is not
    wrapped (a stand-in kernel, e.g. a recorder, has none), no launch hooks."""
    return (getattr(type(kernel), "run", None) is _TRITON_RUN
            and knobs.runtime.launch_enter_hook is None
            and knobs.runtime.launch_exit_hook is None)


# what Triton's Python runner or its C launcher raise for arguments they cannot take, before
# the kernel is launched
_REFUSED = (TypeError, AttributeError, ValueError, IndexError, KeyError)


def _turn_off(err: Exception) -> None:
    global ENABLED
    ENABLED = False
    warnings.warn(f"opo_kernels: launching a remembered Triton kernel directly failed "
                  f"({type(err).__name__}: {err}); every launch now takes Triton's own path "
                  f"(Triton {triton.__version__}; OPO_KERNELS_LAUNCH_CACHE=0 does this from the "
                  "start)", RuntimeWarning, stacklevel=3)


class Launch:
    """One kernel launch of a fixed signature: ``Launch(kernel, grid, num_warps)(*args)``.

    args: every argument of the kernel, positionally, in its declaration order (constexprs
    included), exactly as ``kernel[grid](*args, num_warps=num_warps)`` would take them; the
    caller guarantees that every non-tensor argument and every tensor's dtype is the same at
    each call of one ``Launch`` (it is built once per signature). grid: a 1-tuple.
    """

    __slots__ = ("kernel", "grid", "grid3", "options", "tensor_slots", "compiled")

    def __init__(self, kernel, grid: Tuple[int], num_warps: int):
        self.kernel, self.grid, self.options = kernel, grid, {"num_warps": num_warps}
        self.grid3 = (grid[0], 1, 1)
        self.tensor_slots: Optional[Tuple[int, ...]] = None
        # (device index, alignment bits of the tensors) -> Triton's compiled kernel
        self.compiled: Dict[tuple, object] = {}

    def __call__(self, *args) -> None:
        if not ENABLED or not _on_cuda(args[0]):  # every kernel's first argument is a tensor
            self.kernel[self.grid](*args, **self.options)
            return
        if self.tensor_slots is None:
            self.tensor_slots = tuple(i for i, a in enumerate(args) if hasattr(a, "data_ptr"))
        key = (driver.active.get_current_device(),
               *[args[i].data_ptr() % 16 == 0 for i in self.tensor_slots])
        compiled = self.compiled.get(key)
        if compiled is not None and _direct_ok(self.kernel):
            try:
                compiled[self.grid3](*args)
                return
            except _REFUSED as err:  # raised before the launch: Triton's own path below
                _turn_off(err)
        compiled = self.kernel[self.grid](*args, **self.options)
        # remembered only when it takes the arguments as passed (one per declared parameter)
        signature = getattr(getattr(compiled, "src", None), "signature", ())
        if (ENABLED and len(signature) == len(args) and _direct_ok(self.kernel)
                and len(self.compiled) < 64):
            self.compiled[key] = compiled
