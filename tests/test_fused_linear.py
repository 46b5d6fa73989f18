"""Fused-linear OPO (logits = hidden @ weight.T + bias) against the in-package reference on
materialized logits: loss, metrics AND the gradients of hidden, weight and bias, with a random
upstream gradient (the problems and the float64 oracle: linear_problems.py).

What this file must cover is the chunking: chunk 1 (one row per chunk), 3 (chunks cut through
sequences: T=5, and packed sequences are interleaved anyway), 64 (> N, one chunk) and the
default; both loops of the backward (blocks of columns or chunks of rows), with no logits kept
and with the first rows' kept (``logits_budget``); both layouts (padded hidden is a [:, :-1]
view, packed hidden rows have a row stride H + 3); an empty sequence; with and without bias;
fp32, bf16 and fp64; every option; gradcheck; bad input. The on-policy one-phase path and the
loops' launch counts: test_fused_linear_loops.py; the budget, the counted rows and the matmul
counts: test_fused_linear_budget.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from linear_problems import (
    DTYPE_NAME,
    TOL,
    B,
    H,
    Problem,
    T,
    V,
    assert_close,
    compare,
    grad_atol,
    run,
)
from problems import DEVICE, on_device

import opo_kernels
import opo_kernels.linear_chunks as chunks
import opo_kernels.utils as ok_utils
from opo_kernels import fused_linear_opo_loss

# ---- the chunking grid: layouts × chunk sizes × bias × dtype × loop ------------------------
# loop: which dimension the backward cuts (linear_chunks.backward_chunks picks the smaller of N
# and V; here both are forced on the same problems). "vocab": chunk 1 -> 23 blocks of one
# column, 3 -> blocks of 3 columns, 64 and the default -> one block of all 23.
CHUNKS = [1, 3, 64, None]  # one row, cuts through sequences, > N (one chunk), default (= N)
GRID = list(itertools.product(["padded", "packed"], CHUNKS, [True, False],
                              [torch.float32, torch.bfloat16], ["vocab", "rows"]))


def _grid_id(case):
    layout, chunk, bias, dtype, loop = case
    kept = "-kept5" if _budget(GRID.index(case) // 2, dtype) else ""
    return (f"B{B}-T{T}-H{H}-V{V}-{layout}-chunk{chunk if chunk else 'default'}"
            f"{'-bias' if bias else ''}-{DTYPE_NAME[dtype]}-{loop}{kept}")


def force_loop(monkeypatch, loop):
    """Make the backward cut the vocabulary ("vocab") or the rows ("rows") whatever N and V."""
    monkeypatch.setattr(chunks, "blocks_over_vocab", lambda rows, vocab: loop == "vocab")


def _budget(seed, dtype):
    """logits_budget of a grid case: 0 (every row recomputed) or the logits of 5 rows kept
    (the backward's loop then runs on the other rows, from row 5): by the parity of the
    seed's bits, so that each dtype, bias and chunk size gets both."""
    return 0 if bin(seed).count("1") % 2 else 5 * V * dtype.itemsize


@pytest.mark.parametrize("case", GRID, ids=[_grid_id(c) for c in GRID])
def test_matches_reference(monkeypatch, case):
    layout, chunk, bias, dtype, loop = case
    force_loop(monkeypatch, loop)
    seed = GRID.index(case) // 2  # both loops on the same problem
    problem = Problem(layout, seed, bias=bias)
    # only the fused path depends on the chunk size: run the torch reference once per problem
    backends = ("triton", "torch") if chunk == 1 and loop == "vocab" else ("triton",)
    compare(problem, dtype, seed, backends=backends, chunk_size=chunk,
            logits_budget=_budget(seed, dtype), entropy_coef=0.03)


# ---- every option reaches the epilogue (the epilogue itself is tested in test_opo_loss) -----
OPTIONS = [
    dict(level="sequence", coordinates="ratio", weights="escort", alpha=0.3, mu=2.0),
    dict(level="sequence_mean", coordinates="log", center_weights=True, adaptive_tau=False,
         tau=0.8),
    dict(level="token", coordinates="ratio", entropy_coef=0.05, temperature=0.7),
    dict(level="token", coordinates="log", weights="tensor", tau_range=(0.3, 0.9),
         reward_temperature=0.5),
]


def _opt_id(opts):
    fmt = lambda v: "_".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
    return "-".join(fmt(v) if isinstance(v, str) else f"{k}{fmt(v)}" for k, v in opts.items())


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("opts", OPTIONS, ids=[_opt_id(o) for o in OPTIONS])
def test_options(opts, layout):
    seed = OPTIONS.index(opts) + 50
    opts = dict(opts)
    if opts.get("weights") == "tensor":
        opts["weights"] = on_device(torch.randn(B, generator=torch.Generator().manual_seed(seed)))
    compare(Problem(layout, seed), torch.float32, seed, chunk_size=3, **opts)


# ---- gradcheck -----------------------------------------------------------------------------
# weights=<[B] tensor>: with "seed"/"escort" weights ω depends on δ through p̃ and the spec's
# gradient treats ω as a constant, so finite differences would (rightly) disagree. On-policy
# mode cannot be gradchecked: π_ref moves with the parameters, so the loss is flat.
@pytest.mark.parametrize("layout,level", [("padded", "sequence_mean"), ("packed", "token")])
def test_gradcheck(layout, level):
    problem = Problem(layout, 11, B=4, T=3, H=4, V=5)
    buf, weight, bias = problem.params(torch.float64)
    hidden = problem.view(buf).detach().clone().requires_grad_()
    omega = on_device(torch.tensor([0.7, -0.4, 1.3, 0.2], dtype=torch.float64))

    def fn(h, w, b):
        return fused_linear_opo_loss(h, w, problem.labels, problem.ref.double(),
                                     problem.rewards, bias=b, chunk_size=2, weights=omega,
                                     level=level, entropy_coef=0.1, backend="triton",
                                     **problem.layout)

    # fast mode (a directional derivative along a random vector for each input; it fails on one
    # partial off by 1e-4, tests/test_gradcheck.py): the whole Jacobian of 73 inputs costs the
    # interpreter ~1 min; the grid above checks every gradient against float64 autograd
    # through the linear layer and the reference (whose own gradcheck is whole)
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), fast_mode=True)


