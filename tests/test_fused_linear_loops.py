"""Fused-linear OPO, the loops: the on-policy one-phase path (gradients formed in forward)
against the float64 oracle and against the two-phase path, and the chunking contract (how many
logits a launch sees, how the chunks and the backward's blocks tile the rows and the
vocabulary, the default chunk and block sizes). The problems: linear_problems.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from linear_problems import B, Problem, T, V, assert_close, compare, grad_atol, run, upstream

import opo_kernels
import opo_kernels.linear_chunks as chunks
import opo_kernels.linear_plan as linear_plan
from opo_kernels import fused_linear_opo_loss, reference

# ---- on-policy (ref_logprobs=None): the one-phase path --------------------------------------
ON_POLICY = list(itertools.product(["padded", "packed"], [1, 3, 64], [0.0, 0.05]))


@pytest.mark.parametrize("layout,chunk,beta", ON_POLICY,
                         ids=[f"{lay}-chunk{c}{f'-ent{b}' if b else ''}"
                              for lay, c, b in ON_POLICY])
def test_on_policy_matches_reference(layout, chunk, beta):
    seed = ON_POLICY.index((layout, chunk, beta)) + 80
    # logits_budget=0: chunks of exactly chunk_size rows (a budget would enlarge them)
    compare(Problem(layout, seed), torch.float32, seed, on_policy=True, chunk_size=chunk,
            logits_budget=0, entropy_coef=beta,
            level="token" if chunk == 3 else "sequence_mean")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_on_policy_bf16(layout):
    compare(Problem(layout, 90), torch.bfloat16, 90, on_policy=True, chunk_size=3,
            entropy_coef=0.05)


def test_on_policy_scale_is_one_rounding_and_leaves_the_saved_gradient():
    """The one-phase backward's scale (one op): an fp32 accumulator to a 16-bit parameter,
    and a 16-bit gradient (∂hidden, a one-chunk ∂W) to its own dtype, equal the fp32
    multiply-then-cast they replace, bit for bit — the scale is not rounded to 16 bits first
    (1/3 and 0.1 are not bf16 values) — and leave their input untouched; a retained
    graph's second backward gives the first one's gradients."""
    from opo_kernels.fused_linear_opo import _scale

    g = torch.Generator().manual_seed(3)
    acc = torch.randn(50, 8, generator=g, dtype=torch.float64).float()
    for s in (1.0, -0.37, 3.1e4, 1 / 3, 0.1):
        scale = torch.tensor(s)
        for dtype in (torch.bfloat16, torch.float16):
            for grad in (acc, acc.to(dtype)):
                before = grad.clone()
                got = _scale(grad, scale, dtype)
                assert got.dtype == dtype
                assert torch.equal(got, (grad.float() * scale).to(dtype)), (s, dtype)
                assert torch.equal(grad, before)
    # the same without the fp32 step would differ: the check above can fail
    bf16 = acc.to(torch.bfloat16)
    assert not torch.equal(bf16 * torch.tensor(1 / 3).to(torch.bfloat16),
                           (bf16.float() * (1 / 3)).to(torch.bfloat16))

    problem = Problem("padded", 11)
    leaves = [t.requires_grad_() for t in problem.params(torch.bfloat16)]
    loss = opo_kernels.fused_linear_opo_loss(
        problem.view(leaves[0]), leaves[1], problem.labels, None, problem.rewards,
        bias=leaves[2], backend="triton", chunk_size=3, **problem.layout)
    first = torch.autograd.grad(2.5 * loss, leaves, retain_graph=True)
    second = torch.autograd.grad(2.5 * loss, leaves)
    for name, a, b in zip(("hidden", "weight", "bias"), first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_on_policy_one_phase_equals_two_phase(layout):
    """ref_logprobs=None (one phase, gradients formed in forward) must give what the two-phase
    path gives with ref_logprobs = the current log-probs (Δ = 0, same τ inputs): loss, metrics
    and all three gradients, up to fp32 rounding."""
    problem = Problem(layout, 7)
    buf, weight, bias = problem.params(torch.float32)
    lp = reference.token_stats(F.linear(problem.view(buf), weight, bias).detach().reshape(-1, V),
                               problem.labels.reshape(-1).clamp(min=0), 1.0, False)[0]
    problem.ref = torch.where(problem.counted, lp.view(problem.counted.shape), float("nan"))
    g = upstream(7).float()
    one = run(problem, "triton", torch.float32, g, on_policy=True, chunk_size=3,
              logits_budget=0, entropy_coef=0.05)
    two = run(problem, "triton", torch.float32, g, chunk_size=3, entropy_coef=0.05)
    assert_close(one[0], two[0], 1e-5, 1e-6, "loss")
    for k in one[1]:
        assert_close(one[1][k], two[1][k], 1e-5, 1e-6, f"metric {k}")
    for name, a, b in zip(("hidden", "weight", "bias"), one[2], two[2]):
        assert_close(a, b, 1e-4, grad_atol(b, 2e-6), f"grad {name}")


def test_on_policy_without_grad_and_partial_grad():
    """No gradient wanted -> forward only (same loss); only weight wanted -> only its gradient
    is formed, and equal to the full run's."""
    problem = Problem("padded", 8)
    buf, weight, bias = problem.params(torch.float32)
    args = (problem.labels, None, problem.rewards)
    full = fused_linear_opo_loss(problem.view(buf), weight, *args, bias=bias, chunk_size=3,
                                 **problem.layout)
    grads = torch.autograd.grad(full, (buf, weight, bias))
    with torch.no_grad():
        no_grad = fused_linear_opo_loss(problem.view(buf), weight, *args, bias=bias,
                                        chunk_size=3, **problem.layout)
    assert no_grad.item() == full.item()
    hidden = problem.view(buf).detach()
    only_w = fused_linear_opo_loss(hidden, weight, *args, bias=bias.detach(), chunk_size=3,
                                   **problem.layout)
    (grad_w,) = torch.autograd.grad(only_w, weight)
    torch.testing.assert_close(grad_w, grads[1], rtol=0, atol=0)


