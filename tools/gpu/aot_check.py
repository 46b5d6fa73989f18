"""Compile every kernel variant the package launches for a Hopper GPU (sm_90) WITHOUT a GPU,
exactly as the JIT would specialize it, and report registers, spills, 16-byte accesses and the
exponential instructions, from the PTX and the cubin (Triton ships ptxas and cuobjdump).

    python -m tools.gpu.aot_check            # table
    python -m tools.gpu.aot_check --json     # the same as JSON (tests/test_aot_compile.py)
    python -m tools.gpu.aot_check --arch 100 # another target

The arguments are those of a real launch: each variant calls the package's own launcher with
small CPU tensors shaped like production inputs (a bf16 ``[4, 65, 151936][:, :-1]`` view, ...)
while the kernel objects are replaced by recorders, then compiles the real kernel with the
recorded arguments through Triton's binder (so pointer alignment, integer specialization and
``do_not_specialize`` act as in ``kernel[grid](...)``). Compiling from hand-written signatures
(as this file once did) compiles code that never runs: a stride the launcher passes as an
aligned specialized int is a different kernel from one typed ``i32`` by hand.

Must run with TRITON_INTERPRET unset (the kernels are then real JIT functions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
from typing import Callable, Dict, List

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from opo_kernels import OPOLossConfig, epilogue, from_logprobs, row_launch, tp_combine
from opo_kernels.epilogue import kernel as epilogue_kernel_module
from opo_kernels.inputs import prepare, prepare_logprobs

# --------------------------------------------------------------------------------------------
# Capturing the arguments of real launches
# --------------------------------------------------------------------------------------------

# (module that launches it, kernel's name there): the recorder replaces the name at the launch site
_KERNELS = [(row_launch, "_opo_fwd_kernel"), (row_launch, "_opo_bwd_kernel"),
            (row_launch, "_scale_kernel"), (epilogue_kernel_module, "epilogue_kernel"),
            (from_logprobs, "_logprob_grad_kernel"), (tp_combine, "_combine_kernel")]


class _Recorder:
    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel, args, kwargs))
        return launch


@contextlib.contextmanager
def recording():
    """Replaces the package's kernels by recorders; yields the list of (kernel, args, kwargs)."""
    log: List[tuple] = []
    saved = [(module, name, getattr(module, name)) for module, name in _KERNELS]
    for module, name, kernel in saved:
        setattr(module, name, _Recorder(kernel, log))
    try:
        yield log
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def _bind(kernel, args, kwargs, arch: int):
    """Triton's binder for sm_<arch>: (backend, keyword arguments, bound, specialization,
    options), as ``kernel[grid](*args, **kwargs)`` computes them."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kw = dict(kwargs)
    kw.setdefault("debug", False)
    kw.setdefault("instrumentation_mode", "")
    return (backend, kw, *binder(*args, **kw))


def specialization_key(kernel, args, kwargs, arch: int = 90) -> str:
    """The part of the JIT cache key that the arguments decide (dtypes, constexprs, integer
    and alignment specialization, launch options): equal keys share one compiled kernel."""
    _, _, _, specialization, options = _bind(kernel, args, kwargs, arch)
    opts = options if isinstance(options, dict) else vars(options)
    return f"{kernel.fn.__name__}{specialization}{sorted(opts.items())}"


def launch_source(kernel, args, kwargs, arch: int = 90):
    """(backend, ASTSource, options) that ``kernel[grid](*args, **kwargs)`` compiles on
    sm_<arch>: what Triton's cache key is made of (tools/gpu/precompile.py compares it)."""
    backend, kw, bound, specialization, options = _bind(kernel, args, kwargs, arch)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization,
                                                              options)
    return backend, ASTSource(kernel, signature, constexprs, attrs), options


def compile_launch(kernel, args, kwargs, arch: int = 90):
    """The CompiledKernel that ``kernel[grid](*args, **kwargs)`` would run on sm_<arch>."""
    backend, src, options = launch_source(kernel, args, kwargs, arch)
    return triton.compile(src, target=backend.target, options=options.__dict__)


# --------------------------------------------------------------------------------------------
# The variants: real launchers on production-shaped CPU tensors
# --------------------------------------------------------------------------------------------

B, T, V = 4, 64, 151936  # a production row length; few rows (only shapes and strides matter)