# ---- behaviours ----------------------------------------------------------------------------
def test_float64_inputs():
    problem = Problem("packed", 12)
    compare(problem, torch.float64, 12, backends=("triton",), chunk_size=3, entropy_coef=0.02)


def test_strided_packed_labels_and_seq_ids():
    """1-D labels / seq_ids that are strided views are read through their values."""
    problem = Problem("packed", 17)
    problem.labels = torch.stack([problem.labels, -problem.labels], 1)[:, 0]
    problem.layout["seq_ids"] = torch.stack([problem.layout["seq_ids"]] * 2, 1)[:, 0]
    assert problem.labels.stride() == (2,) and problem.layout["seq_ids"].stride() == (2,)
    compare(problem, torch.float32, 17, backends=("triton",), chunk_size=3)


def test_inputs_not_modified():
    problem = Problem("padded", 13)
    buf, weight, bias = problem.params(torch.float32)
    before = [t.detach().clone() for t in (buf, weight, bias)]
    labels, ref = problem.labels.clone(), problem.ref.clone()
    loss = fused_linear_opo_loss(problem.view(buf), weight, problem.labels, problem.ref,
                                 problem.rewards, bias=bias, chunk_size=3, **problem.layout)
    loss.backward()
    for a, b in zip((buf, weight, bias), before):
        assert torch.equal(a.detach().nan_to_num(7), b.nan_to_num(7))
    assert torch.equal(problem.labels, labels)
    assert torch.equal(problem.ref.nan_to_num(7), ref.nan_to_num(7))


