"""How many compiled variants of each kernel a training loop makes when its batch shape changes
from step to step (B sequences, T positions: RL batches change both), WITHOUT a GPU.

    python -m tools.gpu.jit_keys            # table: distinct JIT keys per scenario and kernel
    python -m tools.gpu.jit_keys --json     # the same as JSON (tests/test_jit_keys.py)

Triton compiles one variant per *specialization key*: the constexprs, the dtypes, and for every
integer argument not in ``do_not_specialize`` whether it is 1 or divisible by 16 (pointers:
16-byte alignment). An argument that follows B or T — a stride over sequences of a [B, T]
tensor is T or T + 1 — therefore recompiles the kernel when T % 16 changes (the epilogue kernel
takes ~3-5 s to compile, the row kernels ~0.3 s). Each scenario here calls the public API at
several (B, T) with one set of options, records the launches (``aot_check.recording``: nothing
runs) and computes each launch's key with Triton's own binder, as ``kernel[grid](...)`` does.
One key per kernel per scenario means a loop whose shapes vary compiles each kernel once.

The vocabulary V and the logits' strides (multiples of V) stay specialized on purpose: they
decide the 16-byte accesses of the row loops, and V is fixed for a model.

Must run with TRITON_INTERPRET unset (the kernels are then real JIT functions).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Callable, Dict, List
from unittest import mock

import torch

from opo_kernels import fused_linear_opo_loss, opo_loss, opo_loss_from_logprobs, utils
from tools.gpu.aot_check import recording, specialization_key

SHAPES = [(4, 16), (4, 17), (6, 31), (8, 32), (2, 33), (16, 48)]  # (B, T): T % 16 and B vary
V, H = 32000, 64


def _padded(b, t, dtype=torch.bfloat16):
    """A [B, T, V] logits view of [B, T + 1, V] (the causal shift) and its [B, T] labels."""
    logits = torch.empty(b, t + 1, V, dtype=dtype)[:, :-1].requires_grad_()
    labels = torch.zeros(b, t + 1, dtype=torch.long)[:, 1:]
    return logits, labels, torch.ones(b, t, dtype=torch.bool)


def _general(b, t):
    logits, labels, mask = _padded(b, t)
    return opo_loss(logits, labels, torch.zeros(b, t), torch.zeros(b), mask=mask, group_size=2,
                    validate=False)


def _on_policy_entropy(b, t):
    logits, labels, mask = _padded(b, t)
    return opo_loss(logits, labels, None, torch.zeros(b), mask=mask, group_size=2,
                    entropy_coef=0.01, validate=False)


def _packed(b, t):
    n = b * t
    logits = torch.empty(n, V, dtype=torch.bfloat16, requires_grad=True)
    seq_ids = torch.arange(n) // t
    return opo_loss(logits, torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.zeros(b),
                    seq_ids=seq_ids, group_size=2, validate=False)


def _from_logprobs(b, t):
    lp = torch.zeros(b, t, requires_grad=True)
    return opo_loss_from_logprobs(lp, torch.zeros(b, t), torch.zeros(b),
                                  mask=torch.ones(b, t, dtype=torch.bool), group_size=2,
                                  vocab_size=V, validate=False)


def _fused_linear(b, t):
    hidden = torch.zeros(b, t, H, requires_grad=True)
    weight = torch.zeros(V, H, requires_grad=True)
    return fused_linear_opo_loss(hidden, weight, torch.zeros(b, t, dtype=torch.long),
                                 torch.zeros(b, t), torch.zeros(b),
                                 mask=torch.ones(b, t, dtype=torch.bool), group_size=2,
                                 validate=False)


SCENARIOS: Dict[str, Callable] = {
    "padded-general": _general, "padded-on-policy-entropy": _on_policy_entropy,
    "packed-general": _packed, "from-logprobs": _from_logprobs, "fused-linear": _fused_linear,
}


def count_keys(run: Callable, shapes=SHAPES) -> Dict[str, Dict[str, int]]:
    """{kernel name: {"first": distinct keys at the first shape, "all": over every shape}},
    forward + backward. A call may launch one kernel in two variants (the on-policy epilogue's
    counts-only pre-pass); a shape-stable kernel has "all" == "first"."""
    keys: Dict[str, List[set]] = defaultdict(lambda: [set(), set()])
    for i, (b, t) in enumerate(shapes):
        # CPU tensors take the Triton path as under the interpreter; the recorders run nothing
        with recording() as log, mock.patch.object(utils, "interpreter_on", lambda: True):
            out = run(b, t)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
        for kernel, args, kwargs in log:
            key = specialization_key(kernel, args, kwargs)
            first, every = keys[kernel.fn.__name__]
            every.add(key)
            if i == 0:
                first.add(key)
    return {name: {"first": len(first), "all": len(every)}
            for name, (first, every) in sorted(keys.items())}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = {name: count_keys(run) for name, run in SCENARIOS.items()}
    if args.json:
        print(json.dumps({"shapes": SHAPES, "scenarios": results}))
        return 0
    print(f"distinct JIT keys over (B, T) in {SHAPES}, V = {V}")
    for name, counts in results.items():
        print(f"{name:<28}" + "  ".join(f"{k}={n['all']} (one shape: {n['first']})"
                                        for k, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
