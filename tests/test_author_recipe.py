"""docs/spec.md "Presets": delta_clip, score_clip, scale_rewards, direction_scale,
logit_reg_coef and the presets ("paper" = eq. 6, "author_verl" = the author's verl code).

- the fused kernels against the reference (loss, metrics, gradient with a random upstream
  gradient) for each option alone, in combinations, and for the whole preset, both layouts,
  general and on-policy mode, fp32 and bf16; the fused-linear head and the log-prob API;
- gradcheck in float64 where ω is constant (α = 1, fixed τ) and the new terms are
  differentiable (the Z-loss through δ, clamps away from their bounds);
- properties that pin the formulas down: the penalty's gradient through δ̂ is 0 where
  delta_clip binds while the direction term still moves; the Z-loss equals λ·(mean_g lse u)²
  computed by hand; score_clip bounds the scores;
- preset resolution (explicit arguments override; direction_scale follows α) and bad input.
"""

import dataclasses
import math

import pytest
import torch
from problems import make_problem, on_device
from test_opo_loss import TOL, assert_close, assert_matches, compare, grad_atol, run

import opo_kernels
from opo_kernels import OPOLossConfig, reference
from opo_kernels.config import PRESETS

OPTION_CASES = [
    ("delta_clip", dict(delta_clip=0.04)),
    ("score_clip", dict(score_clip=0.08)),
    ("scale_rewards", dict(scale_rewards="group")),
    ("direction_scale", dict(direction_scale=1.7)),
    ("logit_reg", dict(logit_reg_coef=0.3)),
    ("logit_reg-fixed-tau", dict(logit_reg_coef=0.3, adaptive_tau=False, tau=0.3)),
    ("all-sequence-ratio", dict(delta_clip=0.05, score_clip=0.2, logit_reg_coef=0.5,
                                scale_rewards="group", direction_scale=0.8, level="sequence",
                                coordinates="ratio", entropy_coef=0.02)),
    ("all-token", dict(score_clip=0.2, logit_reg_coef=0.5, scale_rewards="group",
                       level="token", center_weights=True)),
    ("preset", dict(preset="author_verl")),
    ("preset-sequence-ratio", dict(preset="author_verl", level="sequence",
                                   coordinates="ratio")),
    ("preset-seed-weights", dict(preset="author_verl", weights="seed", alpha=0.4)),
]