@pytest.mark.parametrize("on_policy", [False, True], ids=["off-policy", "on-policy"])
def test_no_counted_token_gives_zero(on_policy):
    problem = Problem("padded", 14)
    problem.layout["mask"] = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    for backend in ("triton", "torch"):
        loss, metrics, grads = run(problem, backend, torch.float32, torch.tensor(1.3),
                                   on_policy=on_policy, chunk_size=3)
        assert loss.item() == 0.0
        assert all((g == 0).all() for g in grads)
        assert all(torch.isfinite(v) for v in metrics.values())


def test_module():
    problem = Problem("packed", 15)
    module = opo_kernels.FusedLinearOPOLoss(chunk_size=3, alpha=0.4, level="token")
    assert "chunk_size=3" in repr(module) and "alpha=0.4" in repr(module)
    buf, weight, bias = problem.params(torch.float32)
    args = (problem.labels, problem.ref, problem.rewards)
    out = module(problem.view(buf), weight, *args, bias, **problem.layout)
    exp = fused_linear_opo_loss(problem.view(buf), weight, *args, bias=bias, alpha=0.4,
                                level="token", backend="torch", **problem.layout)
    assert_close(out.detach(), exp.detach(), 1e-5, 1e-6, "module loss")
    with pytest.raises(ValueError, match="chunk_size"):
        opo_kernels.FusedLinearOPOLoss(chunk_size=0)


def _bad_inputs():
    p = Problem("padded", 16)
    hidden, w, b = p.view(p.buffer).float(), p.weight.float(), p.bias.float()
    args = (p.labels, p.ref, p.rewards)
    ok = dict(bias=b, **p.layout)
    nan_hidden = hidden.clone()
    nan_hidden[0, 0, 0] = float("nan")  # row (0, 0) is counted
    inf_weight = w.clone()
    inf_weight[3, 1] = float("inf")
    bad_labels = p.labels.clone()
    bad_labels[0, 0] = V
    return {
        "hidden-int": ((hidden.long(), w, *args), ok, TypeError, "hidden must be"),
        "hidden-1d": ((hidden[0, 0], w, *args), ok, ValueError, "hidden must be"),
        "weight-H": ((hidden, w[:, :-1], *args), ok, ValueError, "weight has shape"),
        "weight-dtype": ((hidden, w.double(), *args), ok, TypeError, "weight has dtype"),
        "bias-shape": ((hidden, w, *args), {**ok, "bias": b[:-1]}, ValueError, "bias must"),
        "chunk-size": ((hidden, w, *args), {**ok, "chunk_size": 0}, ValueError, "chunk_size"),
        "labels-shape": ((hidden, w, p.labels[:, :-1], p.ref, p.rewards), ok, ValueError,
                         r"labels has shape .* hidden @ weight.T"),
        "label-range": ((hidden, w, bad_labels, p.ref, p.rewards), ok, ValueError, "labels"),
        "nan-hidden": ((nan_hidden, w, *args), ok, ValueError,
                       r"^hidden: 1 counted row\(s\) with a non-finite value"),
        "inf-weight": ((hidden, inf_weight, *args), ok, ValueError,
                       r"^weight: 1 row\(s\) \(vocabulary entries\) with a non-finite"),
        "budget": ((hidden, w, *args), {**ok, "logits_budget": -1}, ValueError,
                   "logits_budget"),
        "no-group": ((hidden, w, *args), {"bias": b, "mask": p.layout["mask"]}, ValueError,
                     "group_size"),
        "reduce-hidden-grad": ((hidden, w, *args), {**ok, "reduce_hidden_grad": "yes"},
                               TypeError, "reduce_hidden_grad must be a bool"),
        # options of the logits path
        **{name: ((hidden, w, *args), {**ok, name: True}, ValueError, f"^{name}")
           for name in ("inplace_backward", "grad_to_base", "vocab_parallel_one_pass")},
    }


BAD = _bad_inputs()


