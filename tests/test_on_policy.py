"""On-policy one-pass mode (ref_logprobs=None): the forward kernel writes the gradient.

It must give the same loss, metrics and gradient as the reference with
ref_logprobs = the current log-probs, detached (docs/spec.md: π_ref = π_old = the sampling policy),
for every level/coordinates/weights option, entropy and temperature, both layouts, 16-bit
logits, upstream gradients of exactly 1 (the scale kernel returns at once) and not 1, and in
place.
"""

import itertools

import pytest
import torch
from problems import make_problem, true_logprobs
from test_opo_loss import TOL, assert_close, assert_matches, grad_atol

import opo_kernels
from opo_kernels import reference


def _detached_logprobs(problem, temperature):
    V = problem.logits.shape[-1]
    lp = true_logprobs(problem.logits.reshape(-1, V).nan_to_num(), problem.labels.reshape(-1),
                       temperature).view(problem.labels.shape)
    counted = (problem.layout["mask"] != 0 if "mask" in problem.layout
               else problem.layout["seq_ids"] >= 0)
    return torch.where(counted, lp, float("nan"))


GRID = list(itertools.product(["sequence", "sequence_mean", "token"], ["ratio", "log"],
                              ["seed", "escort"], ["padded", "packed"]))


@pytest.mark.parametrize("level,coords,weights,layout", GRID, ids=["-".join(g) for g in GRID])
def test_one_pass_matches_reference(level, coords, weights, layout):
    seed = GRID.index((level, coords, weights, layout))
    temperature = 0.8 if seed % 2 else 1.0
    problem = make_problem(9, 5, 13, torch.float32, layout, seed=seed, temperature=temperature)
    options = dict(level=level, coordinates=coords, weights=weights, temperature=temperature,
                   entropy_coef=0.05 * (seed % 3), center_weights=bool(seed % 4 == 1),
                   return_metrics=True, **problem.layout)
    upstream = 1.0 if seed % 3 == 0 else 0.37  # 1.0 exercises the early-exit of the scale
    ref = _detached_logprobs(problem, temperature)

    x64 = problem.leaf(torch.float64)
    exp_loss, exp_metrics = reference.opo_loss(x64, problem.labels, ref, problem.rewards,
                                               **options)
    (exp_grad,) = torch.autograd.grad(exp_loss * upstream, x64)
    x = problem.leaf()
    loss, metrics = opo_kernels.opo_loss(x, problem.labels, None, problem.rewards,
                                         backend="triton", **options)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    assert_matches(loss, metrics, grad, exp_loss, exp_metrics, exp_grad)