def _problem(seed, layout, dtype=torch.float32, **kwargs):
    return make_problem(9, 6, 7, dtype, layout, seed=seed, **kwargs)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name,options", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_kernel_matches_reference(name, options, layout):
    seed = [c[0] for c in OPTION_CASES].index(name)
    compare(_problem(seed, layout), torch.float32, **options)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name,options", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_logprob_api_matches_reference(name, options, layout):
    """opo_loss_from_logprobs with each recipe option: the epilogue kernel + the log-prob
    gradient kernel against the reference's autograd (float64 log-probs of the same values):
    loss, metrics and ∂L/∂lp (and ∂L/∂H with the entropy bonus), upstream gradient 0.8."""
    seed = [c[0] for c in OPTION_CASES].index(name) + 30
    problem = _problem(seed, layout)
    V = problem.logits.shape[-1]
    z = problem.logits.nan_to_num().double()
    log_p = torch.log_softmax(z, -1)
    lp = log_p.gather(-1, problem.labels.clamp(min=0)[..., None])[..., 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    results = {}
    for backend, dtype in (("oracle", torch.float64), ("triton", torch.float32)):
        x = lp.to(dtype).requires_grad_()
        h = entropy.to(dtype).requires_grad_()
        loss, metrics = opo_kernels.opo_loss_from_logprobs(
            x, problem.ref_logprobs.to(dtype), problem.rewards, entropy=h, vocab_size=V,
            return_metrics=True, backend="torch" if backend == "oracle" else "triton",
            **problem.layout, **options)
        grads = torch.autograd.grad(loss * 0.8, (x, h), allow_unused=True)
        results[backend] = (loss.detach(), metrics, grads)
    (exp_loss, exp_metrics, exp_grads), (loss, metrics, grads) = results.values()
    rtol, atol = TOL[torch.float32]["loss"]
    assert_close(loss, exp_loss, rtol, atol, "loss")
    assert set(metrics) == set(exp_metrics)
    for k in exp_metrics:
        assert_close(metrics[k], exp_metrics[k], rtol, atol, k)
    rtol, frac = TOL[torch.float32]["grad"]
    assert_close(grads[0], exp_grads[0], rtol, grad_atol(exp_grads[0], frac), "grad logprobs")
    if exp_grads[1] is not None:
        assert_close(grads[1], exp_grads[1], rtol, grad_atol(exp_grads[1], frac), "grad entropy")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_bf16_preset(layout):
    compare(_problem(21, layout, torch.bfloat16), torch.bfloat16, preset="author_verl")


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("options", [dict(preset="author_verl"),
                                     dict(preset="author_verl", adaptive_tau=False),
                                     dict(score_clip=0.1, scale_rewards="group")],
                         ids=["preset", "preset-fixed-tau", "clip-scale"])
def test_on_policy(options, layout):
    """ref_logprobs=None: one pass where the coefficients are known early (fixed τ), the
    general two passes where the Z-loss's gradient needs the adaptive τ of the log-probs."""
    problem = _problem(5, layout)
    leaf64 = problem.leaf(torch.float64)
    V = problem.logits.shape[-1]
    lp = reference.token_stats(leaf64.detach().reshape(-1, V).nan_to_num(),
                               problem.labels.reshape(-1).clamp(min=0), 1.0, False)[0]
    ref = lp.view(problem.labels.shape).float()
    exp_loss, exp_metrics = reference.opo_loss(leaf64, problem.labels, ref, problem.rewards,
                                               return_metrics=True, **problem.layout, **options)
    (exp_grad,) = torch.autograd.grad(exp_loss * 0.7, leaf64)
    x = problem.leaf()
    loss, metrics = opo_kernels.opo_loss(x, problem.labels, None, problem.rewards,
                                         return_metrics=True, backend="triton",
                                         **problem.layout, **options)
    (grad,) = torch.autograd.grad(loss * 0.7, x)
    assert_matches(loss, metrics, grad, exp_loss, exp_metrics, exp_grad)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("recipe", [
    dict(preset="author_verl"),
    dict(delta_clip=0.05, score_clip=0.2, logit_reg_coef=0.5, scale_rewards="group",
         direction_scale=0.8, level="sequence", coordinates="ratio"),
], ids=["preset", "binding-clamps"])
def test_fused_linear_and_logprob_api(layout, recipe):
    """The preset (its clamps do not bind here) and binding clamps + scale_rewards='group'."""
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 6, 5, 8, 11
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    rewards = torch.rand(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[..., None])[..., 0]
    ref = lp + 0.05 * torch.randn(B, T, generator=g)
    hidden, weight, labels, mask, rewards, ref = on_device((hidden, weight, labels, mask,
                                                            rewards, ref))
    layout_args = dict(mask=mask, group_size=3)
    if layout == "packed":
        hidden, labels, ref = hidden.view(-1, H), labels.view(-1), ref.view(-1)
        seq_ids = torch.where(mask.view(-1), on_device(torch.arange(B * T)) // T, -1)
        layout_args = dict(seq_ids=seq_ids, group_size=3)
    options = dict(return_metrics=True, **recipe, **layout_args)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, metrics = opo_kernels.fused_linear_opo_loss(h, w, labels, ref, rewards, chunk_size=4,
                                                      backend="triton", **options)
    gh, gw = torch.autograd.grad(loss, (h, w))
    h2 = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    logits = h2 @ w2.T
    exp, exp_metrics = reference.opo_loss(logits, labels, ref, rewards, **options)
    eh, ew = torch.autograd.grad(exp, (h2, w2))
    rtol, atol = TOL[torch.float32]["loss"]
    assert_close(loss, exp, rtol, atol, "fused-linear loss")
    for k in exp_metrics:
        assert_close(metrics[k], exp_metrics[k], rtol, atol, k)
    assert_close(gh, eh, 1e-4, grad_atol(eh, 4e-6), "hidden grad")
    assert_close(gw, ew, 1e-4, grad_atol(ew, 4e-6), "weight grad")

    # the same loss from the log-probs of those logits
    logp = torch.log_softmax(logits.detach(), -1).gather(-1, labels[..., None])[..., 0]
    lp_leaf = logp.clone().requires_grad_()
    loss3, _ = opo_kernels.opo_loss_from_logprobs(lp_leaf, ref, rewards, vocab_size=V,
                                                   backend="triton", **options)
    assert_close(loss3, exp, rtol, atol, "log-prob API loss")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradcheck(layout, backend):
    """α = 1 (escort ω = normalized Q: constant), fixed τ; the penalty through δ̂, the Z-loss
    and the direction scale are differentiable in δ. The clamps are set where they do not bind
    (finite differences across a kink would disagree with any derivative; the clamps'
    gradients are pinned by the property tests below), and the test first checks that each of
    those terms really moves the gradient here, so that gradcheck sees them all."""
    problem = make_problem(6, 3, 5, torch.float64, layout, seed=7, scale=0.5, noise=0.05)
    x = problem.logits.detach().nan_to_num().clone().requires_grad_()
    labels, ref, rewards = problem.args()
    options = dict(preset="author_verl", alpha=1.0, adaptive_tau=False, tau=0.4,
                   center_weights=False,  # centred ω vanishes in this problem's packed groups
                   delta_clip=2.0, score_clip=5.0, coordinates="ratio", level="sequence",
                   logit_reg_coef=0.3, direction_scale=1.7, backend=backend, **problem.layout)
    fn = lambda logits, **o: opo_kernels.opo_loss(  # noqa: E731
        logits, labels, ref.double(), rewards, **{**options, **o})
    base = torch.autograd.grad(fn(x), x)[0]
    for term in (dict(mu=0.0), dict(logit_reg_coef=0.0), dict(direction_scale=1.0)):
        other = torch.autograd.grad(fn(x, **term), x)[0]
        assert (other - base).abs().max() > 1e-6 * base.abs().max(), f"{term}: no effect"
    # the Triton path: gradcheck's fast mode (a directional derivative along a random vector;
    # tests/test_gradcheck.py shows it fails on one partial off by 1e-4), as the whole
    # Jacobian costs the interpreter ~1-2 min; the reference's is whole, and the kernels equal
    # the reference on these options above (random upstream gradient)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=backend == "triton")


# ---- properties ----------------------------------------------------------------------------


def _sequence_problem():
    """Two groups of 3 one-token sequences; δ_s = lp_s − ref_s chosen by hand."""
    lp = torch.tensor([-0.5, -1.0, -0.7, -0.2, -2.0, -0.4], dtype=torch.float64)
    deltas = torch.tensor([0.30, -0.02, 0.01, -0.5, 0.03, 0.0], dtype=torch.float64)
    ref = lp - deltas
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.1], dtype=torch.float64)
    return on_device((lp, ref, rewards))