# (the interpreter's numpy warns about inf - inf in the inf-weight case: the kernel's NaN)
@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name, backend):
    args, kwargs, exc, pattern = BAD[name]
    with pytest.raises(exc, match=pattern):
        fused_linear_opo_loss(*args, backend=backend, **kwargs)


def test_poisoned_outputs_are_on():
    """The NaN poisoning of kernel outputs (conftest) also covers this op's [N, H] gradient."""
    assert ok_utils.POISON_OUTPUTS
    out = chunks._grad_buffers(torch.zeros(2, 3), torch.zeros(4, 3), None,
                               (True, False, False))
    assert torch.isnan(out[0]).all()


# ---- GPU (compiled kernels; skipped without CUDA): the memory bound at a real vocabulary ----
GPU_CASES = [("general", 0), ("general", 2**27), ("on_policy", 0), ("on_policy", 2**27)]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,budget", GPU_CASES,
                         ids=[f"{m}-budget{b >> 20}MiB" for m, b in GPU_CASES])
def test_gpu_memory_bound_and_values(mode, budget):
    """Peak memory of forward + backward stays within logits_budget + one chunk of logits +
    the gradients and their accumulators, well below ONE [N, V] bf16 logits tensor, and the
    result matches the torch backend on the fp32 values of the same bf16 inputs."""
    on_policy = mode == "on_policy"
    dev, n_seq, T_, H_, V_, chunk = "cuda", 16, 1024, 1024, 32003, 512
    N = n_seq * T_
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(N, H_, device=dev, generator=g).bfloat16()
    weight = (torch.randn(V_, H_, device=dev, generator=g) * (2 / math.sqrt(H_))).bfloat16()
    labels = torch.randint(0, V_, (N,), device=dev, generator=g)
    seq = torch.arange(N, device=dev) // T_
    seq = torch.where(torch.rand(N, device=dev, generator=g) < 0.8, seq, -1)
    M = int((seq >= 0).sum())  # counted rows: the only ones multiplied
    rewards = torch.rand(n_seq, device=dev, generator=g)
    ref = None
    if not on_policy:
        with torch.no_grad():
            lp = torch.cat([torch.log_softmax(F.linear(h.float(), weight.float()), -1)
                            .gather(-1, lab[:, None])[:, 0]
                            for h, lab in zip(hidden.split(chunk), labels.split(chunk))])
        ref = lp + 0.05 * torch.randn(N, device=dev, generator=g)
    kw = dict(seq_ids=seq, group_size=4)
    hidden.requires_grad_()
    weight.requires_grad_()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_linear_opo_loss(hidden, weight, labels, ref, rewards, chunk_size=chunk,
                                 logits_budget=budget, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    logits_bytes = N * V_ * 2
    chunk_bytes = chunk * V_ * 2
    # beyond the logits: the counted rows of hidden (bf16, kept), hidden's gradient (the
    # counted rows, and scattered to [N, H]), O(N) statistics and 64 MiB of slack for the
    # matmuls' workspace and the allocator
    bound = M * H_ * 2 + M * H_ * 2 + N * H_ * 2 + 64 * N * 8 + 2**26
    if on_policy:  # one chunk of max(chunk, budget) logits; the fp32 [V, H] sum of ∂W, its
        # per-chunk bf16 product and the bf16 result; ∂hidden scaled through fp32
        bound += max(budget, chunk_bytes) + V_ * H_ * (4 + 2 + 2) + M * H_ * (4 + 4)
    else:  # M < V: the kept logits (<= budget), one block of <= chunk·V recomputed logits,
        # ∂W in bf16 (no accumulator), the fp32 [M, H] sum of ∂hidden and a block's product
        assert chunks.blocks_over_vocab(M, V_)
        bound += budget + chunk_bytes + V_ * H_ * 2 + M * H_ * (4 + 2)
    assert bound < logits_bytes
    assert peak <= bound, f"peak {peak / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"

    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    exp = fused_linear_opo_loss(h32, w32, labels, ref, rewards, backend="torch", **kw)
    exp_grads = torch.autograd.grad(exp, (h32, w32))
    rtol_l, atol_l = TOL[torch.bfloat16]["loss"]
    rtol_g, atol_g = TOL[torch.bfloat16]["grad"]
    assert_close(loss.detach(), exp.detach(), rtol_l, atol_l, "loss")
    for name, a, b in zip(("hidden", "weight"), grads, exp_grads):
        assert_close(a, b, rtol_g, grad_atol(b, atol_g), f"grad {name}")


def test_sizes_take_numpy_integers():
    """chunk_size and logits_budget as NumPy integers (like group_size): the same call as with
    ints, on the function and the module."""
    np = pytest.importorskip("numpy")
    p = Problem("padded", 16)
    hidden, w = p.view(p.buffer).float(), p.weight.float()
    args = (hidden, w, p.labels, p.ref, p.rewards)
    expected = fused_linear_opo_loss(*args, chunk_size=3, logits_budget=200, **p.layout)
    got = fused_linear_opo_loss(*args, chunk_size=np.int64(3), logits_budget=np.int32(200),
                                **p.layout)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    module = opo_kernels.FusedLinearOPOLoss(chunk_size=np.int64(3), logits_budget=np.int64(200))
    assert type(module.chunk_size) is int and type(module.logits_budget) is int


def test_inside_torch_compile_it_runs_eagerly():
    """In a compiled function the call is a graph break (torch.compiler.disable): the same
    loss and gradients as the eager call."""
    p = Problem("padded", 16)
    hidden, w = p.view(p.buffer).float(), p.weight.float()
    args = (p.labels, p.ref, p.rewards)

    def step(h, weight):
        return fused_linear_opo_loss(h, weight, *args, chunk_size=3, **p.layout)

    results = []
    for fn in (step, torch.compile(step, backend="eager")):
        h, weight = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(h, weight)
        results.append((loss, *torch.autograd.grad(loss, (h, weight))))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


AUTOCAST = list(itertools.product([False, True], [0, None], [False, True]))


@pytest.mark.parametrize("on_policy,budget,backward_inside", AUTOCAST,
                         ids=[f"{'on_policy' if o else 'general'}-budget{b}"
                              f"{'-backward_inside' if i else ''}" for o, b, i in AUTOCAST])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_under_autocast(on_policy, budget, backward_inside, backend):
    """Under torch.autocast (fp32 master weights, the usual mixed-precision step), the LM
    head's operands are cast to autocast's dtype as a linear layer's would be, and the loss
    runs on them with autocast off: the same loss as the call on bf16 copies, and the same
    gradients, returned in fp32 — with the backward inside the autocast region or not (the
    torch backend's backward is autograd's: on the CPU, inside the region, autocast applies
    to its ops, which PyTorch advises against anyway)."""
    if backward_inside and backend == "torch":
        pytest.skip("autograd's own backward ops under autocast: not this package's")
    p = Problem("padded", 21)
    buf, weight, bias = p.params(torch.float32)
    device = buf.device.type
    ref = None if on_policy else p.ref
    kwargs = dict(bias=bias, chunk_size=3, logits_budget=budget, backend=backend, **p.layout)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = fused_linear_opo_loss(p.view(buf), weight, p.labels, ref, p.rewards, **kwargs)
        if backward_inside:
            grads = torch.autograd.grad(loss, (buf, weight, bias))
    if not backward_inside:
        grads = torch.autograd.grad(loss, (buf, weight, bias))
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (buf, weight, bias)]
    kwargs["bias"] = low[2]
    want_loss = fused_linear_opo_loss(p.view(low[0]), low[1], p.labels, ref, p.rewards,
                                      **kwargs)
    want = torch.autograd.grad(want_loss, low)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for name, got, expected in zip(("hidden", "weight", "bias"), grads, want):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, expected.float(), rtol=0, atol=0, msg=name)