# ---- the chunking contract: how many logits exist, how many passes --------------------------
@pytest.mark.parametrize("on_policy", [False, True], ids=["two-phase", "on-policy-one-phase"])
@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("vocab", [V, 11], ids=["M<V", "M>=V"])
def test_chunks_bound_logits_and_count_passes(monkeypatch, chunk, on_policy, vocab):
    """With logits_budget=0 (nothing kept, on-policy chunks of chunk_size rows), every kernel
    launch sees at most chunk × V logits, of counted rows only. Forward: the chunks tile the
    M counted rows exactly (M = 12 of the N = 20 padded rows), one launch each. On-policy:
    those (one-pass) launches only. Two-phase backward: with M = 12 < V = 23 the launches are
    blocks of columns over all M rows that tile the vocabulary (``vocab_block_size`` columns
    each); with V = 11 <= M = 11, one launch per chunk of rows, as in forward."""
    calls = {"forward": [], "backward": []}

    def spy(kind, fn):
        def wrapped(logits, *args, **kwargs):
            calls[kind].append(tuple(logits.shape))
            return fn(logits, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(chunks, "forward_rows", spy("forward", chunks.forward_rows))
    monkeypatch.setattr(chunks, "backward_rows", spy("backward", chunks.backward_rows))
    problem = Problem("padded", 9, V=vocab)
    counted = int(problem.counted.sum())
    assert counted == {V: 12, 11: 11}[vocab] < B * T
    buf, weight, bias = problem.params(torch.float32)
    ref = None if on_policy else problem.ref
    loss = fused_linear_opo_loss(problem.view(buf), weight, problem.labels, ref,
                                 problem.rewards, bias=bias, chunk_size=chunk, logits_budget=0,
                                 **problem.layout)
    n_chunks = -(-counted // chunk)
    assert len(calls["forward"]) == n_chunks and not calls["backward"]
    loss.backward()
    assert len(calls["forward"]) == n_chunks, "backward must not rerun the forward kernel"
    for shape in calls["forward"]:
        assert shape[0] <= chunk and shape[1] == vocab
    assert sum(s[0] for s in calls["forward"]) == counted
    if on_policy:
        assert not calls["backward"]
    elif vocab > counted:
        width = {1: 1, 3: 5, 8: 15}[chunk]  # chunk · V // M
        assert calls["backward"] == [(counted, min(width, vocab - start))
                                     for start in range(0, vocab, width)]
        assert chunks.vocab_block_size(counted, vocab, chunk) == width
    else:
        assert calls["backward"] == calls["forward"]


@pytest.mark.parametrize("rows,vocab,chunk,expected", [
    (16384, 128256, 1024, 7936),  # 8016 columns fit: whole multiples of 256
    (16384, 151936, 512, 4608),   # 4748
    (100, 40, 7, 2),              # 2.8 columns
    (100, 400, 7, 16),            # 28 -> a multiple of 16
    (16384, 32003, 512, 992),     # 1000: multiples of 16 below 4096 columns
    (100, 400, 100, 400),         # one block holds the vocabulary
    (0, 50, 1, 50),
])
def test_vocab_block_size(rows, vocab, chunk, expected):
    block = chunks.vocab_block_size(rows, vocab, chunk)
    assert block == expected
    assert block == vocab or block * rows <= chunk * vocab  # no more logits than a chunk's


def test_backward_cuts_the_smaller_dimension():
    assert chunks.blocks_over_vocab(16384, 128256) and chunks.blocks_over_vocab(20, 23)
    assert not chunks.blocks_over_vocab(65536, 32000) and not chunks.blocks_over_vocab(23, 23)


@pytest.mark.parametrize("rows,vocab,dtype,expected", [
    (10**5, 151936, torch.bfloat16, 512),   # 256 MiB / (151936·2 B) = 883 -> 512
    (10**5, 32000, torch.bfloat16, 4096),   # 4194 -> 4096
    (10**5, 32000, torch.float32, 2048),
    (10**5, 2**21, torch.float32, 128),     # 32 rows fit: raised to the 128-row floor
    (20, 32000, torch.float32, 20),         # never more than N
    (0, 50, torch.float32, 1),
])
def test_default_chunk_size(rows, vocab, dtype, expected):
    assert linear_plan.default_chunk_size(rows, vocab, dtype) == expected


# ---- the split sums' matmuls ------------------------------------------------------------------
def test_addmm_probe_is_remembered_per_device_type(monkeypatch):
    """``_addmm_sums_in_place`` asks torch once per device type whether addmm adds a 16-bit
    product into an fp32 tensor (``out_dtype``), and remembers the answer: False where the
    call raises (here the CPU, which has no such kernel), True where it runs."""
    monkeypatch.setattr(chunks, "_ADDMM_SUMS", {})
    cpu = torch.device("cpu")
    assert chunks._addmm_sums_in_place(cpu) is False
    assert chunks._ADDMM_SUMS == {"cpu": False}

    calls = []

    def addmm(acc, a, b, out_dtype=None, out=None):
        calls.append((acc.dtype, a.dtype, b.dtype, out_dtype, out is acc))
        return out

    monkeypatch.setattr(chunks, "_ADDMM_SUMS", {})
    monkeypatch.setattr(torch, "addmm", addmm)
    assert chunks._addmm_sums_in_place(cpu) is True
    assert chunks._addmm_sums_in_place(cpu) is True  # remembered: asked once
    assert calls == [(torch.float32, torch.bfloat16, torch.bfloat16, torch.float32, True)]