def test_delta_clip_stops_the_penalty_not_the_direction():
    """Where |δ_s| > delta_clip, ∂L/∂lp_s = −D·ω_s·e^δ/M only: the penalty (μ/2)·v̂² is flat
    there; elsewhere its μ·v̂·e^δ̂/B' term is present."""
    lp, ref, rewards = _sequence_problem()
    seq_ids = on_device(torch.arange(6))
    options = dict(seq_ids=seq_ids, group_size=3, vocab_size=10, delta_clip=0.1,
                   coordinates="ratio", level="sequence", mu=2.0, direction_scale=1.5,
                   weights=on_device(torch.tensor([0.5, -0.2, 0.3, 0.1, 0.4, -0.3],
                                                  dtype=torch.float64)),
                   adaptive_tau=False)
    for backend in ("torch", "triton"):
        x = lp.clone().requires_grad_()
        loss = opo_kernels.opo_loss_from_logprobs(x, ref, rewards, backend=backend, **options)
        (grad,) = torch.autograd.grad(loss, x)
        delta = lp - ref
        omega = options["weights"]
        direction = -1.5 * omega * delta.exp() / 2  # M = 2 groups
        penalty = 2.0 * torch.expm1(delta) * delta.exp() / 6  # B' = 6
        clipped = delta.abs() > 0.1
        assert clipped.any() and (~clipped).any()
        expected = direction + torch.where(clipped, 0.0, penalty)
        assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-12), (backend, grad, expected)


