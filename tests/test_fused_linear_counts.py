"""Fused-linear OPO, what one call costs, counted on the CPU (forward + backward):

- the matmuls' work, in units of one [M, H] x [H, V] product over the M COUNTED rows:
  4 − K/M in the general mode (K = rows whose logits ``logits_budget`` keeps: 4 with none,
  3 with all), 3 on-policy — whatever the chunk size; the rows that are not counted (padding,
  packed seq_ids = −1) are never multiplied;
- the row kernels' launches: one per chunk (and one for the kept rows), one per block of the
  backward;
- the exact device operations of a one-chunk call (torch ops and Triton launches, counted as
  tests/test_launches.py counts ``opo_loss``), so that nobody silently adds an op.
The problems: linear_problems.py (B=4, T=5, H=12, V=23; M = 11-12 of 14-20 rows counted).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from linear_problems import Problem
from problems import on_device
from test_launches import count_operations
from torch.utils._python_dispatch import TorchDispatchMode

import opo_kernels
import opo_kernels.linear_chunks as chunks
import opo_kernels.utils as ok_utils
from opo_kernels import fused_linear_opo_loss

_MATMULS = {"aten.mm.default", "aten.mm.out", "aten.addmm.default", "aten.addmm.out",
            "aten.addmm_.default", "aten.mm.dtype_out", "aten.addmm.dtype_out"}


class MatmulCounter(TorchDispatchMode):
    """Records (m, k, n) of every matrix product dispatched ([m, k] @ [k, n]; addmm's added
    matrix is not a product)."""

    def __init__(self):
        super().__init__()
        self.products = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in _MATMULS:
            a, b = args[1:3] if "addmm" in name else args[:2]
            self.products.append((a.shape[0], a.shape[1], b.shape[1]))
        elif "mm" in name or "matmul" in name or "bmm" in name or "linear" in name:
            raise AssertionError(f"a product this counter does not know: {name}")
        return func(*args, **(kwargs or {}))

    def units(self, rows: int, hidden: int, vocab: int) -> float:
        """The work in units of one [rows, hidden] x [hidden, vocab] product."""
        return sum(m * k * n for m, k, n in self.products) / (rows * hidden * vocab)


def _forward(problem, mode, budget, chunk, **options):
    """(loss, leaves (buffer, weight, bias)) of one fused-linear call, float32."""
    buf, weight, bias = problem.params(torch.float32)
    ref = None if mode == "on_policy" else problem.ref
    loss = fused_linear_opo_loss(problem.view(buf), weight, problem.labels, ref,
                                 problem.rewards, bias=bias, chunk_size=chunk,
                                 logits_budget=budget, backend="triton", **problem.layout,
                                 **options)
    return loss, (buf, weight, bias)


def _call(problem, mode, budget, chunk, **options):
    """loss and gradients (buffer, weight, bias) of one fused-linear call, float32."""
    loss, leaves = _forward(problem, mode, budget, chunk, **options)
    return loss, torch.autograd.grad(loss, leaves)


# budget: 0 (nothing kept), 7 rows' logits (partial), None (the default, 1 GiB: all of them)
BUDGETS = {"none": 0, "partial": 7 * 23 * 4, "all": None}
MATMUL_CASES = list(itertools.product(["general", "on_policy"], list(BUDGETS),
                                      ["padded", "packed"], [3, None]))


@pytest.mark.parametrize("mode,budget,layout,chunk", MATMUL_CASES,
                         ids=[f"{m}-kept_{b}-{lay}-chunk{c or 'default'}"
                              for m, b, lay, c in MATMUL_CASES])
def test_matmuls_on_counted_rows(mode, budget, layout, chunk):
    """Matmul work per call, exactly: general 4 − K/M, on-policy 3 (units of one product over
    the M counted rows, fewer than the N rows passed); the forward alone does 1."""
    problem = Problem(layout, 21)
    H, V = problem.weight.shape[1], problem.weight.shape[0]
    N, M = problem.counted.numel(), int(problem.counted.sum())
    assert M < N
    kept = {"none": 0, "partial": 7, "all": M}[budget] if mode == "general" else 0
    with MatmulCounter() as counter:
        loss, leaves = _forward(problem, mode, BUDGETS[budget], chunk)
    # the forward: the logits (and, on-policy, the two gradient products as well)
    assert counter.units(M, H, V) == (3.0 if mode == "on_policy" else 1.0), counter.products
    with counter:
        torch.autograd.grad(loss, leaves)
    expected = 3.0 if mode == "on_policy" else 4.0 - kept / M
    assert counter.units(M, H, V) == pytest.approx(expected, abs=1e-12), counter.products
    if mode == "general" and budget == "all":
        assert len(counter.products) == 3  # one product each: logits, ∂hidden, ∂W


def test_matmuls_follow_counted_rows_not_padding():
    """The same sequences with 3x more padding cost the same matmul work."""
    problem = Problem("padded", 22, T=5)
    wide = Problem("padded", 22, T=5)
    pad = torch.zeros(wide.counted.shape[0], 10, dtype=torch.bool, device=wide.counted.device)
    counted = torch.cat([wide.counted, pad], 1)
    nan = torch.full_like(wide.buffer[:, :1], float("nan")).expand(-1, 10, -1)
    buffer = torch.cat([wide.buffer[:, :-1], nan, wide.buffer[:, -1:]], 1)  # NaN on the pad
    wide.buffer, wide.counted = buffer, counted
    wide.labels = torch.cat([wide.labels, torch.full_like(pad, -100, dtype=torch.long)], 1)
    wide.ref = torch.cat([wide.ref, torch.full(pad.shape, float("nan"), device=pad.device)], 1)
    wide.layout["mask"] = torch.cat([wide.layout["mask"], pad.to(wide.layout["mask"].dtype)], 1)
    totals = []
    for p in (problem, wide):
        with MatmulCounter() as counter:
            loss, grads = _call(p, "general", 0, 4)
        totals.append(sum(m * k * n for m, k, n in counter.products))
        assert all(torch.isfinite(g).all() for g in grads[1:])
        assert (grads[0][:, :-1][~p.counted] == 0).all()
    assert totals[0] == totals[1]


LAUNCH_CASES = list(itertools.product(["general", "on_policy"], list(BUDGETS), [1, 3, 8]))


@pytest.mark.parametrize("mode,budget,chunk", LAUNCH_CASES,
                         ids=[f"{m}-kept_{b}-chunk{c}" for m, b, c in LAUNCH_CASES])
def test_row_kernel_launches(monkeypatch, mode, budget, chunk):
    """Forward: one launch for the kept rows [0, K) and one per chunk of the others;
    backward: one for the kept rows, then one per block of columns over the M − K others
    (M = 12 < V = 23), each block as many logits as max(chunk, K) rows. On-policy: ⌈M / rows⌉
    one-pass launches, rows = max(chunk, rows the budget holds) balanced, and no backward
    launch."""
    calls = {"forward": [], "backward": []}

    def spy(kind, fn):
        def wrapped(logits, *args, **kwargs):
            calls[kind].append((kwargs.get("row_start", 0), tuple(logits.shape)))
            return fn(logits, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(chunks, "forward_rows", spy("forward", chunks.forward_rows))
    monkeypatch.setattr(chunks, "backward_rows", spy("backward", chunks.backward_rows))
    problem = Problem("padded", 9)
    M, V = int(problem.counted.sum()), problem.weight.shape[0]
    assert M == 12 and V == 23
    _call(problem, mode, BUDGETS[budget], chunk)
    if mode == "on_policy":
        rows = {"none": chunk, "partial": max(chunk, 7), "all": M}[budget]
        n = -(-M // rows)
        size = -(-M // n)
        assert calls["forward"] == [(s, (min(size, M - s), V)) for s in range(0, M, size)]
        assert not calls["backward"]
        return
    kept = {"none": 0, "partial": 7, "all": M}[budget]
    expected = ([(0, (kept, V))] if kept else []) + [
        (s, (min(chunk, M - s), V)) for s in range(kept, M, chunk)]
    assert calls["forward"] == expected
    rest = M - kept
    # the kept logits are freed first: the recomputed blocks hold as many as them or a chunk
    width = chunks.vocab_block_size(rest, V, max(chunk, kept))
    blocks = [(kept, (rest, min(width, V - v))) for v in range(0, V, width)] if rest else []
    assert calls["backward"] == ([(0, (kept, V))] if kept else []) + blocks


# ---- the exact operations of a one-chunk call (validate=False) -------------------------------
@pytest.fixture
def no_poison():
    """NaN-poisoned outputs are filled by a torch op of their own: off while counting."""
    ok_utils.POISON_OUTPUTS = False
    yield


FP32, BF16 = torch.float32, torch.bfloat16
# id -> (on_policy, bias, dtype, V, budget, layout). B·T = 30 rows, 24 counted (padded: mask;
# packed: seq_ids −1); "nomask": padded, every row counted (no mask). V = 50 > M: the backward
# cuts the vocabulary (one block here); V = 20 < M: the rows (linear_chunks.backward_chunks).
# Every list starts with the counted rows: nonzero (the host sync), the labels, ref_logprobs
# and hidden rows gathered (index; nothing for "nomask"), and ends with ∂hidden scattered back
# (new_zeros + index_put_). Between them:
# general, budget 0, V = 50: ticket memset, logits (addmm / mm), autograd seed, logits
#   recomputed, ∂hidden and ∂W each ONE matmul written into its output (mm.out), ∂b = Σ rows
#   into its fp32 buffer (sum.out; cast to bf16 for bf16);
# general, budget 0, V = 20: the same, the rows loop: one chunk, so ∂W is one product written
#   once in the weight's dtype too (no fp32 accumulator);
# general, all kept: logits, seed, and no recompute: ∂hidden, ∂W (mm.out), ∂b;
# on-policy (one phase): ticket memset, logits, ∂hidden (mm.out), ∂W (one chunk: written
#   once in the weight's dtype, mm.out), ∂b (sum.out, fp32), then the seed and ∂hidden, ∂W,
#   ∂b scaled by the upstream gradient in ONE op each (mul.out, multiplied in fp32 and
#   written in the parameter's dtype).
GATHER_3 = ["nonzero", "index.Tensor", "index.Tensor", "index.Tensor"]  # labels, ref, hidden
GATHER_2 = ["nonzero", "index.Tensor", "index.Tensor"]  # on-policy: labels, hidden
SCATTER = ["new_zeros", "index_put_"]
FUSED_LINEAR_OPS = {
    "general-bias-V50": ((False, True, FP32, 50, 0, "padded"), GATHER_3 + [
        "zeros", "addmm", "ones_like", "addmm", "mm.out", "mm.out", "sum.IntList_out"]
        + SCATTER),
    "general-V50": ((False, False, FP32, 50, 0, "padded"), GATHER_3 + [
        "zeros", "mm", "ones_like", "mm", "mm.out", "mm.out"] + SCATTER),
    "general-bias-bf16-V50": ((False, True, BF16, 50, 0, "padded"), GATHER_3 + [
        "zeros", "addmm", "ones_like", "addmm", "mm.out", "mm.out", "sum.IntList_out"]
        + SCATTER + ["_to_copy"]),
    "general-bias-V20": ((False, True, FP32, 20, 0, "padded"), GATHER_3 + [
        "zeros", "addmm", "ones_like", "addmm", "mm.out", "mm.out", "sum.IntList_out"]
        + SCATTER),
    "general-bias-bf16-V20": ((False, True, BF16, 20, 0, "padded"), GATHER_3 + [
        "zeros", "addmm", "ones_like", "addmm", "mm.out", "mm.out", "sum.IntList_out"]
        + SCATTER + ["_to_copy"]),
    # packed: the counted rows are seq_ids != −1 (ne), and their seq_ids are gathered too
    "general-bias-packed-V50": ((False, True, FP32, 50, 0, "packed"), [
        "ne.Scalar", "nonzero", "index.Tensor"] + GATHER_3[1:] + [
        "zeros", "addmm", "ones_like", "addmm", "mm.out", "mm.out", "sum.IntList_out"]
        + SCATTER),
    "general-bias-nomask-V50": ((False, True, FP32, 50, 0, "nomask"), [
        "zeros", "addmm", "ones_like", "addmm", "mm.out", "mm.out", "sum.IntList_out"]),
    "general-kept-bias-V50": ((False, True, FP32, 50, None, "padded"), GATHER_3 + [
        "zeros", "addmm", "ones_like", "mm.out", "mm.out", "sum.IntList_out"] + SCATTER),
    "general-kept-bias-bf16-V50": ((False, True, BF16, 50, None, "padded"), GATHER_3 + [
        "zeros", "addmm", "ones_like", "mm.out", "mm.out", "sum.IntList_out"] + SCATTER
        + ["_to_copy"]),
    "on_policy-bias": ((True, True, FP32, 50, None, "padded"), GATHER_2 + [
        "zeros", "addmm", "mm.out", "mm.out", "sum.IntList_out", "ones_like", "mul.out",
        "mul.out", "mul.out"] + SCATTER),
    "on_policy": ((True, False, FP32, 50, None, "padded"), GATHER_2 + [
        "zeros", "mm", "mm.out", "mm.out", "ones_like", "mul.out", "mul.out"] + SCATTER),
    "on_policy-bias-bf16": ((True, True, BF16, 50, None, "padded"), GATHER_2 + [
        "zeros", "addmm", "mm.out", "mm.out", "sum.IntList_out", "ones_like", "mul.out",
        "mul.out", "mul.out"] + SCATTER),
}


@pytest.mark.parametrize("case", list(FUSED_LINEAR_OPS))
def test_operations_one_chunk(no_poison, case):
    (on_policy, bias, dtype, V, budget, layout), expected_ops = FUSED_LINEAR_OPS[case]
    g = torch.Generator().manual_seed(0)
    B, T, H = 6, 5, 8
    tensors = [torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g),
               torch.randn(V, generator=g), torch.randint(0, V, (B, T), generator=g),
               torch.rand(B, T, generator=g) < 0.8, torch.rand(B, generator=g),
               -3 * torch.rand(B, T, generator=g)]
    tensors[:3] = [t.to(dtype) for t in tensors[:3]]
    hidden, weight, b, labels, mask, rewards, ref = on_device(tensors)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)][:3 if bias else 2]
    layout_args = dict(mask=mask, group_size=3)
    if layout == "nomask":
        layout_args.pop("mask")
    seq = torch.where(mask.reshape(-1), torch.arange(B * T, device=mask.device) // T, -1)

    def step():
        h, lab, r, kw = leaves[0], labels, ref, layout_args
        if layout == "packed":
            h, lab, r = h.reshape(B * T, H), labels.reshape(-1), ref.reshape(-1)
            kw = dict(seq_ids=seq, group_size=3)
        loss = opo_kernels.fused_linear_opo_loss(
            h, leaves[1], lab, None if on_policy else r, rewards,
            bias=leaves[2] if bias else None, backend="triton", validate=False,
            logits_budget=budget, **kw)
        torch.autograd.grad(loss, leaves)

    step()
    with count_operations() as counter:
        step()
    expected_launches = (["epilogue_kernel", "_opo_fwd_kernel", "epilogue_kernel"] if on_policy
                         else ["_opo_fwd_kernel", "epilogue_kernel", "_opo_bwd_kernel"])
    assert counter.launches == expected_launches
    ops = [op.removeprefix("aten.").removesuffix(".default") for op in counter.ops]
    assert ops == expected_ops, ops
