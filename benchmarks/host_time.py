"""The host (Python) time of one opo_loss call, forward + backward, with every Triton launch
replaced by a no-op: what the package's own Python costs per call (option checks, input
checks, allocations, autograd), without the kernels and without Triton's launch path.

    python -m benchmarks.host_time            # CPU tensors, median µs per call per mode
    python -m benchmarks.host_time --tiny     # a few calls: checks it runs, no figures to keep
    python -m benchmarks.host_time --out DIR  # also DIR/host_time.json

Why: on the H200 (2026-12-04, benchmarks/GPU_RUNS.md) a call's eager time minus its CUDA-graph
replay was 0.54-0.91 ms at N = 1024, so calls of about 1 ms (N = 4096, V = 32000) wait on the
host. That host time is this Python path plus Triton's launches and the CUDA driver; this
script measures the first part, on any machine, so that a change to it can be compared before
and after. It is a measurement, not a test: the figures depend on the CPU.
Modes: general (padded, the [:, :-1] view's gradient through autograd's slice backward),
grad_to_base (the same call as the quickstart makes it), on_policy (ref_logprobs=None, padded)
and packed. Shapes: padded [4, 64 + 1, 256], packed [256, 256], groups of 2; the kernels do not
run, so the shape only matters through the host code.

Each mode is also timed as its floor: the same step (the same views, ``autograd.grad``) through
a do-nothing ``autograd.Function`` that allocates the loss, the metrics and the gradient and
launches nothing (grad_to_base: the caller's ``x[:, :-1]`` is made, the Function gets x).
What torch itself costs per call (autograd, the slice's backward, which in the general mode
zero-fills and copies a base-sized tensor on the CPU) is in both; ours minus the floor is what
the package adds. Figures are the best of the repeats (noise on a shared
machine only ever adds time), with the median beside it.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import NamedTuple

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors; the launches are stubbed anyway

MODES = ("general", "grad_to_base", "on_policy", "packed")


class Timing(NamedTuple):
    """One mode's figures, µs per call (forward + backward): best and median of the repeats,
    ours and the floor's; launches: kernel launches per call (stubbed)."""

    best: float
    median: float
    floor_best: float
    floor_median: float
    launches: int


@contextlib.contextmanager
def stubbed_launches():
    """Inside, kernel[grid](...) does nothing and counts the launch (the outputs stay
    uninitialized, hence validate=False); yields the list of launched kernel names. The stand-in
    is one function per kernel, made once, so that it adds as little as it can to the figures
    (a new closure per launch cost ~1 µs of a ~60 µs call)."""
    from opo_kernels import row_kernels

    launched, recorders = [], {}
    # the class that defines kernel[grid]: KernelInterface, or Triton 3.4's InterpretedFunction
    owner = next(c for c in type(row_kernels._opo_fwd_kernel).__mro__
                 if "__getitem__" in c.__dict__)
    original = owner.__getitem__

    def stub(self, grid):
        record = recorders.get(id(self))
        if record is None:
            name = getattr(self, "__name__", "?")
            record = recorders[id(self)] = lambda *args, **kwargs: launched.append(name)
        return record
    owner.__getitem__ = stub
    try:
        yield launched
    finally:
        owner.__getitem__ = original


def _floor_function():
    import torch

    class DoNothing(torch.autograd.Function):
        """An OPO-shaped Function that computes nothing: a 0-dim loss and 8 metrics out, the
        gradient allocated (base-shaped) and returned."""

        @staticmethod
        def forward(ctx, x):
            metrics = x.new_empty(8)
            ctx.mark_non_differentiable(metrics)
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(x)
            return x.new_empty(()), metrics

        @staticmethod
        def backward(ctx, grad_loss, grad_metrics):
            (x,) = ctx.saved_tensors
            return torch.empty_like(x)

    return DoNothing


def _step(mode: str, floor: bool = False):
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

    if floor:
        do_nothing = _floor_function()

        def floor_step():
            x = logits.detach().requires_grad_()
            if mode == "packed":
                loss, _ = do_nothing.apply(x)
            elif mode == "grad_to_base":
                # the caller still makes the slice (~9 µs here: the view, its autograd node);
                # the loss differentiates the base itself, so the Function gets x
                sliced = x[:, :-1]  # noqa: F841 (alive until the step ends, as in the call)
                loss, _ = do_nothing.apply(x)
            else:
                loss, _ = do_nothing.apply(x[:, :-1])
            return torch.autograd.grad(loss, x)[0]
        return floor_step

    def step():
        x = logits.detach().requires_grad_()
        loss = opo_kernels.opo_loss(x if mode == "packed" else x[:, :-1], labels, ref, rewards,
                                    group_size=2, backend="triton", validate=False,
                                    grad_to_base=mode == "grad_to_base", **layout)
        return torch.autograd.grad(loss, x)[0]
    return step


def _time(step, calls: int, repeats: int) -> list:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return runs


def measure(calls: int = 300, repeats: int = 9, warmup: int = 50):
    """{mode: Timing}. Ours and the floor alternate run by run, so that a slow spell of the
    machine falls on both."""
    result = {}
    with stubbed_launches() as launched:
        for mode in MODES:
            step, floor = _step(mode), _step(mode, floor=True)
            for _ in range(warmup):
                step()
                floor()
            launched.clear()
            step()
            per_call = len(launched)
            ours, base = [], []
            for _ in range(repeats):
                ours += _time(step, calls, 1)
                base += _time(floor, calls, 1)
            result[mode] = Timing(min(ours), statistics.median(ours), min(base),
                                  statistics.median(base), per_call)
    return result


def run(tiny: bool, out=None) -> dict:
    """Measures (tiny: a few calls, a check that it runs), prints the table, saves
    out/host_time.json when out is given; returns what it saves."""
    from benchmarks.side_bench import environment, save

    result = measure(calls=5, repeats=1, warmup=2) if tiny else measure()
    print("µs per call, forward + backward, kernel launches stubbed; best (median) of the "
          "repeats")
    print(f"{'mode':<13} {'opo_kernels':>16} {'floor':>16} {'ours - floor':>13} launches")
    for mode, t in result.items():
        print(f"{mode:<13} {t.best:7.1f} ({t.median:6.1f}) {t.floor_best:7.1f} "
              f"({t.floor_median:6.1f}) {t.best - t.floor_best:13.1f} {t.launches:8d}")
    data = dict(environment(False, tiny=tiny, unit="us per call"),
                modes={mode: t._asdict() for mode, t in result.items()})
    save(out, "host_time.json", data)
    return data


def main(argv=None) -> None:
    from benchmarks.side_bench import tiny_cli
    tiny_cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