@pytest.mark.parametrize("upstream", [1.0, 2.5], ids=["g1", "g2.5"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_one_pass_16bit_and_inplace(dtype, inplace, upstream):
    """With 16-bit logits and an upstream gradient other than 1, the one-pass gradient is
    rounded twice (unit gradient in forward, then scaled in backward): two roundings' worth of
    tolerance there, one otherwise."""
    problem = make_problem(6, 7, 1000, dtype, "padded", seed=3)
    ref = _detached_logprobs(problem, 1.0)
    x64 = problem.leaf(torch.float64)
    exp_loss = reference.opo_loss(x64, problem.labels, ref, problem.rewards, entropy_coef=0.01,
                                  **problem.layout)
    (exp_grad,) = torch.autograd.grad(exp_loss * upstream, x64)
    x = problem.logits.detach().clone().requires_grad_()
    loss = opo_kernels.opo_loss(x, problem.labels, None, problem.rewards, backend="triton",
                                entropy_coef=0.01, inplace_backward=inplace, **problem.layout)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    assert (grad.data_ptr() == x.data_ptr()) == inplace
    assert_close(loss, exp_loss, *TOL[dtype]["loss"], "loss")
    rtol, frac = TOL[dtype]["grad"]
    roundings = 1 if upstream == 1.0 else 2
    assert_close(grad, exp_grad, roundings * rtol, grad_atol(exp_grad, frac), "grad")


def test_one_pass_backward_runs_once():
    problem = make_problem(3, 4, 7, torch.float32, "padded", seed=1)
    x = problem.leaf()
    loss = opo_kernels.opo_loss(x, problem.labels, None, problem.rewards, backend="triton",
                                **problem.layout)
    torch.autograd.grad(loss, x, retain_graph=True)
    with pytest.raises(RuntimeError, match="backward once"):
        torch.autograd.grad(loss, x)


@pytest.mark.parametrize("programs", [1, 3])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("entropy", [False, True], ids=["plain", "entropy"])
def test_persistent_launch_is_bitwise_the_same(layout, programs, entropy, monkeypatch):
    """The forward / one-pass kernel with a fixed number of programs looping over the rows
    (``LaunchConfig.programs_per_sm``, a launch-config candidate: the one-pass re-read may then
    hit L2) computes each row exactly as one program per row does: the same loss, metrics and
    gradient to the bit, counted rows and zero rows alike. programs_per_sm is a fraction of the
    device's SMs here (1 without CUDA), so that the grid is 1 or 3 programs for the 45 rows."""
    from opo_kernels import row_launch

    problem = make_problem(9, 5, 13, torch.float32, layout, seed=4)
    device = problem.logits.device
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 1)
    per_sm = programs / sms
    options = dict(entropy_coef=0.05 if entropy else 0.0, compute_entropy=entropy,
                   return_metrics=True, backend="triton", **problem.layout)
    results = []
    for launch in (0, per_sm):  # 0: one program per row, the same block and warps
        override = lambda kind, vocab, dtype, p=launch: (16, 4, 1, p)  # noqa: E731
        monkeypatch.setattr(row_launch, "LAUNCH_OVERRIDE", override)
        for ref in (None, problem.ref_logprobs):  # one-pass, then general (forward kernel)
            x = problem.leaf()
            loss, metrics = opo_kernels.opo_loss(x, problem.labels, ref, problem.rewards,
                                                 **options)
            (grad,) = torch.autograd.grad(loss * 0.7, x)
            results.append((loss, metrics, grad))
    assert row_launch._grid(45, per_sm, device) == programs
    for (loss, metrics, grad), (loss2, metrics2, grad2) in zip(results[:2], results[2:]):
        assert torch.equal(loss, loss2)
        assert all(torch.equal(metrics[k], metrics2[k]) for k in metrics)
        assert torch.equal(grad, grad2)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("entropy", [False, True], ids=["plain", "entropy"])
def test_reverse_gradient_pass_is_bitwise_the_same(layout, entropy, monkeypatch):
    """The one-pass kernel's gradient pass walks each row from its last block
    (``LaunchConfig.reverse``, the table's choice, so that it re-reads first what may still be
    in L2): every gradient element depends only on its logit and the row's statistics, so the
    loss, metrics and gradient are those of the forward walk to the bit. 4 blocks of 16 per
    row, the last one partial (V = 61)."""
    from opo_kernels import row_launch

    assert row_launch.launch_config(151936, torch.bfloat16, "onepass").reverse
    assert not row_launch.launch_config(151936, torch.bfloat16, "fwd").reverse
    problem = make_problem(6, 6, 61, torch.bfloat16, layout, seed=7)
    options = dict(entropy_coef=0.05 if entropy else 0.0, compute_entropy=entropy,
                   return_metrics=True, backend="triton", **problem.layout)
    results = []
    for reverse in (False, True):
        override = lambda kind, vocab, dtype, r=reverse: (16, 4, 1, 0, r)  # noqa: E731
        monkeypatch.setattr(row_launch, "LAUNCH_OVERRIDE", override)
        x = problem.leaf()
        loss, metrics = opo_kernels.opo_loss(x, problem.labels, None, problem.rewards, **options)
        (grad,) = torch.autograd.grad(loss * 0.7, x)
        results.append((loss, metrics, grad))
    (loss, metrics, grad), (loss2, metrics2, grad2) = results
    assert torch.equal(loss, loss2)
    assert all(torch.equal(metrics[k], metrics2[k]) for k in metrics)
    assert torch.equal(grad, grad2)
    assert grad.abs().amax(-1).gt(0).any()  # not an all-zero gradient