def _rows(dtype, packed=False):
    full = torch.empty(B, T + 1, V, dtype=dtype)
    labels = torch.zeros(B, T + 1, dtype=torch.long)[:, 1:]
    if packed:
        logits = full.view(-1, V)[: B * T]
        return logits, row_launch.Rows(labels.reshape(-1), None, torch.zeros(B * T,
                                       dtype=torch.long), None, B * T, None, B)
    mask = torch.ones(B, T, dtype=torch.bool)
    return full[:, :-1], row_launch.Rows(labels, mask, None, torch.zeros(B, T), B * T, T, B)


def _params(dtype=torch.float32):
    return epilogue.params_tensor(OPOLossConfig(), "cpu", dtype)


def _fwd(dtype, entropy=False, one_pass=False, partial=False, packed=False):
    def run():
        logits, rows = _rows(dtype, packed)
        cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        extra = {}
        if one_pass:
            extra = dict(grad=torch.empty_like(logits), coef=torch.zeros(B, 2, dtype=cdtype),
                         scal=torch.zeros(2, dtype=cdtype))
        if partial:
            extra = dict(partials=torch.empty(B * T, 4, dtype=cdtype), vocab_start=V)
        row_launch.forward_rows(logits, rows, _params(cdtype), entropy, **extra)
    return run


def _bwd(dtype, entropy=False, level="sequence_mean"):
    def run():
        logits, rows = _rows(dtype)
        cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        z = lambda *shape: torch.zeros(*shape, dtype=cdtype)  # noqa: E731
        row_launch.backward_rows(logits, rows, z(B * T), z(B * T, 2), z(B * T) if entropy
                                 else None, z(B, 2), z(2), z(()), _params(cdtype), level,
                                 "ratio", inplace=False)
    return run


def _scale(dtype):
    def run():
        logits, rows = _rows(dtype)
        row_launch.scale_rows_(logits, rows, torch.ones(()))
    return run