def test_z_loss_value_by_hand():
    lp, ref, rewards = _sequence_problem()
    options = dict(seq_ids=on_device(torch.arange(6)), group_size=3, vocab_size=10,
                   adaptive_tau=False,
                   tau=0.25, score_clip=1.0, logit_reg_coef=0.7, mu=0.0, level="sequence",
                   coordinates="log", return_metrics=True)
    u = ((lp - ref) / 0.25).clamp(-1.0, 1.0)
    lse = torch.stack([torch.logsumexp(u[:3], 0), torch.logsumexp(u[3:], 0)])
    z = 0.7 * lse.mean() ** 2
    for backend in ("torch", "triton"):
        loss, metrics = opo_kernels.opo_loss_from_logprobs(lp, ref, rewards, backend=backend,
                                                           **options)
        base, _ = opo_kernels.opo_loss_from_logprobs(lp, ref, rewards, backend=backend,
                                                     **{**options, "logit_reg_coef": 0.0})
        assert math.isclose(float(loss - base), float(z), rel_tol=1e-9), backend


def test_score_clip_bounds_the_scores():
    """p̃ is a softmax of u = clamp(δ/τ, ±c): with c tiny, p̃ is ~uniform whatever δ is, so ω
    (seed rule, α = 0.5) is ω(Q, uniform p̃) and the loss cannot see how far apart the δ are."""
    lp, ref, rewards = _sequence_problem()
    options = dict(seq_ids=on_device(torch.arange(6)), group_size=3, vocab_size=10,
                   adaptive_tau=False,
                   alpha=0.5, score_clip=1e-9, return_metrics=True, coordinates="log",
                   level="sequence", mu=0.0)
    far = ref - 3 * (lp - ref)  # δ four times larger, signs kept
    for backend in ("torch", "triton"):
        _, m1 = opo_kernels.opo_loss_from_logprobs(lp, ref, rewards, backend=backend, **options)
        _, m2 = opo_kernels.opo_loss_from_logprobs(lp, far, rewards, backend=backend, **options)
        assert math.isclose(float(m1["omega_mean"]), float(m2["omega_mean"]), rel_tol=1e-7)
        assert math.isclose(float(m1["omega_max"]), float(m2["omega_max"]), rel_tol=1e-7)


# ---- presets and bad input -----------------------------------------------------------------


