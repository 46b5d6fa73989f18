"""Timers (CUDA events, one loop for every implementation; the host clock without CUDA), the
copy bandwidth and matmul rate measured in the same run, and the peak memory of one call."""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List

import torch

from benchmarks.runners import Runner

# The bf16 matmul rate, measured once per run: [M, K] @ [K, N] (time_cuda median on CUDA; a
# small one on the host clock in tiny CPU mode, only so that the fields exist).
MATMUL_SHAPE = (8192, 8192, 8192)
MATMUL_SHAPE_TINY = (256, 256, 256)



@dataclass
class Timing:
    ms: float       # median
    p20: float
    p80: float
    reps: int
    timer: str


def _quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_host(fn, setup=None, warmup: int = 1, reps: int = 3) -> Timing:
    """Host-clock fallback (no CUDA): median of `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(reps):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  reps, "host-clock")


TIMER = "cuda-events"   # the one device timer (time_cuda)


def _events_once(fn, setup, flush: torch.Tensor) -> float:
    """One timed call: setup (restore an in-place input), L2 flush, then the device is
    synchronized, so the events measure the call from an idle device: its host time (Python,
    launches) counts for every implementation alike, none hides it behind queued work."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if setup:
        setup()
    flush.zero_()
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_cuda(fn, setup=None, warmup_ms: float = 25, rep_ms: float = 200,
              max_rep_ms: float = 4000, min_reps: int = 10) -> Timing:
    """CUDA-event median of fn(), the same loop for every implementation (``_events_once``:
    L2 flushed, device idle at the start, setup() — the restore of an in-place input — before
    each call, outside the events).

    The repeat time is scaled to the call's duration: at least `min_reps` runs or `rep_ms`.
    """
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    est = statistics.median(_events_once(fn, setup, flush) for _ in range(3))
    warmup = max(warmup_ms, 3 * est)
    rep = min(max(rep_ms, min_reps * est), max(max_rep_ms, 3 * est))
    for _ in range(max(1, int(warmup / max(est, 1e-3)))):
        if setup:
            setup()
        fn()
    times = [_events_once(fn, setup, flush)
             for _ in range(max(min_reps, int(rep / max(est, 1e-3))))]
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  len(times), TIMER)


def copy_bandwidth(device: torch.device) -> Dict[str, float]:
    """Device-to-device copy, bytes read + bytes written over the median time."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info()
        nbytes = int(min(2 << 30, free // 4))
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t = time_cuda(lambda: dst.copy_(src))
        del src, dst
        torch.cuda.empty_cache()
    else:
        nbytes = 64 << 20
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        t = time_host(lambda: dst.copy_(src), warmup=2, reps=5)
    return {"copy_gbps": 2 * nbytes / (t.ms * 1e-3) / 1e9, "copy_bytes": 2 * nbytes,
            "copy_ms": t.ms, "copy_timer": t.timer}


def matmul_rate(device: torch.device) -> Dict[str, object]:
    """The bf16 matmul rate of this device: 2·M·N·K FLOPs over the median time of one
    torch.matmul([M, K], [K, N]) (time_cuda on CUDA; host clock, small shape, without CUDA)."""
    m, n, k = MATMUL_SHAPE if device.type == "cuda" else MATMUL_SHAPE_TINY
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, dtype=torch.bfloat16, device=device, generator=gen)
    b = torch.randn(k, n, dtype=torch.bfloat16, device=device, generator=gen)
    if device.type == "cuda":
        t = time_cuda(lambda: torch.matmul(a, b))
    else:
        t = time_host(lambda: torch.matmul(a, b), warmup=1, reps=5)
    return {"matmul_tflops": 2 * m * n * k / (t.ms * 1e-3) / 1e12, "matmul_shape": [m, n, k],
            "matmul_dtype": "bfloat16", "matmul_ms": t.ms, "matmul_timer": t.timer}


def measure_peak(runner: Runner, setup, device: torch.device) -> int:
    """Peak allocated bytes during one call, above what was allocated before it (inputs,
    pristine copy). -1 without CUDA (not measured)."""
    if device.type != "cuda":
        return -1
    if setup:
        setup()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)
