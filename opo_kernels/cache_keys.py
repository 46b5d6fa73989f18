"""Triton cache keys that do not depend on which kernel a process hashes first.

A kernel's cache key includes the global ``tl.constexpr`` values used by every ``@triton.jit``
function it calls. Triton 3.6.0 (the GPU image's) merges a callee's values into the caller's
key *before* it has hashed that callee; 3.9.0 hashes it first (upstream: triton-lang/triton
PR 10494, "Make JIT dependency cache keys deterministic"). Under 3.6.0, when a
process hashed the backward kernel first, its key left out ``LOG2E``, which its helpers read;
when it hashed the forward kernel first, both keys held it. The same compiled variant then had
two keys. Triton's on-disk cache, which the processes of a job share, looked it up under the
other key and missed. That was measured under triton 3.6.0: 138 of the CUDA suite's 361
variants missed in a cache that another process had filled (benchmarks/NOTES.md).

``prehash`` hashes the callees of each kernel first, depth first, and then the kernel. Every
key is then the complete one, whatever order the kernels are launched in, under every Triton
version. The package calls it once, on import, for its six kernels (~0.1 s: each source is
parsed twice). It needs no GPU. Under the interpreter (``TRITON_INTERPRET=1``) there are no
cache keys, and it does nothing.
"""

from __future__ import annotations

import ast

from triton.runtime.jit import JITFunction


def prehash(*kernels) -> None:
    """Computes ``cache_key`` of every JIT function the kernels call (by name, transitively),
    callees before callers, then of the kernels themselves."""
    seen = set()

    def visit(fn) -> None:
        if not isinstance(fn, JITFunction) or id(fn) in seen:
            return
        seen.add(id(fn))
        names = {node.id for node in ast.walk(ast.parse(fn.src)) if isinstance(node, ast.Name)}
        for name in sorted(names):
            visit(fn.fn.__globals__.get(name))
        fn.cache_key  # noqa: B018 -- computed and cached by Triton

    for kernel in kernels:
        visit(kernel)
