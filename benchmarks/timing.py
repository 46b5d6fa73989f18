"""The one timer of the small benchmark scripts (sweep.py, epilogue_bench.py)."""

from __future__ import annotations

import time


def median_ms(fn, cuda: bool, rep_ms: int = 100) -> float:
    """Median milliseconds per call: ``triton.testing.do_bench`` (CUDA events, L2 flushed)
    on a GPU; on the CPU one host-timed call after a warm-up (tiny modes: not a measurement)."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3
