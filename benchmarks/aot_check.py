"""Compile every kernel variant for a Hopper GPU (sm_90) WITHOUT a GPU, and report each one's
registers, spills (local memory) and shared memory from the cubin.

The CPU tests run the kernels under the Triton interpreter, which executes them in NumPy and so
never sees compiled-mode problems (an unsupported construct, a type error in a branch, register
spills). Triton ships ptxas and cuobjdump, so the real compiler can run here:

    python -m benchmarks.aot_check            # table of every variant
    python -m benchmarks.aot_check --arch 100 # another target (e.g. Blackwell)

Must run with TRITON_INTERPRET unset (the kernels are then real JIT functions).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from typing import Dict, List

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from opo_kernels import fused_opo as F

# (logits dtype, accumulator dtype, BLOCK_V from the launch table)
DTYPES = [("bf16", tl.float32, "fp32"), ("fp16", tl.float32, "fp32"),
          ("fp32", tl.float32, "fp32"), ("fp64", tl.float64, "fp64")]
_TORCH = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def _block(dt: str) -> int:
    import torch
    block, _ = F.launch_config(1 << 20, getattr(torch, _TORCH[dt]))
    return block


def _num_warps(dt: str) -> int:
    import torch
    return F.launch_config(1 << 20, getattr(torch, _TORCH[dt]))[1]


def _row_args(dt: str, acc: str) -> Dict[str, str]:
    return {"seq_len": "i64", "V": "i32", "stride_b": "i64", "stride_t": "i32",
            "stride_v": "i32", "grad_stride_b": "i64", "grad_stride_t": "i32",
            "grad_stride_v": "i32", "inv_temperature": "fp32"}


def variants() -> List[tuple]:
    """(name, kernel, signature, constexprs, num_warps) for every variant the launchers use."""
    out = []
    for dt, acc_tl, acc in DTYPES:
        rows = _row_args(dt, acc)
        for ent in (False, True):
            for write_grad in (False, True):
                sig = {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "seq_ptr": "*i64",
                       "logprobs_ptr": f"*{acc}", "stats_ptr": f"*{acc}",
                       "entropy_ptr": f"*{acc}", "grad_ptr": f"*{dt}", "coef_ptr": f"*{acc}",
                       "entropy_coef_ptr": f"*{acc}", **rows,
                       "WITH_ENTROPY": "constexpr", "WRITE_GRAD": "constexpr",
                       "ACC": "constexpr", "BLOCK_V": "constexpr"}
                name = f"fwd-{dt}{'-entropy' if ent else ''}{'-onepass' if write_grad else ''}"
                out.append((name, F._opo_fwd_kernel, sig,
                            {"WITH_ENTROPY": ent, "WRITE_GRAD": write_grad, "ACC": acc_tl,
                             "BLOCK_V": _block(dt)}, _num_warps(dt)))
            sig = {"logits_ptr": f"*{dt}", "grad_ptr": f"*{dt}", "labels_ptr": "*i64",
                   "seq_ptr": "*i64", "stats_ptr": f"*{acc}", "entropy_ptr": f"*{acc}",
                   "coef_ptr": f"*{acc}", "entropy_coef_ptr": f"*{acc}", **rows,
                   "WITH_ENTROPY": "constexpr", "ACC": "constexpr", "BLOCK_V": "constexpr"}
            out.append((f"bwd-{dt}{'-entropy' if ent else ''}", F._opo_bwd_kernel, sig,
                        {"WITH_ENTROPY": ent, "ACC": acc_tl, "BLOCK_V": _block(dt)},
                        _num_warps(dt)))
        sig = {"grad_ptr": f"*{dt}", "scale_ptr": f"*{acc}", "seq_ptr": "*i64",
               "seq_len": "i64", "V": "i32", "grad_stride_b": "i64", "grad_stride_t": "i32",
               "grad_stride_v": "i32", "ACC": "constexpr", "BLOCK_V": "constexpr"}
        out.append((f"scale-{dt}", F._scale_kernel, sig, {"ACC": acc_tl, "BLOCK_V": _block(dt)},
                     _num_warps(dt)))
    return out


def _cuobjdump() -> str:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    path = os.path.join(here, "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG / LOCAL (spill bytes) / SHARED of the one function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", text.split("Function", 1)[1]))
    return {k: int(v) for k, v in fields.items()}


def compile_variant(kernel, signature, constexprs, num_warps, arch: int = 90):
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    print(f"{'variant':<28}{'warps':>6}{'BLOCK_V':>9}{'regs':>6}{'spill B':>9}{'smem B':>8}")
    for name, kernel, sig, consts, warps in variants():
        compiled = compile_variant(kernel, sig, consts, warps, args.arch)
        use = resource_usage(compiled.asm["cubin"])
        print(f"{name:<28}{warps:>6}{consts['BLOCK_V']:>9}{use.get('REG', -1):>6}"
              f"{use.get('LOCAL', -1):>9}{use.get('SHARED', -1):>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
