"""Fused-linear OPO: the counted rows, the logits budget and the on-policy one phase, against
the float64 oracle and measured.

- every mode (general, on-policy) × budget (no logits kept, some, all) × layout (padded,
  packed) equals the oracle: loss, metrics, ∂hidden, ∂weight, ∂bias (linear_problems.py);
- the memory: the bytes of the tensors a call creates, alive after the forward (what it
  holds for the backward) and at their peak, measured by tracking every storage a torch op
  allocates (``LiveBytes``): the kept logits take what the budget allows and no more, and the
  peak stays within budget + one chunk's workspace (+ the gradients and small buffers);
- a NaN or inf in hidden at a row that is not counted changes nothing (finite loss, equal
  gradients) on both backends; a non-finite value at a counted row, in weight or in bias, is
  reported naming that argument, on both backends;
- a retained graph's second backward gives the first one's gradients bit for bit (the kept
  logits were overwritten by their gradient: they are recomputed);
- the plan (chunk rows, kept rows) and ``logits_budget``'s bad values.
Counts of matmuls and launches: test_fused_linear_counts.py.
"""

from __future__ import annotations

import itertools
import weakref

import pytest
import torch
import torch.nn.functional as F
from linear_problems import Problem, V, compare
from problems import DEVICE
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import opo_kernels
from opo_kernels import fused_linear_opo_loss
from opo_kernels.linear_plan import DEFAULT_LOGITS_BUDGET, LinearPlan, plan_chunks

# ---- every mode × budget × layout against the oracle ---------------------------------------
# budget: 0 (nothing kept: every row recomputed; on-policy chunks of chunk_size rows), the
# logits of 7 rows (general: rows [0, 7) kept, the others recomputed in chunks of 3; on-policy:
# chunks of 7 rows, balanced), None (the default 1 GiB: everything kept, one chunk).
BUDGETS = {"none": 0, "partial": 7, "all": None}
GRID = list(itertools.product(["general", "on_policy"], list(BUDGETS), ["padded", "packed"]))


@pytest.mark.parametrize("mode,budget,layout", GRID,
                         ids=[f"{m}-kept_{b}-{lay}" for m, b, lay in GRID])
def test_matches_reference(mode, budget, layout):
    seed = 200 + GRID.index((mode, budget, layout))
    problem = Problem(layout, seed)
    rows = BUDGETS[budget]
    logits_budget = None if rows is None else rows * V * 4
    # the torch backend does not depend on the budget: once per mode and layout
    backends = ("triton", "torch") if budget == "partial" else ("triton",)
    compare(problem, torch.float32, seed, backends=backends, on_policy=mode == "on_policy",
            chunk_size=3, logits_budget=logits_budget, entropy_coef=0.04,
            level="token" if layout == "packed" else "sequence_mean")


@pytest.mark.parametrize("mode", ["general", "on_policy"])
def test_bf16_partial_budget(mode):
    """16-bit: the kept rows' ∂W product is written in bf16 and each recomputed block's is
    added to it in place (one more rounding); on-policy, the fp32 accumulator."""
    compare(Problem("packed", 230), torch.bfloat16, 230, on_policy=mode == "on_policy",
            chunk_size=3, logits_budget=7 * V * 2, entropy_coef=0.04)


