"""The host (Python) time of one opo_loss call, forward + backward, with every Triton launch
replaced by a no-op: what the package's own Python costs per call (option checks, input
checks, allocations, autograd), without the kernels and without Triton's launch path.

    python -m benchmarks.host_time            # CPU tensors, median µs per call per mode

Why: on the H200 (2026-12-04, benchmarks/GPU_RUNS.md) a call's eager time minus its CUDA-graph
replay was 0.54-0.91 ms at N = 1024, so calls of about 1 ms (N = 4096, V = 32000) wait on the
host. That host time is this Python path plus Triton's launches and the CUDA driver; this
script measures the first part, on any machine, so that a change to it can be compared before
and after. It is a measurement, not a test: the figures depend on the CPU.
Modes: general (padded, the [:, :-1] view's gradient through autograd's slice backward),
grad_to_base (the same call as the quickstart makes it), on_policy (ref_logprobs=None, padded)
and packed. Shapes: padded [4, 64 + 1, 256], packed [256, 256], groups of 2; the kernels do not
run, so the shape only matters through the host code.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors; the launches are stubbed anyway

MODES = ("general", "grad_to_base", "on_policy", "packed")


@contextlib.contextmanager
def stubbed_launches():
    """Inside, kernel[grid](...) does nothing and counts the launch (the outputs stay
    uninitialized, hence validate=False); yields the list of launched kernel names."""
    from triton.runtime.jit import KernelInterface

    launched = []
    original = KernelInterface.__getitem__

    def stub(self, grid):
        return lambda *args, **kwargs: launched.append(getattr(self, "__name__", "?"))
    KernelInterface.__getitem__ = stub
    try:
        yield launched
    finally:
        KernelInterface.__getitem__ = original


def _step(mode: str):
    import torch

    import opo_kernels

    torch.manual_seed(0)
    B, T, V = 4, 64, 256
    rewards = torch.randn(B)
    if mode == "packed":
        logits = torch.randn(B * T, V)
        layout = {"seq_ids": torch.arange(B).repeat_interleave(T)}
        labels, ref = torch.randint(0, V, (B * T,)), torch.randn(B * T)
    else:
        logits = torch.randn(B, T + 1, V)
        layout = {"mask": torch.ones(B, T, dtype=torch.bool)}
        labels, ref = torch.randint(0, V, (B, T)), torch.randn(B, T)
    if mode == "on_policy":
        ref = None

    def step():
        x = logits.detach().requires_grad_()
        loss = opo_kernels.opo_loss(x if mode == "packed" else x[:, :-1], labels, ref, rewards,
                                    group_size=2, backend="triton", validate=False,
                                    grad_to_base=mode == "grad_to_base", **layout)
        return torch.autograd.grad(loss, x)[0]
    return step


def measure(calls: int = 300, repeats: int = 7, warmup: int = 50):
    """{mode: (median µs per call over ``repeats`` runs of ``calls`` calls, kernel launches
    per call)}."""
    result = {}
    with stubbed_launches() as launched:
        for mode in MODES:
            step = _step(mode)
            for _ in range(warmup):
                step()
            launched.clear()
            step()
            per_call = len(launched)
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    step()
                runs.append((time.perf_counter() - start) / calls * 1e6)
            result[mode] = (statistics.median(runs), per_call)
    return result


def main() -> None:
    for mode, (us, launches) in measure().items():
        print(f"{mode:<13} {us:7.1f} µs per call (forward + backward; {launches} kernel "
              f"launches, stubbed)")


if __name__ == "__main__":
    main()
