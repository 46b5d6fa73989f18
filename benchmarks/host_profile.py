"""Where a loss call's host time goes on the GPU machine, per part, at trainer micro-batch
sizes; one short run (~1-2 min on an H100/H200).

    python -m benchmarks.host_profile [--out DIR]   # CUDA: JSON + printed tables + traces
    python -m benchmarks.host_profile --tiny        # CPU (interpreter): runs, no timing claim

For each shape (bf16, N = 1024 and 4096 counted tokens, V = 151936 and 32000, padded; and the
packed N = 4096, V = 32000, the row where Liger's cross-entropy was faster) and mode
(general: ref_logprobs given; on_policy: ref_logprobs=None), one forward + backward step:

1. ``eager_ms`` and ``graph_ms`` with the benchmark's timer (benchmarks/timers.py: CUDA events,
   device idle at the start of each call), validate=False: eager − graph is the time the GPU
   waits for the host. Again with Triton's launch path for every launch (``triton_path``:
   the remembered variants of opo_kernels/launches.py off), and eager with validate=True and
   "deferred" (graph capture cannot validate).
2. ``parts_us``: the host time of each part of a call, median µs per call over back-to-back
   calls (no synchronization): the call up to the autograd Function (``opo_loss`` minus
   ``Function.forward``: options, signature, Batch), the small allocations (``scratch``),
   each kernel launch (``launch:<kernel>``, direct and through Triton's binder), the value
   check, our backward's Python, and ``autograd`` = the rest of the step (Function.apply,
   the engine, autograd.grad). Measured by wrapping those functions with perf_counter.
3. ``profile``: torch.profiler (CPU + CUDA activity) over a few steps of the first shape:
   the top host ops by self CPU time, saved as a table, and a Chrome trace per mode.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

from benchmarks.results import recorded_commit
from benchmarks.side_bench import environment, save, tiny_cli

SHAPES = {"N1024-V151936": (1024, 151936, "padded"), "N4096-V32000": (4096, 32000, "padded"),
          "N1024-V32000": (1024, 32000, "padded"),
          "N4096-V32000-packed": (4096, 32000, "packed")}


@contextlib.contextmanager
def wrapped():
    """Times the package's host parts: yields {label: [ns per call]} while active."""
    from opo_kernels import call_plan, fused_opo, launches

    samples = {}
    patches = []

    def wrap(owner, name, label, static=False):
        original = owner.__dict__[name]
        fn = original.__func__ if static else original

        def timed(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                key = label(args) if callable(label) else label
                samples.setdefault(key, []).append(time.perf_counter_ns() - start)
        setattr(owner, name, staticmethod(timed) if static else timed)
        patches.append((owner, name, original))

    wrap(fused_opo, "opo_loss_with_config", "opo_loss")
    wrap(fused_opo.FusedOPOFunction, "forward", "Function.forward", static=True)
    wrap(fused_opo.FusedOPOFunction, "backward", "Function.backward", static=True)
    wrap(call_plan.CallPlan, "scratch", "scratch")
    wrap(launches.Launch, "__call__", lambda a: "launch:" + a[0].kernel.fn.__name__)
    wrap(fused_opo, "check_values_of", "check_values")
    try:
        yield samples
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


_BACKWARD_KERNELS = ("launch:_opo_bwd_kernel", "launch:_scale_kernel")


def _parts(step, calls: int):
    """Median µs per call of each part (a part run k times per call counts k times)."""
    import torch

    for _ in range(min(calls, 5)):
        step()
    with wrapped() as samples:
        totals = []
        for _ in range(calls):
            start = time.perf_counter_ns()
            step()
            totals.append(time.perf_counter_ns() - start)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    us = {k: statistics.median(v) / 1e3 * len(v) / calls for k, v in samples.items()}
    launches = {k: v for k, v in us.items() if k.startswith("launch:")}
    forward_launches = sum(v for k, v in launches.items() if k not in _BACKWARD_KERNELS)
    backward_launches = sum(v for k, v in launches.items() if k in _BACKWARD_KERNELS)
    forward, backward = us["Function.forward"], us["Function.backward"]
    out = {"step": statistics.median(totals) / 1e3,
           # options, signature lookup, Batch, and Function.apply's own overhead
           "api_and_apply": us["opo_loss"] - forward,
           "scratch": us.get("scratch", 0.0), "check_values": us.get("check_values", 0.0),
           **launches,
           "forward_rest": forward - us.get("scratch", 0.0) - us.get("check_values", 0.0)
           - forward_launches,
           "backward_rest": backward - backward_launches,
           # the engine, autograd.grad, the step's own tensor handling
           "autograd": statistics.median(totals) / 1e3 - us["opo_loss"] - backward}
    return {k: round(v, 1) for k, v in out.items()}


def _step(inp, on_policy: bool, **options):
    import torch

    import opo_kernels

    x = inp.logits.detach().requires_grad_()
    ref = None if on_policy else inp.ref_logprobs
    layout = {"mask": inp.mask} if inp.seq_ids is None else {"seq_ids": inp.seq_ids}

    def step():
        loss = opo_kernels.opo_loss(x, inp.labels, ref, inp.rewards, group_ids=inp.group_ids,
                                    backend="triton", **layout, **options)
        return torch.autograd.grad(loss, x)[0]
    return step


def _profile(step, out: Path | None, name: str, steps: int = 5):
    """torch.profiler over ``steps`` steps: the 25 host ops with the most self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    step()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / f"host_profile.{name}.trace.json"))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return table


def run(tiny: bool, out: Path | None):
    import torch

    from benchmarks.cases import Shape
    from benchmarks.host_overhead import _capture
    from benchmarks.inputs import group_ids_for, make_inputs
    from benchmarks.timers import time_cuda
    from opo_kernels import launches

    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    shapes = {"tiny": (12, 16, "padded"), "tiny-packed": (12, 16, "packed")} if tiny else SHAPES
    rows, tables = [], {}
    # written after every row: a run stopped by its time limit keeps what it measured
    result = environment(cuda, commit=recorded_commit(),
                         rows=rows, profile_tables=tables)
    for name, (n, v, layout) in shapes.items():
        inp = make_inputs(Shape(n, v, "bfloat16", layout), device, seed=0)
        inp.group_ids = group_ids_for(inp.B).to(device)
        for mode in ("general", "on_policy"):
            on_policy = mode == "on_policy"
            row = {"shape": name, "N": n, "V": v, "B": inp.B, "T": inp.T, "layout": layout,
                   "mode": mode,
                   "launch_cache": launches.ENABLED}
            step = _step(inp, on_policy, validate=False)
            if cuda:
                row["eager_ms"] = time_cuda(step).ms
                row["graph_ms"] = time_cuda(_capture(step).replay).ms
                for validate in (True, "deferred"):
                    row[f"eager_ms_validate_{validate}"] = time_cuda(
                        _step(inp, on_policy, validate=validate)).ms
                if launches.ENABLED:
                    launches.ENABLED = False  # every launch through Triton's binder
                    try:
                        row["triton_path_eager_ms"] = time_cuda(step).ms
                        row["triton_path_parts_us"] = _parts(step, 200)
                    finally:
                        launches.ENABLED = True
            row["parts_us"] = _parts(step, 2 if tiny else 200)
            if name == next(iter(shapes)):
                tables[mode] = _profile(step, out, mode, 1 if tiny else 5)
            rows.append(row)
            save(out, "host_profile.json", result)
            timing = (f"eager {row['eager_ms']:.3f} ms graph {row['graph_ms']:.3f} ms "
                      if cuda else "")
            print(f"{name:14s} {mode:9s} {timing}parts (µs): {row['parts_us']}", flush=True)
        del inp
        if cuda:
            torch.cuda.empty_cache()
    for mode, table in tables.items():
        print(f"\n--- torch.profiler, {next(iter(shapes))} {mode}: top host ops ---\n{table}")
    return result


def main(argv=None):
    tiny_cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