@pytest.mark.parametrize("mode", ["general", "on_policy"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_no_counted_row(mode, layout):
    """M = 0: loss 0, every gradient 0 (no chunk, no matmul over rows), every budget."""
    problem = Problem(layout, 240)
    if layout == "padded":
        problem.layout["mask"] = torch.zeros_like(problem.layout["mask"])
    else:
        problem.layout["seq_ids"] = torch.full_like(problem.layout["seq_ids"], -1)
    for budget in (0, None):
        buf, weight, bias = problem.params(torch.float32)
        loss = fused_linear_opo_loss(problem.view(buf), weight, problem.labels,
                                     None if mode == "on_policy" else problem.ref,
                                     problem.rewards, bias=bias, logits_budget=budget,
                                     chunk_size=2, backend="triton", **problem.layout)
        grads = torch.autograd.grad(loss, (buf, weight, bias))
        assert loss.item() == 0.0
        assert all((g == 0).all() for g in grads)


# ---- memory: what a call holds and its peak --------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """The bytes of the storages that torch ops allocate while the mode is on: ``live`` (not
    freed yet) and ``peak`` (the most at any time). Storages that existed before (the inputs,
    and views of them) are not counted. A storage counts while a tensor on it that an op
    returned is alive (a weakref finalizer on each): the tensors are what the package holds.
    (Not the storage objects: the Triton interpreter keeps each launch's argument storages in
    a reference cycle, a recursive closure of its copy-back step, until Python's cycle
    collector runs — an artifact of running the kernels on the CPU.)"""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._bytes, self._holders = {}, {}
        self._old = set()

    def _release(self, key):
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
            self.live -= self._bytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self._old |= {key for key in before if key not in self._bytes}
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if not key or (key in self._old and key not in self._bytes):
                continue
            if key not in self._bytes:
                self._bytes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._holders[key] = self._holders.get(key, 0) + 1
            weakref.finalize(t, self._release, key)
        return out


# A problem where the logits dominate: V = 2048 ids, H = 4, fp32 (a row of logits is 8 KiB; the
# hidden rows, statistics and per-sequence buffers are tens of bytes per row).
MEM_V, MEM_H, ROW = 2048, 4, 2048 * 4
SLACK = 4096  # < half a row of logits: the small buffers (statistics, indices, coefficients)


def _memory_problem():
    return Problem("padded", 250, B=4, T=8, H=MEM_H, V=MEM_V)


def _measure(problem, mode, budget, chunk):
    """(bytes held after the forward, peak bytes of forward + backward, bytes of the returned
    gradients), of the tensors the call creates."""
    buf, weight, bias = problem.params(torch.float32)
    ref = None if mode == "on_policy" else problem.ref
    with LiveBytes() as meter:
        loss = fused_linear_opo_loss(problem.view(buf), weight, problem.labels, ref,
                                     problem.rewards, bias=bias, chunk_size=chunk,
                                     logits_budget=budget, backend="triton", **problem.layout)
        held = meter.live
        grads = torch.autograd.grad(loss, (buf, weight, bias))
        returned = sum(g.untyped_storage().nbytes() for g in grads)
    return held, meter.peak, returned


@pytest.mark.skipif(DEVICE != "cpu", reason="measures CPU allocations")
@pytest.mark.parametrize("kept", [0, 5, "all"])
def test_memory_general_mode(kept):
    """General mode: after the forward the call holds the kept rows' logits (K·V·4 bytes,
    exactly the budget's rows) and small buffers; its peak stays within budget + one chunk's
    logits + the returned gradients and the small buffers (the backward's accumulator is
    [M − K, H], tiny here)."""
    problem = _memory_problem()
    M = int(problem.counted.sum())
    chunk = 2
    K = M if kept == "all" else kept
    budget = K * ROW + ROW // 2  # half a row more: still K rows
    held, peak, returned = _measure(problem, "general", budget, chunk)
    hidden_rows = M * MEM_H * 4  # the counted rows of hidden, saved
    assert K * ROW <= held <= K * ROW + hidden_rows + SLACK, (held, K * ROW)
    bound = budget + chunk * ROW + returned + hidden_rows + SLACK
    least = K * ROW + (chunk * ROW if K < M else 0)  # the kept rows and a chunk beside them
    assert least <= peak <= bound, (peak, least, bound)
    # nothing kept and chunks of 2 rows: never more than two chunks' worth of logits
    if K == 0:
        assert peak <= chunk * ROW + returned + hidden_rows + SLACK, peak


@pytest.mark.skipif(DEVICE != "cpu", reason="measures CPU allocations")
@pytest.mark.parametrize("budget_rows", [0, 6, "all"])
def test_memory_on_policy(budget_rows):
    """On-policy: no logits are held past the forward (the gradients are: [M, H], and the fp32
    [V, H], [V] sums); the logits of one chunk at a time, max(chunk, budget rows) rows."""
    problem = _memory_problem()
    M = int(problem.counted.sum())
    chunk = 2
    rows = M if budget_rows == "all" else max(chunk, budget_rows)
    budget = None if budget_rows == "all" else budget_rows * ROW
    held, peak, returned = _measure(problem, "on_policy", budget, chunk)
    grads_held = M * MEM_H * 4 + MEM_V * MEM_H * 4 + MEM_V * 4
    assert grads_held <= held <= grads_held + M * MEM_H * 4 + SLACK, held
    # balanced chunks hold at most `rows` rows each
    bound = rows * ROW + grads_held + returned + M * MEM_H * 4 + SLACK
    assert peak <= bound, (peak, bound)
    assert peak >= min(rows, M) * ROW


# ---- rows that are not counted are never read -----------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["general", "on_policy"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_nan_at_rows_not_counted(backend, mode, layout):
    """NaN and inf in hidden at every row that is not counted: the loss, the metrics and every
    gradient are finite and equal to those of the same call with finite values there; the
    gradient of hidden is 0 on those rows."""
    problem = Problem(layout, 260)
    results = []
    for poison in (False, True):
        buf, weight, bias = problem.params(torch.float32)
        if poison:
            with torch.no_grad():
                view = problem.view(buf)
                view[~problem.counted] = float("nan")
                view[tuple((~problem.counted).nonzero()[0])] = float("inf")
        loss, metrics = fused_linear_opo_loss(
            problem.view(buf), weight, problem.labels,
            None if mode == "on_policy" else problem.ref, problem.rewards, bias=bias,
            chunk_size=3, logits_budget=5 * V * 4, backend=backend, return_metrics=True,
            **problem.layout)
        grads = torch.autograd.grad(loss, (buf, weight, bias))
        results.append((loss, metrics, grads))
    (loss0, metrics0, grads0), (loss1, metrics1, grads1) = results
    assert torch.isfinite(loss1) and torch.equal(loss0, loss1)
    for k in metrics0:
        assert torch.equal(metrics0[k], metrics1[k]), k
    for name, a, b in zip(("hidden", "weight", "bias"), grads0, grads1):
        assert torch.isfinite(b).all(), name
        assert torch.equal(a, b), name
    assert (problem.view(grads1[0])[~problem.counted] == 0).all()


# ---- bad values at counted rows: named ------------------------------------------------------
def _named_error_inputs():
    p = Problem("packed", 270)
    hidden, w, b = p.view(p.buffer).float(), p.weight.float(), p.bias.float()
    row = int(p.counted.nonzero()[0, 0])
    nan_bias = b.clone()
    nan_bias[4] = float("nan")
    nan_hidden = hidden.clone()
    nan_hidden[row, 1] = float("inf")
    huge = (hidden * 1e20, w * 1e20)  # finite, but the logits overflow float32
    bad_mask = Problem("padded", 271)
    mask = bad_mask.layout["mask"].clone().long()
    mask[0, 0] = 2  # a counted row, other rows dropped
    return p, {
        "bias": ((hidden, w, nan_bias), p, r"^bias: 1 non-finite value"),
        "hidden": ((nan_hidden, w, b), p, r"^hidden: 1 counted row\(s\) with a non-finite"),
        "overflow": ((*huge, b), p, r"^hidden: the logits .* overflow torch.float32"),
        "mask": (None, (bad_mask, mask), r"^mask: 1 mask value\(s\) other than 0/1"),
    }


_, NAMED = _named_error_inputs()


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("what", list(NAMED))
def test_bad_values_named(what, backend):
    tensors, problem, pattern = NAMED[what]
    if what == "mask":
        problem, mask = problem
        layout = {**problem.layout, "mask": mask}
        tensors = (problem.view(problem.buffer).float(), problem.weight.float(),
                   problem.bias.float())
    else:
        layout = problem.layout
    hidden, w, b = tensors
    with pytest.raises(ValueError, match=pattern):
        fused_linear_opo_loss(hidden, w, problem.labels, problem.ref, problem.rewards, bias=b,
                              backend=backend, **layout)


# ---- a retained graph --------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [3 * V * 4, None], ids=["kept3", "kept_all"])
def test_retained_graph_second_backward(budget):
    """The first backward writes the kept logits' gradient over them; the second recomputes
    them in the same matmul: the same gradients, bit for bit."""
    problem = Problem("padded", 280)
    leaves = problem.params(torch.float32)
    loss = fused_linear_opo_loss(problem.view(leaves[0]), leaves[1], problem.labels,
                                 problem.ref, problem.rewards, bias=leaves[2], chunk_size=3,
                                 logits_budget=budget, backend="triton", **problem.layout)
    first = torch.autograd.grad(1.7 * loss, leaves, retain_graph=True)
    second = torch.autograd.grad(1.7 * loss, leaves)
    for name, a, b in zip(("hidden", "weight", "bias"), first, second):
        assert torch.equal(a, b), name


# ---- the plan, the argument ----------------------------------------------------------------
@pytest.mark.parametrize("args,expected", [
    # (M, V, dtype, chunk_size, logits_budget, one_phase, wants_grad) -> plan
    ((100, 10, torch.float32, 8, 0, False, True), LinearPlan(8, 0, False)),
    ((100, 10, torch.float32, 8, 40 * 7 + 39, False, True), LinearPlan(8, 7, False)),
    ((100, 10, torch.float32, 8, 10**9, False, True), LinearPlan(8, 100, False)),
    ((100, 10, torch.float32, 8, 10**9, False, False), LinearPlan(8, 0, False)),  # no grad
    ((100, 10, torch.float32, 8, 0, True, True), LinearPlan(8, 0, True)),  # 13 chunks, 8 max
    ((100, 10, torch.float32, 8, 40 * 30, True, True), LinearPlan(25, 0, True)),  # 4 of 25
    ((100, 10, torch.float32, 8, 40 * 34, True, True), LinearPlan(34, 0, True)),  # 34,34,32
    ((100, 10, torch.bfloat16, 8, 40 * 30, True, True), LinearPlan(50, 0, True)),  # 60 rows
    ((100, 10, torch.float32, 8, None, True, True), LinearPlan(100, 0, True)),  # 1 GiB
    ((0, 10, torch.float32, None, None, True, True), LinearPlan(1, 0, True)),
    ((0, 10, torch.float32, None, None, False, True), LinearPlan(1, 0, False)),
])
def test_plan(args, expected):
    assert plan_chunks(*args) == expected


def test_default_budget_holds_a_gib():
    assert DEFAULT_LOGITS_BUDGET == 2**30
    plan = plan_chunks(16384, 128256, torch.bfloat16, None, None, False, True)
    assert plan.held_rows == 2**30 // (128256 * 2) == 4185


@pytest.mark.parametrize("value", [-1, 1.5, True, "1GiB", 2.0])
def test_bad_logits_budget(value):
    problem = Problem("padded", 290)
    hidden, w = problem.view(problem.buffer).float(), problem.weight.float()
    with pytest.raises(ValueError, match="logits_budget"):
        fused_linear_opo_loss(hidden, w, problem.labels, problem.ref, problem.rewards,
                              logits_budget=value, **problem.layout)
    with pytest.raises(ValueError, match="logits_budget"):
        opo_kernels.FusedLinearOPOLoss(logits_budget=value)


def test_module_passes_the_budget():
    """The module's budget reaches the call: 4 rows kept, the same values as the function."""
    problem = Problem("packed", 291)
    module = opo_kernels.FusedLinearOPOLoss(chunk_size=3, logits_budget=4 * V * 4)
    assert "logits_budget=368" in repr(module)
    buf, weight, bias = problem.params(torch.float32)
    args = (problem.labels, problem.ref, problem.rewards)
    out = module(problem.view(buf), weight, *args, bias, **problem.layout)
    assert out.grad_fn.plan.held_rows == 4
    exp = fused_linear_opo_loss(problem.view(buf), weight, *args, bias=bias, chunk_size=3,
                                logits_budget=4 * V * 4, **problem.layout)
    assert torch.equal(out, exp)
    # and against the logits of the counted rows, materialized
    logits = F.linear(problem.view(buf), weight, bias)
    ref = opo_kernels.opo_loss(logits, *args, backend="torch", **problem.layout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
