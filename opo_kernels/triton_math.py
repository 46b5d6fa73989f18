"""Scalar math for the Triton kernels that Triton has no portable form of (shared by the row
kernels and the epilogue). Exponentials go through exp2, which compiles to ``ex2.approx.ftz``."""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def expm1(x):
    """e^x − 1 without cancellation near 0 (Triton has no portable expm1): a degree-7 Taylor
    polynomial where |x| is small, exp(x) − 1 elsewhere (no cancellation there). Thresholds:
    0.35 in fp32 (truncation < 2e−8 relative; above it |e^x − 1| > 0.29 keeps exp's relative
    error), 0.01 in fp64 (truncation < 3e−19)."""
    if x.dtype == tl.float64:
        small = tl.abs(x) < 0.01
    else:
        small = tl.abs(x) < 0.35
    poly = x * (1 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (
        1 / 120 + x * (1 / 720 + x * (1 / 5040)))))))
    return tl.where(small, poly, tl.exp2(x * LOG2E) - 1)  # exp2: ex2.approx.ftz, as the loops


@triton.jit
def log1p(x):
    """log(1 + x) accurate for tiny x (Triton has no portable log1p): 2·atanh(y), y = x/(2 + x),
    as an odd series where |x| is small (|y| < 0.125 in fp32, truncation < 1e−9 relative;
    |y| < 0.005 in fp64), log(1 + x) elsewhere."""
    if x.dtype == tl.float64:
        small = tl.abs(x) < 0.01
    else:
        small = tl.abs(x) < 0.25
    y = x / (2 + x)
    y2 = y * y
    series = 2 * y * (1 + y2 * (1 / 3 + y2 * (1 / 5 + y2 * (1 / 7))))
    return tl.where(small, series, tl.log(1 + x))
