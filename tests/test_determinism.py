"""Determinism: two identical calls give bitwise-identical loss, metrics and gradients.

Nothing in a call may depend on the order in which programs finish: no floating-point atomics
(the epilogue's per-sequence sums go through a workspace that ONE program reduces in a fixed
order) and no state left over from an earlier call (the epilogue's ticket is zeroed per call).
The problems are large enough for the epilogue to run several programs (B = 48 padded
sequences: 3 blocks of 16; B = 66 packed: 3 blocks of 32). On the CPU the interpreter runs
programs one after another, so there this mostly guards the per-call state; the same tests run
on CUDA in the GPU suite (``TRITON_INTERPRET=0 python -m pytest``), where programs race.
"""

import math

import pytest
import torch
from problems import DEVICE, make_problem, on_device

import opo_kernels

ON_CUDA = torch.device(DEVICE).type == "cuda"
V = 4099 if ON_CUDA else 50  # several vocabulary blocks on CUDA; the interpreter is slow
T = 32 if ON_CUDA else 5


def _call(problem, dtype, ref, **options):
    x = problem.leaf(dtype)
    loss, metrics = opo_kernels.opo_loss(x, problem.labels, ref, problem.rewards,
                                         return_metrics=True, backend="triton",
                                         **problem.layout, **options)
    (grad,) = torch.autograd.grad(loss * 1.3, x)
    return loss.detach(), metrics, grad


def _assert_identical(a, b):
    (loss_a, metrics_a, grad_a), (loss_b, metrics_b, grad_b) = a, b
    assert torch.equal(loss_a, loss_b), (loss_a.item(), loss_b.item())
    assert set(metrics_a) == set(metrics_b)
    for k in metrics_a:
        assert torch.equal(metrics_a[k], metrics_b[k]), k
    assert torch.equal(grad_a.nan_to_num(7), grad_b.nan_to_num(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
@pytest.mark.parametrize("layout,B", [("padded", 48), ("packed", 66)])
def test_opo_loss_bitwise_repeatable(layout, B, on_policy, dtype):
    problem = make_problem(B, T, V, torch.float32, layout, seed=B)
    ref = None if on_policy else problem.ref_logprobs
    options = dict(weights="escort", center_weights=True, entropy_coef=0.02,
                   level="token" if layout == "packed" else "sequence_mean")
    first = _call(problem, dtype, ref, **options)
    second = _call(problem, dtype, ref, **options)
    _assert_identical(first, second)
    assert torch.isfinite(first[0]) and first[2].abs().sum() > 0  # a real, non-zero result


@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
def test_fused_linear_bitwise_repeatable(on_policy):
    g = torch.Generator().manual_seed(0)
    B, H = 48, 16
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H)
    bias = torch.randn(V, generator=g) * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    rewards = torch.rand(B, generator=g)
    ref = -3 * torch.rand(B, T, generator=g)
    hidden, weight, bias, labels, mask, rewards, ref = on_device(
        (hidden, weight, bias, labels, mask, rewards, ref))
    results = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = opo_kernels.fused_linear_opo_loss(
            leaves[0], leaves[1], labels, None if on_policy else ref, rewards, bias=leaves[2],
            mask=mask, group_size=6, chunk_size=64, backend="triton")
        results.append((loss.detach(),) + torch.autograd.grad(loss, leaves))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout,B", [("padded", 48), ("packed", 66)])
def test_logprob_api_bitwise_repeatable(layout, B):
    problem = make_problem(B, T, 7, torch.float32, layout, seed=B + 1)
    lp = torch.log_softmax(problem.logits.nan_to_num().float(), -1).gather(
        -1, problem.labels.clamp(min=0)[..., None])[..., 0]
    results = []
    for _ in range(2):
        x = lp.detach().clone().requires_grad_()
        loss, metrics = opo_kernels.opo_loss_from_logprobs(
            x, problem.ref_logprobs, problem.rewards, vocab_size=7, return_metrics=True,
            backend="triton", **problem.layout)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss.detach(), metrics, grad))
    _assert_identical(*results)