def test_presets_resolve():
    paper = OPOLossConfig()
    for name, value in PRESETS["paper"].items():
        assert getattr(paper, name) == value, name
    author = OPOLossConfig(preset="author_verl")
    assert (author.weights, author.center_weights, author.coordinates, author.level) == \
        ("escort", True, "log", "sequence_mean")
    assert (author.delta_clip, author.score_clip, author.logit_reg_coef) == (5.0, 10.0, 0.01)
    assert author.direction_scale == pytest.approx(1 / 0.6)
    # explicit arguments override; direction_scale follows the α in force
    custom = OPOLossConfig(preset="author_verl", alpha=0.5, weights="seed", delta_clip=None)
    assert (custom.direction_scale, custom.weights, custom.delta_clip) == (2.0, "seed", None)
    assert custom.replace(alpha=0.25).direction_scale == 4.0
    fixed = OPOLossConfig(preset="author_verl", direction_scale=3.0)
    assert fixed.replace(alpha=0.25).direction_scale == 3.0
    # dataclasses.replace (and torch.compile's rebuild) pass every field to __init__: a value
    # given anew is explicit, the others keep following the preset
    moved = dataclasses.replace(author, alpha=0.25)
    assert (moved.alpha, moved.direction_scale, moved.explicit) == (0.25, 4.0, ("alpha",))
    assert dataclasses.replace(fixed, alpha=0.25).direction_scale == 3.0
    switched = dataclasses.replace(OPOLossConfig(alpha=0.5), preset="author_verl")
    assert (switched.alpha, switched.direction_scale, switched.weights) == (0.5, 2.0, "escort")
    assert dataclasses.replace(custom) == custom and dataclasses.replace(custom).explicit == \
        custom.explicit
    # passing a paper value explicitly under author_verl keeps it
    assert OPOLossConfig(preset="author_verl", coordinates="ratio").coordinates == "ratio"
    # inf turns a clamp off, as None, however it is spelled (a config file, NumPy)
    import numpy as np
    for inf in (math.inf, np.float64(np.inf), np.float32(np.inf)):
        off = OPOLossConfig(preset="author_verl", delta_clip=inf, score_clip=inf)
        assert (off.delta_clip, off.score_clip) == (None, None), type(inf)
    assert OPOLossConfig(preset="author_verl", delta_clip=np.float32(2.5)).delta_clip == 2.5


BAD = [
    (dict(delta_clip=0.0), "delta_clip"),
    (dict(delta_clip=-1.0), "delta_clip"),
    (dict(delta_clip=float("nan")), "delta_clip"),
    (dict(delta_clip=1.0, level="token"), "delta_clip"),
    (dict(preset="author_verl", level="token"), "delta_clip"),
    (dict(score_clip=0.0), "score_clip"),
    (dict(score_clip="big"), "score_clip"),
    (dict(scale_rewards="batch"), "scale_rewards"),
    (dict(direction_scale=0.0), "direction_scale"),
    (dict(direction_scale=float("inf")), "direction_scale"),
    (dict(logit_reg_coef=-0.1), "logit_reg_coef"),
    (dict(preset="verl"), "preset"),
    (dict(preset="author_verl", alpha=0.0), "direction_scale"),
    (dict(direction_scale=None), "direction_scale"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options,name", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_options(options, name, backend):
    problem = _problem(0, "padded")
    x = problem.leaf()
    before = x.detach().clone()
    with pytest.raises((ValueError, TypeError), match=name):
        opo_kernels.opo_loss(x, *problem.args(), backend=backend, **problem.layout, **options)
    assert torch.equal(x.detach().nan_to_num(3), before.nan_to_num(3))


@pytest.mark.parametrize("entry", ["fused_linear", "logprobs"])
@pytest.mark.parametrize("options,name", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_options_other_entry_points(options, name, entry):
    """The same errors from fused_linear_opo_loss and opo_loss_from_logprobs."""
    problem = _problem(0, "padded")
    labels, ref, rewards = problem.args()
    with pytest.raises((ValueError, TypeError), match=name):
        if entry == "fused_linear":
            hidden = torch.zeros(*labels.shape, 4, device=labels.device)
            weight = torch.zeros(problem.logits.shape[-1], 4, device=labels.device)
            opo_kernels.fused_linear_opo_loss(hidden, weight, labels, ref, rewards,
                                              backend="triton", **problem.layout, **options)
        else:
            opo_kernels.opo_loss_from_logprobs(ref.nan_to_num(), ref, rewards, vocab_size=7,
                                               backend="triton", **problem.layout, **options)


def test_clamps_bind_in_the_kernel_tests():
    """The problems of test_kernel_matches_reference must exercise the clamps (some δ and some
    scores beyond the bounds), or those tests could pass with the clamps ignored."""
    for (name, options), layout in ((OPTION_CASES[0], "padded"), (OPTION_CASES[1], "packed")):
        seed = [c[0] for c in OPTION_CASES].index(name)
        problem = _problem(seed, layout)
        clipped = run(problem, "oracle", torch.float64, **options)[0]
        free = run(problem, "oracle", torch.float64)[0]
        assert not torch.isclose(clipped, free, rtol=1e-9, atol=0), name