def _epilogue(packed, cdtype=torch.float32, group_ids=False, validate=True):
    def run():
        cfg = OPOLossConfig()
        n = 64
        logits = torch.empty(()).expand(n, V) if packed else torch.empty(()).expand(B, n // B, V)
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long)
        ref = torch.zeros(logits.shape[:-1])
        layout = dict(seq_ids=torch.arange(n) % B) if packed else dict(mask=labels == 0)
        layout.update(dict(group_ids=torch.arange(B) // 2) if group_ids else dict(group_size=2))
        batch = prepare(logits.to(cdtype), labels, ref, torch.zeros(B), config=cfg, **layout)
        epilogue.run_epilogue(batch, epilogue.Mode.of(cfg, False), _params(cdtype),
                              torch.zeros(1, dtype=torch.int32),
                              logprobs=torch.zeros(labels.shape, dtype=cdtype),
                              stats=torch.zeros(n, 2, dtype=cdtype), validate=validate)
    return run


def _logprob_grad():
    def run():
        cfg = OPOLossConfig(adaptive_tau=False)
        lp = torch.zeros(B, T)
        batch = prepare_logprobs(lp, lp, torch.zeros(B), mask=lp == 0, group_size=2, config=cfg)
        rows = row_launch.Rows.of(batch)
        from_logprobs.logprob_gradients(rows, lp, lp, torch.zeros(B, 2), torch.zeros(2),
                                        torch.ones(()), "token", "ratio")
    return run


def _combine(cdtype, entropy, world=8):
    """The vocabulary-parallel combine of [world·N, 4] gathered partials (N = B·T rows)."""
    def run():
        n = B * T
        out = (torch.empty(n, dtype=cdtype), torch.empty(n, 2, dtype=cdtype),
               torch.empty(n, dtype=cdtype) if entropy else None)
        tp_combine.combine_gathered(torch.empty(world * n, 4, dtype=cdtype), world,
                                    _params(cdtype), entropy, out)
    return run


def _pipelined(run, config=(8192, 16, 2)):
    """A variant launched with a launch config other than the table's (a sweep candidate; by
    default a software-pipelined vocabulary loop)."""
    def wrapped():
        row_launch.LAUNCH_OVERRIDE = lambda kind, vocab, dtype: config
        try:
            run()
        finally:
            row_launch.LAUNCH_OVERRIDE = None
    return wrapped


VARIANTS: Dict[str, Callable[[], None]] = {
    "fwd-bf16": _fwd(torch.bfloat16),
    "fwd-bf16-entropy": _fwd(torch.bfloat16, entropy=True),
    "fwd-bf16-onepass": _fwd(torch.bfloat16, one_pass=True),
    "fwd-bf16-entropy-onepass": _fwd(torch.bfloat16, entropy=True, one_pass=True),
    "fwd-bf16-partial": _fwd(torch.bfloat16, entropy=True, partial=True),
    "fwd-bf16-packed": _fwd(torch.bfloat16, packed=True),
    "fwd-fp16": _fwd(torch.float16),
    "fwd-fp32": _fwd(torch.float32),
    "fwd-fp64": _fwd(torch.float64),
    "bwd-bf16": _bwd(torch.bfloat16),
    "bwd-bf16-entropy-token": _bwd(torch.bfloat16, entropy=True, level="token"),
    "bwd-fp16": _bwd(torch.float16),
    "bwd-fp32": _bwd(torch.float32),
    "bwd-fp64": _bwd(torch.float64),
    "scale-bf16": _scale(torch.bfloat16),
    "fwd-bf16-stages2": _pipelined(_fwd(torch.bfloat16)),
    "bwd-bf16-stages2": _pipelined(_bwd(torch.bfloat16)),
    "fwd-bf16-onepass-stages2": _pipelined(_fwd(torch.bfloat16, one_pass=True)),
    # programs that loop over rows (LaunchConfig.programs_per_sm), another sweep candidate
    "fwd-bf16-onepass-persistent": _pipelined(_fwd(torch.bfloat16, one_pass=True),
                                              config=(8192, 16, 1, 1)),
    "fwd-bf16-persistent": _pipelined(_fwd(torch.bfloat16), config=(4096, 2, 1, 2)),
    # the one-pass gradient pass in the forward block order (the table walks it backwards)
    "fwd-bf16-onepass-forward": _pipelined(_fwd(torch.bfloat16, one_pass=True),
                                           config=(4096, 4, 1, 0, False)),
    "epilogue-padded": _epilogue(packed=False),
    "epilogue-packed-ids": _epilogue(packed=True, group_ids=True),
    "epilogue-padded-fp64": _epilogue(packed=False, cdtype=torch.float64, validate=False),
    "logprob-grad": _logprob_grad(),
    "combine-tp8": _combine(torch.float32, entropy=False),
    "combine-tp8-entropy": _combine(torch.float32, entropy=True),
    "combine-tp8-fp64": _combine(torch.float64, entropy=True),
}

# --------------------------------------------------------------------------------------------
# Reading the compiled code
# --------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return here if os.path.exists(here) else name


def inspect_compiled(compiled) -> Dict[str, int]:
    """Registers, spills and the accesses/instructions that matter, from the cubin and PTX."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", usage.split("Function", 1)[1]))
    ptx = compiled.asm["ptx"]
    return {
        "regs": int(fields.get("REG", -1)), "spill_bytes": int(fields.get("LOCAL", -1)),
        "smem_bytes": int(fields.get("SHARED", -1)),
        "num_warps": compiled.metadata.num_warps,
        "ld_v4": len(re.findall(r"ld\.global[^\n]*\.v4", ptx)),
        "st_v4": len(re.findall(r"st\.global[^\n]*\.v4", ptx)),
        "ldg128": len(re.findall(r"LDG\.E\.128", sass)),
        "stg128": len(re.findall(r"STG\.E\.128", sass)),
        "ex2_ftz": ptx.count("ex2.approx.ftz.f32"),
        "ex2_nonftz": ptx.count("ex2.approx.f32"),
        # 16-byte asynchronous copies global -> shared: the pipelined loop's prefetch
        "cp_async16": len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^\n]*, (?:16|0x10)\b",
                                     ptx)),
        "smem_dynamic": compiled.metadata.shared,
    }


def check(arch: int = 90, only=None) -> Dict[str, Dict[str, int]]:
    results = {}
    for name, run in VARIANTS.items():
        if only and name not in only:
            continue
        with recording() as log:
            run()
        (kernel, args, kwargs), *rest = log
        assert not rest, f"{name}: {len(log)} launches"
        results[name] = {"kernel": kernel.fn.__name__,
                         **inspect_compiled(compile_launch(kernel, args, kwargs, arch))}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", nargs="*", help="variant names")
    args = parser.parse_args(argv)
    results = check(args.arch, args.only)
    if args.json:
        print(json.dumps({"triton": triton.__version__, "arch": args.arch, "variants": results}))
        return 0
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    cols = ("num_warps", "regs", "spill_bytes", "ld_v4", "st_v4", "ldg128", "stg128", "ex2_ftz",
            "ex2_nonftz", "cp_async16", "smem_dynamic")
    print(f"{'variant':<28}" + "".join(f"{c:>13}" for c in cols))
    for name, row in results.items():
        print(f"{name:<28}" + "".join(f"{row[c]:>13}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
