"""Byte counts (the roofline's numerator), the fused-linear FLOP floor, and the memory
estimates that skip rows which cannot fit (benchmarks/NOTES.md)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from benchmarks.cases import DTYPES, INPLACE_IMPLS, LINEAR_FLOOR_MATMULS, Case, Shape
from benchmarks.inputs import batch_geometry

# Peak extra memory of the eager reference per counted logit element, measured on CPU
# (peak RSS minus RSS before the call, B=6, T=400, V=32000, bf16 and fp32 alike: 20.2 bytes
# per counted element, the returned gradient included). Used only to skip rows that cannot
# fit; rows that fit by this estimate but run out of memory are skipped with the OOM message.
EAGER_BYTES_PER_COUNTED_ELEMENT = 20
MEMORY_MARGIN = 1.1       # estimates are multiplied by this
MEMORY_FRACTION = 0.92    # of the device memory that a row may plan to use
FLOOR_MATMULS = 4         # the general fused-linear floor: logits, logits again in backward,
                          # dhidden, dweight (per implementation: cases.LINEAR_FLOOR_MATMULS)



def byte_counts(shape: Shape, b: int, t: int) -> Dict[str, int]:
    """Minimum bytes of one forward+backward call (benchmarks/NOTES.md).

    effective: 2 reads + 1 write of the N counted logits rows, 3·N·V·itemsize, plus the small
               vectors (labels int64, ref_logprobs fp32, mask/seq_ids int64 per counted token,
               rewards fp32 per sequence). Every implementation is credited with this count.
    dense:     the padded layout's gradient is a dense [B, T, V] tensor, so its B·T rows are
               all written (zeros where not counted): 2·N·V·s + B·T·V·s (+ small vectors).
    """
    if shape.linear:
        return linear_byte_counts(shape)
    s = DTYPES[shape.dtype].itemsize
    n, v = shape.N, shape.V
    rows = b * t if shape.layout == "padded" else n
    small = n * (8 + 4 + 8) + b * 4
    return {"effective": 3 * n * v * s + small, "dense": 2 * n * v * s + rows * v * s + small}


def linear_byte_counts(shape: Shape) -> Dict[str, int]:
    """Fused-linear rows: hidden [B, T, H] and weight [V, H] read once, their gradients written
    once, in the input dtype: 2·(B·T + V)·H·itemsize, plus the small vectors (labels int64,
    ref_logprobs fp32, mask int64 per counted token; rewards fp32 and group ids int64 per
    sequence). No [N, V] term: a fused implementation need not move any logits through memory.
    The op is compute-bound (x_floor is its figure of merit); "dense" = "effective"."""
    s = DTYPES[shape.dtype].itemsize
    b, t, h, v, n = shape.B, shape.T, shape.H, shape.V, shape.N
    rows = n if shape.layout == "packed" else b * t
    total = 2 * (rows + v) * h * s + n * (8 + 4 + 8) + b * (4 + 8)
    return {"effective": total, "dense": total}


def linear_flops(shape: Shape, rows: Optional[int] = None,
                 impl: Optional[str] = None) -> float:
    """FLOPs of the floor's matmuls of 2·rows·H·V each (rows: N counted tokens unless given,
    e.g. B·T for all rows of the padded layout): FLOOR_MATMULS, or the implementation's own
    mode's count (``cases.LINEAR_FLOOR_MATMULS``: 3 on-policy / logits held)."""
    rows = shape.N if rows is None else rows
    matmuls = FLOOR_MATMULS if impl is None else LINEAR_FLOOR_MATMULS[impl]
    return float(matmuls * 2 * rows * shape.H * shape.V)


def memory_estimate(case: Case) -> Tuple[int, int]:
    """(bytes of the inputs incl. a pristine copy for in-place impls, extra bytes of a call)."""
    shape = case.shape
    s = DTYPES[shape.dtype].itemsize
    b, t = batch_geometry(shape)
    n, v = shape.N, shape.V
    rows = b * t if shape.layout == "padded" else n
    if shape.linear:
        h = shape.H
        inputs = (rows + v) * h * s
        fused = rows * h * s + v * h * (4 + 2 * s) + (256 << 20)
        liger = v * h * (4 + 2 * s) + 2 * rows * h * s + (256 << 20)
        extra = {
            # dhidden, fp32 dweight accumulator, one [V, H] product per chunk, the cast to
            # the dtype, one chunk of logits (<= 256 MiB)
            "opo_kernels_fused_linear": fused,
            # + the [N, H] / [V, H] gradients held from forward to backward
            "opo_kernels_fused_linear_on_policy": fused + rows * h * 4,
            # + every row's logits held
            "opo_kernels_fused_linear_budget": fused + rows * v * s,
            # logits and their gradient [B, T, V], dhidden, dweight
            "opo_kernels_materialized": 2 * rows * v * s + rows * h * s + 2 * v * h * s,
            # fp32 dhidden and dweight accumulators, their casts, vocabulary tiles
            "cce": (rows + v) * h * (4 + s) + (1 << 30),
            "cce_filtered": (rows + v) * h * (4 + s) + (1 << 30),
            # + the counted rows' logits (kept for backward), their fp32 gradient and its cast
            "cce_torch_compile": (rows + v) * h * (4 + s) + n * v * (4 + 2 * s) + (1 << 30),
            "trl_head": (rows + v) * h * (4 + s) + 2 * (4096 * 32768 * s),
            # the counted rows gathered, dhidden and dweight, fp32 chunk logits (its
            # aspect-ratio chunks hold about as many logits as hidden has values)
            "torch_lce": (rows + v) * h * (4 + s) + n * h * (8 + s) + (1 << 30),
            # per chunk fp32 dweight + its cast, the dtype accumulator, dhidden twice (list +
            # cat), fp32 [2048, 4096] vocab-chunk temporaries
            "liger_fused_linear_gspo": liger,
            "liger_fused_linear_gspo_tf32": liger,
            "liger_fused_linear_gspo_tf32_chunkB": liger,  # 0.8.5: 2048-row logit tiles
        }[case.impl]
        return inputs, extra
    if case.impl == "liger_ce":
        inputs = rows * v * s
    elif shape.layout == "padded":
        inputs = b * (t + 1) * v * s
    else:
        inputs = n * v * s
    if case.impl in INPLACE_IMPLS:
        inputs *= 2  # the pristine copy the timer restores from
    grad = rows * v * s
    extra = {
        "opo_kernels": grad, "opo_kernels_inplace": 0, "liger_gspo": 0, "liger_ce": 0,
        "liger_grpo_token": 0,
        "liger_gspo_noinplace": b * (t + 1) * v * s,
        # the slice's gradient + the slice backward's zero-filled [B, T+1, V]; or the latter only
        "opo_kernels_model_slice": grad + b * (t + 1) * v * s,
        "opo_kernels_grad_to_base": b * (t + 1) * v * s,
        "eager": EAGER_BYTES_PER_COUNTED_ELEMENT * n * v,
        "compile": EAGER_BYTES_PER_COUNTED_ELEMENT * n * v,  # assumed like eager
        # the gradient [B, T, V] and Inductor's fp32 row statistics
        "torch_compiled": grad,
    }[case.impl]
    return inputs, extra
