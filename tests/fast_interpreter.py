"""Test-only: skip the Triton interpreter's redundant re-patching at nested ``@triton.jit`` calls.

Under TRITON_INTERPRET=1 a kernel launch patches ``triton.language`` (every builtin replaced by
its interpreted version, found by ``inspect.getmembers`` over the modules), runs the grid and
restores it. Every call of a ``@triton.jit`` helper *inside* the kernel patches the same modules
again (~0.7 ms each, never restored: the builtins are already the patched ones, so it changes
nothing). Our kernels call helpers per row and per block, so on the float64 gradcheck problem
(6 x 3 x 5) one ``opo_loss`` forward made 205 patch calls, 0.15 s of its 0.38 s. Here a
helper's patch is skipped when the kernel's patch in progress already covers the language
modules the helper sees; anything else falls through to Triton's own code.

Only the interpreter's bookkeeping changes: the kernels run the same interpreted operations.
``install()`` is a no-op without TRITON_INTERPRET=1 (the compiled kernels) and on a Triton
without this structure (``_patch_lang`` returning a ``_LangPatchScope``).
"""

from __future__ import annotations


def install() -> bool:
    """Wrap ``triton.runtime.interpreter._patch_lang``; True if it was (or already is)."""
    from opo_kernels.utils import interpreter_on

    if not interpreter_on():
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None:
        return False
    if getattr(original, "opo_fast", False):
        return True
    active = []  # the language modules patched by the kernel launch in progress (0 or 1 entry)

    def languages(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def patch_lang(fn):
        if active:  # a helper called inside a kernel: its scope is never restored anyway
            seen = languages(fn)
            if seen <= active[-1]:
                return scope_type()
            active[-1] |= seen  # (triton.language.standard's helpers also see tl.core)
            return original(fn)
        scope = original(fn)  # a kernel launch: the caller restores this scope when it ends
        active.append(languages(fn))
        restore = scope.restore

        def restore_and_end():
            active.clear()
            restore()

        scope.restore = restore_and_end
        return scope

    patch_lang.opo_fast, patch_lang.original = True, original
    interpreter._patch_lang = patch_lang
    return True
