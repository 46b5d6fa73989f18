"""Every kernel variant the CUDA test suite will launch, compiled for sm_90 WITHOUT a GPU.

    python -m tools.gpu.suite_variants [--workers 2] [--pytest-args "..."]    # ~15 min here

The suite on a GPU compiles one Triton variant per distinct specialization key it launches
(dtypes, constexprs, integer and alignment specialization), and a variant that fails to compile,
or spills registers, would first show up there, in the minutes of a time-limited GPU run. This
runs the same tests (``-m "not cpu_only"``) under the interpreter with a pytest plugin (this
module) that records, for each new key, the launch's arguments (a tensor as its dtype and
16-byte alignment, everything else as passed); then it rebuilds each launch from CPU tensors in
a process without the interpreter, checks that the rebuilt key is the recorded one, and compiles
it with ``aot_check.compile_launch`` (Triton's own binder, ptxas and cuobjdump). Prints the
count and compile time per kernel and every variant that failed or spilled; exit code 1 if any
did.

The compile times say how long the CUDA suite's warm-up is on one process (benchmarks/NOTES.md,
"Compile cost"); ``device_run.sh check`` runs the suite on several processes because of it.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import pickle
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from multiprocessing import Pool

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RECORD_DIR = "OPO_SUITE_VARIANTS_DIR"  # the plugin is on when this is set


class TensorArg:
    """A recorded tensor argument: only what the specialization key reads."""

    def __init__(self, t: torch.Tensor):
        self.dtype, self.aligned = t.dtype, t.data_ptr() % 16 == 0

    def rebuild(self) -> torch.Tensor:
        base = torch.empty(64, dtype=self.dtype)
        return base if self.aligned else base[1:]  # one element off: not 16-byte aligned


def make_record(fn, key: str, args, kwargs, origin: str) -> tuple:
    """(module, name, key, args, kwargs, origin) of one launch of the Python function ``fn``'s
    kernel, tensors as TensorArg: what ``compile_one`` rebuilds and compiles."""
    conv = lambda v: TensorArg(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return (fn.__module__, fn.__name__, key, [conv(a) for a in args],
            {k: conv(v) for k, v in kwargs.items()}, origin)


# --------------------------------------------------------------------------------------------
# Phase 1, the pytest plugin (in the interpreter run): record each new key's launch
# --------------------------------------------------------------------------------------------


def pytest_configure(config):
    out_dir = os.environ.get(_RECORD_DIR)
    if not out_dir:
        return
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    from tools.gpu.aot_check import specialization_key

    run = interpreter.InterpretedFunction.run
    jit, seen = {}, set()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    out = open(os.path.join(out_dir, f"launches.{worker}.pkl"), "ab")  # noqa: SIM115

    def recording_run(self, *args, grid, warmup, **kwargs):
        if self.fn not in jit:  # the real JIT function, for its binder (nothing is compiled)
            jit[self.fn] = JITFunction(self.fn, **self.kwargs)
        key = specialization_key(jit[self.fn], args, kwargs)
        if key not in seen:
            seen.add(key)
            pickle.dump(make_record(self.fn, key, args, kwargs,
                                    os.environ.get("PYTEST_CURRENT_TEST", "")), out)
            out.flush()
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run


# --------------------------------------------------------------------------------------------
# Phase 2 (no interpreter): rebuild and compile each recorded launch
# --------------------------------------------------------------------------------------------


def load(out_dir: str) -> list:
    records = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "launches.*.pkl"))):
        with open(path, "rb") as f:
            while True:
                try:
                    rec = pickle.load(f)
                except EOFError:
                    break
                records.setdefault(rec[2], rec)
    return list(records.values())


def compile_one(rec) -> tuple:
    """(seconds, kernel name, "ok" / "spills N B" / "key mismatch" / "failed: ...", test)."""
    from tools.gpu.aot_check import compile_launch, inspect_compiled, specialization_key
    from tools.gpu.suite_variants import TensorArg  # the class pickled (not __main__'s copy)

    module, name, key, args, kwargs, test = rec
    kernel = getattr(importlib.import_module(module), name)
    rebuild = lambda v: v.rebuild() if isinstance(v, TensorArg) else v  # noqa: E731
    args, kwargs = [rebuild(a) for a in args], {k: rebuild(v) for k, v in kwargs.items()}
    start = time.perf_counter()
    if specialization_key(kernel, args, kwargs) != key:
        return 0.0, name, "key mismatch", test
    try:
        spill = inspect_compiled(compile_launch(kernel, args, kwargs, 90))["spill_bytes"]
    except Exception as e:  # report every failing variant, not only the first
        return time.perf_counter() - start, name, f"failed: {e!r}"[:1500], test
    return time.perf_counter() - start, name, "ok" if spill == 0 else f"spills {spill} B", test


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--pytest-args", default="", help="extra arguments for the suite run")
    parser.add_argument("--dir", help="keep the recorded launches here (default: a temp dir)")
    args = parser.parse_args(argv)
    out_dir = args.dir or tempfile.mkdtemp(prefix="opo_suite_variants_")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, TRITON_INTERPRET="1", **{_RECORD_DIR: out_dir},
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    suite = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-p", "tools.gpu.suite_variants", "-m", "not cpu_only",
                            "-n", str(args.workers), *shlex.split(args.pytest_args)], cwd=REPO,
                           env=env)
    print(f"[suite_variants] interpreter suite: exit code {suite.returncode}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    records = load(out_dir)
    print(f"[suite_variants] {len(records)} distinct kernel variants launched", flush=True)
    os.environ.pop("TRITON_INTERPRET", None)  # the pool's processes compile real JIT functions
    return int(bool(compile_records(records, args.workers, "suite launches"))
               or suite.returncode != 0)


def compile_records(records: list, workers: int, label: str) -> int:
    """Compiles the records for sm_90 on `workers` processes and prints the count and compile
    time per kernel and every variant that failed, spilled or did not rebuild; returns the
    number of those. (tools/gpu/precompile.py compiles under the GPU image's cache key: each
    process applies it first.)"""
    from tools.gpu.triton_key import apply_key_from_env

    start = time.perf_counter()
    with Pool(workers, initializer=apply_key_from_env) as pool:
        results = pool.map(compile_one, records, chunksize=1)
    per_kernel = defaultdict(lambda: [0, 0.0])
    for seconds, name, _, _ in results:
        per_kernel[name][0] += 1
        per_kernel[name][1] += seconds
    print(f"[suite_variants] {label}: {len(records)} variants compiled for sm_90 in "
          f"{time.perf_counter() - start:.0f} s on {workers} processes; per kernel "
          "(variants, sum of compile seconds):")
    for name, (count, seconds) in sorted(per_kernel.items()):
        print(f"  {name:<24} {count:4d} {seconds:8.1f}")
    bad = [r for r in results if r[2] != "ok"]
    for _, name, status, test in bad:
        print(f"  BAD {name}: {status} (first launched by {test})")
    print(f"[suite_variants] {len(bad)} variant(s) failed, spilled or did not rebuild",
          flush=True)
    return len(bad)


if __name__ == "__main__":
    raise SystemExit(main())
