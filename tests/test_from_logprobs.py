"""opo_loss_from_logprobs (docs/spec.md "The entry points"): the same loss, metrics and
options as opo_loss from per-token log-probs (and entropy) the caller computed.

- the identity: opo_loss(logits, ...) == opo_loss_from_logprobs(log_softmax(logits)[label], ...)
  in loss, metrics and gradient w.r.t. the logits through autograd, over the option grid;
- the fused path (epilogue kernel + gradient kernel) against the reference: ∂L/∂lp_t = c_t and
  ∂L/∂H_t = −β/N' with a random upstream gradient, 16-bit log-probs, strided views;
- gradcheck in float64; bad input naming the argument, nothing modified.
"""

import itertools

import pytest
import torch
from problems import DEVICE, make_problem, on_device
from test_opo_loss import TOL, assert_close, grad_atol

import opo_kernels


def _logprobs(problem, temperature=1.0, dtype=None):
    """(leaf logits, lp [B, T] / [N], entropy) with autograd from the leaf to both."""
    leaf = problem.leaf(dtype)
    z = leaf.nan_to_num().to(torch.float64 if leaf.dtype == torch.float64 else torch.float32)
    log_p = torch.log_softmax(z / temperature, -1)
    lp = log_p.gather(-1, problem.labels.clamp(min=0)[..., None])[..., 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    return leaf, lp, entropy


GRID = list(itertools.product(["sequence", "sequence_mean", "token"], ["ratio", "log"],
                              ["seed", "escort"], [0.0, 0.05], ["padded", "packed"]))


@pytest.mark.parametrize("level,coords,weights,beta,layout", GRID,
                         ids=["-".join(map(str, g)) for g in GRID])
def test_identity_with_opo_loss(level, coords, weights, beta, layout):
    seed = GRID.index((level, coords, weights, beta, layout))
    temperature = 0.8 if seed % 2 else 1.0
    problem = make_problem(9, 5, 13, torch.float32, layout, seed=seed, temperature=temperature)
    options = dict(level=level, coordinates=coords, weights=weights, entropy_coef=beta,
                   center_weights=bool(seed % 3 == 1), return_metrics=True, backend="triton",
                   **problem.layout)
    g = 0.6 + (seed % 5) / 4  # an upstream gradient other than 1
    x = problem.leaf()
    loss, metrics = opo_kernels.opo_loss(x, *problem.args(), temperature=temperature,
                                         compute_entropy=True, **options)
    (grad,) = torch.autograd.grad(loss * g, x)

    leaf, lp, entropy = _logprobs(problem, temperature)
    loss2, metrics2 = opo_kernels.opo_loss_from_logprobs(
        lp, problem.ref_logprobs, problem.rewards, entropy=entropy, vocab_size=13, **options)
    (grad2,) = torch.autograd.grad(loss2 * g, leaf)
    rtol, atol = TOL[torch.float32]["loss"]
    assert_close(loss2, loss.detach(), rtol, atol, "loss")
    assert set(metrics2) == set(metrics)
    for k in metrics:
        assert_close(metrics2[k], metrics[k], rtol, atol, k)
    counted = (problem.layout["mask"] != 0 if "mask" in problem.layout
               else problem.layout["seq_ids"] >= 0)
    rtol, frac = TOL[torch.float32]["grad"]
    assert_close(grad2[counted], grad[counted], rtol, grad_atol(grad, frac), "grad")


@pytest.mark.parametrize("level", ["sequence", "sequence_mean", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
def test_gradients_against_reference(layout, dtype, on_policy, level):
    """∂L/∂lp and ∂L/∂H of the fused path vs the reference's autograd, on strided inputs,
    every level, a random upstream gradient."""
    seed = ["sequence", "sequence_mean", "token"].index(level)
    problem = make_problem(9, 6, 11, torch.float32, layout, seed=3 + seed)
    _, lp, entropy = _logprobs(problem)
    base = torch.stack([lp.detach(), torch.zeros_like(lp)], -1).to(dtype)
    ref = None if on_policy else problem.ref_logprobs
    g = torch.randn((), generator=torch.Generator().manual_seed(seed)) + 1.5
    results = {}
    for backend in ("torch", "triton"):
        x = base.clone().requires_grad_()
        h = entropy.detach().clone().requires_grad_()
        loss, metrics = opo_kernels.opo_loss_from_logprobs(
            x[..., 0], ref, problem.rewards, entropy=h, vocab_size=11, entropy_coef=0.07,
            level=level, return_metrics=True, backend=backend, **problem.layout)
        gx, gh = torch.autograd.grad(loss * g, (x, h))
        assert gx.dtype == dtype and (gx[..., 1] == 0).all()
        results[backend] = (loss.detach(), metrics, gx[..., 0].float(), gh)
    loss_t, metrics_t, gx_t, gh_t = results["triton"]
    loss_r, metrics_r, gx_r, gh_r = results["torch"]
    rtol, atol = TOL[torch.float32]["loss"]
    assert_close(loss_t, loss_r, rtol, atol, "loss")
    for k in metrics_r:
        assert_close(metrics_t[k], metrics_r[k], rtol, atol, k)
    grad_rtol = TOL[dtype]["grad"][0]
    assert_close(gx_t, gx_r, grad_rtol, grad_atol(gx_r, 4e-6), "grad logprobs")
    assert_close(gh_t, gh_r, 1e-6, 1e-9, "grad entropy")
    counted = (problem.layout["mask"] != 0 if "mask" in problem.layout
               else problem.layout["seq_ids"] >= 0)
    n_tokens = counted.sum()
    assert_close(gh_t[counted], torch.full_like(gh_t[counted], -0.07 * g.item() / n_tokens),
                 1e-6, 0, "∂L/∂H = −β/N'")
    assert (gx_t[~counted] == 0).all() and (gh_t[~counted] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradcheck(layout, backend):
    """Float64; ω constant w.r.t. the log-probs (α = 1: ω = Q) so finite differences apply."""
    problem = make_problem(6, 3, 5, torch.float64, layout, seed=2, scale=0.5, noise=0.05)
    _, lp, entropy = _logprobs(problem)
    lp, entropy = lp.detach().requires_grad_(), entropy.detach().requires_grad_()
    fn = lambda a, h: opo_kernels.opo_loss_from_logprobs(  # noqa: E731
        a, problem.ref_logprobs.double(), problem.rewards, entropy=h, vocab_size=5, alpha=1.0,
        level="token", entropy_coef=0.1, backend=backend, **problem.layout)
    assert torch.autograd.gradcheck(fn, (lp, entropy), eps=1e-6, atol=1e-7, rtol=1e-5)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return on_device(dict(logprobs=-torch.rand(4, 5, generator=g) * 3,
                          ref_logprobs=-torch.rand(4, 5, generator=g) * 3,
                          rewards=torch.rand(4, generator=g),
                          mask=torch.rand(4, 5, generator=g) < 0.8, group_size=2,
                          vocab_size=50))


BAD = [
    ("logprobs-int", dict(logprobs=torch.zeros(4, 5, dtype=torch.long)), TypeError, "logprobs"),
    ("logprobs-3d", dict(logprobs=torch.zeros(4, 5, 1)), ValueError, "logprobs"),
    ("ref-shape", dict(ref_logprobs=torch.zeros(4, 4)), ValueError, "ref_logprobs"),
    ("entropy-shape", dict(entropy=torch.zeros(4, 4)), ValueError, "entropy"),
    ("bonus-without-entropy", dict(entropy_coef=0.1), ValueError, "entropy"),
    ("no-vocab-size", dict(vocab_size=None), ValueError, "vocab_size"),
    ("vocab-size-0", dict(vocab_size=0), ValueError, "vocab_size"),
    ("temperature", dict(temperature=0.7), ValueError, "temperature"),
    ("inplace", dict(inplace_backward=True), ValueError, "inplace_backward"),
    ("grad-to-base", dict(grad_to_base=True), ValueError, "grad_to_base"),
    ("vocab-parallel-one-pass", dict(vocab_parallel_one_pass=True), ValueError,
     "vocab_parallel_one_pass"),
    ("nan-logprob", dict(logprobs="nan"), ValueError, "logprobs"),
    ("inf-entropy", dict(entropy="inf"), ValueError, "entropy"),
    ("mask-value", dict(mask="2"), ValueError, "mask"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,change,exc,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, change, exc, text, backend):
    kwargs = _inputs()
    for key, value in change.items():
        if value == "nan":
            kwargs[key] = kwargs[key].clone()
            kwargs[key][0, 0] = float("nan")
        elif value == "inf":
            kwargs[key] = torch.zeros(4, 5, device=DEVICE)
            kwargs[key][0, 0] = float("inf")
        elif value == "2":
            kwargs[key] = torch.ones(4, 5, dtype=torch.long, device=DEVICE)
            kwargs[key][1, 1] = 2
        else:
            kwargs[key] = on_device(value)  # BAD's tensors are built on the CPU
    kwargs["mask"] = kwargs["mask"].clone()
    kwargs["mask"][0, 0] = 1  # the poked token is counted
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    passed = dict(kwargs)
    with pytest.raises(exc, match=text):
        opo_kernels.opo_loss_from_logprobs(passed.pop("logprobs"), passed.pop("ref_logprobs"),
                                           passed.pop("rewards"), backend=backend, **passed)
    for k, v in before.items():  # nothing the caller passed is modified
        assert torch.equal(kwargs[k].nan_to_num(), v.nan_to_num()), f"{k} modified"


def test_entropy_only_reported_does_not_enter_the_loss():
    """entropy= passed for the entropy_mean metric only (entropy_coef = 0): a NaN entropy on a
    counted token (validate=False) leaves the loss and gradient finite and equal on both
    backends (no 0·H term); the metric is NaN."""
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 5, generator=g) * 3
    ref = lp + 0.1 * torch.randn(4, 5, generator=g)
    ent = torch.rand(4, 5, generator=g) * 2
    ent[0, 0] = float("nan")
    rewards = torch.rand(4, generator=g)
    lp, ref, ent, rewards = (t.to(DEVICE) for t in (lp, ref, ent, rewards))
    out = {}
    for backend in ("triton", "torch"):
        x = lp.clone().requires_grad_()
        loss, metrics = opo_kernels.opo_loss_from_logprobs(
            x, ref, rewards, entropy=ent, group_size=2, vocab_size=50, validate=False,
            backend=backend, return_metrics=True)
        out[backend] = loss, torch.autograd.grad(loss, x)[0]
        assert torch.isfinite(loss) and torch.isnan(metrics["entropy_mean"])
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-5, atol=1e-7)


def test_vocab_size_takes_numpy_integers():
    """vocab_size as a NumPy integer (a tokenizer's len() through numpy), like group_size;
    a float or a bool is refused."""
    np = pytest.importorskip("numpy")
    kwargs = _inputs()
    expected = opo_kernels.opo_loss_from_logprobs(**kwargs)
    kwargs["vocab_size"] = np.int64(50)
    torch.testing.assert_close(opo_kernels.opo_loss_from_logprobs(**kwargs), expected)
    for bad in (50.0, True):
        kwargs["vocab_size"] = bad
        with pytest.raises(ValueError, match="vocab_size must be a positive int"):
            opo_kernels.opo_loss_from_logprobs(**kwargs)
