"""Self-check: ``python -m opo_kernels``.

Runs the fused loss (Triton) and the PyTorch reference on the available device at a default
shape (small on CPU, where the kernels run under the Triton interpreter; realistic on a GPU),
compares both with a float64 oracle, and prints max errors, time and peak memory of each.
Exit status 1 if an error is over its tolerance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import opo_kernels
from opo_kernels import reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Gradient tolerance (relative to max|oracle grad|: one 16-bit rounding, 2^-7 for bf16 under
# the interpreter, which truncates) and loss tolerance, per logits dtype.
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
LOSS_TOL = 1e-4


def padded_problem(B, T, V, dtype, device, seed=0):
    """(logits [B, T, V], the [:, :-1] view of a [B, T + 1, V] tensor; labels [B, T]; ref
    log-probs [B, T] near the true ones; rewards [B]; mask [B, T], ~70 % counted), seeded.
    tests/test_gpu.py uses the same batches."""
    g = torch.Generator(device=device).manual_seed(seed)
    full = torch.randn(B, T + 1, V, generator=g, device=device, dtype=dtype)
    logits = full[:, :-1]  # the usual shift, read in place
    labels = torch.randint(0, V, (B, T), generator=g, device=device)
    mask = torch.rand(B, T, generator=g, device=device) < 0.7
    ref = reference.chunked_logprobs(logits, labels) + 0.05 * torch.randn(
        B, T, generator=g, device=device)
    rewards = torch.rand(B, generator=g, device=device)
    return logits, labels, ref, rewards, mask


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(fn, logits, device, repeats):
    """(loss, grad, median ms, peak bytes above the inputs or None) of forward+backward."""
    def step():
        x = logits.detach().requires_grad_()
        loss = fn(x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    loss, grad = step()  # warm-up (compilation) and the values that are checked
    del grad
    times = []
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    loss, grad = step()
    return loss, grad, statistics.median(times), peak


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m opo_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, default=4 if on_gpu else 6)
    parser.add_argument("--T", type=int, default=1024 if on_gpu else 32)
    parser.add_argument("--V", type=int, default=151936 if on_gpu else 4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--group-size", type=int, default=2 if on_gpu else 3)
    parser.add_argument("--repeats", type=int, default=10 if on_gpu else 3)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = DTYPES[args.dtype]
    logits, labels, ref, rewards, mask = padded_problem(args.B, args.T, args.V, dtype, device)
    kwargs = dict(mask=mask, group_size=args.group_size, return_metrics=False)
    mode = torch.cuda.get_device_name() if on_gpu else "CPU (Triton interpreter)"
    print(f"opo_kernels {opo_kernels.__version__} self-check on {mode}; torch "
          f"{torch.__version__}, triton {__import__('triton').__version__}")
    print(f"padded logits [B={args.B}, T={args.T}, V={args.V}] {args.dtype} (a [:, :-1] view), "
          f"{int(mask.sum())} of {mask.numel()} tokens counted, groups of {args.group_size}")

    x64 = logits.detach().double().requires_grad_()
    oracle = reference.opo_loss(x64, labels, ref.double(), rewards, **kwargs)
    (oracle_grad,) = torch.autograd.grad(oracle, x64)
    del x64

    impls = {
        "fused (triton)": lambda x: opo_kernels.opo_loss(x, labels, ref, rewards,
                                                         backend="triton", **kwargs),
        "reference (torch)": lambda x: opo_kernels.opo_loss(x, labels, ref, rewards,
                                                            backend="torch", **kwargs),
    }
    ok = True
    print(f"\n{'implementation':<20}{'loss err':>11}{'grad err':>11}{'ms (fwd+bwd)':>14}"
          f"{'peak mem':>12}")
    for name, fn in impls.items():
        loss, grad, ms, peak = _measure(fn, logits, device, args.repeats)
        loss_err = (loss.double() - oracle).abs().item()
        grad_err = ((grad.double() - oracle_grad).abs().max()
                    / oracle_grad.abs().max()).item()
        del grad
        good = loss_err <= LOSS_TOL * max(1.0, oracle.abs().item()) and \
            grad_err <= GRAD_TOL[dtype]
        ok &= good
        mem = f"{peak / 2**20:9.1f} MiB" if peak is not None else "n/a (CPU)"
        print(f"{name:<20}{loss_err:>11.2e}{grad_err:>11.2e}{ms:>14.2f}{mem:>12}"
              f"{'' if good else '   <-- over tolerance'}")
    print(f"\nloss = {oracle.item():.6f}; grad err is max|grad − oracle| / max|oracle| "
          f"(tolerance {GRAD_TOL[dtype]:g} for {args.dtype}); peak mem is above the inputs")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def _restart_under_interpreter_if_needed() -> None:
    """Without CUDA the kernels can only run under the interpreter, which must be switched on
    before triton is imported -- and ``python -m opo_kernels`` has imported the package (and
    triton) already, so start again with it set. Only when run as a script: importing this
    module (tests/test_gpu.py shares ``padded_problem``) has no side effect."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "opo_kernels", *sys.argv[1:]])


if __name__ == "__main__":
    _restart_under_interpreter_if_needed()
    sys.exit(main())
