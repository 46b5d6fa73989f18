"""The paper's properties, on both backends.

- ∂L/∂v_s = 0 at v_s = K·ω_s/μ (sequence levels, equal groups of K): the gradient w.r.t. the
  logits vanishes when the log-ratios are set there (with ω independent of v: α = 1 or a weights
  tensor, so the point is not a moving target);
- orthogonality: μ does not change ω (the loss and gradient are affine in μ and the ω metrics
  do not move), and α does not change the penalty term;
- α = 1 with a uniform p̃ (on-policy, Δ = 0) gives ω = Q = softmax(r / reward_temperature).
"""

import pytest
import torch
from problems import on_device, true_logprobs

import opo_kernels

BACKENDS = ["torch", "triton"]
B, K, T, V = 6, 3, 4, 11


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    rewards = torch.rand(B, generator=g, dtype=torch.float64)
    lp = true_logprobs(logits.reshape(-1, V), labels.reshape(-1), 1.0).view(B, T)
    return on_device((logits, labels, mask, rewards, lp))


def _group_softmax(x):
    return torch.softmax(x.view(-1, K), dim=1).reshape(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "sequence_mean"])
@pytest.mark.parametrize("coords", ["ratio", "log"])
@pytest.mark.parametrize("weights", ["alpha1", "tensor"])
def test_stationary_point(backend, level, coords, weights):
    logits, labels, mask, rewards, lp = _problem(1)
    mu = 2.5
    if weights == "alpha1":
        omega = _group_softmax(rewards / 0.15)  # ω = Q
        options = {"alpha": 1.0}
    else:
        omega = on_device(torch.rand(B, generator=torch.Generator().manual_seed(3),
                                     dtype=torch.float64))
        options = {"weights": omega}
    v_star = K * omega / mu
    delta = torch.log1p(v_star) if coords == "ratio" else v_star
    n = mask.sum(1)
    per_token = delta / n if level == "sequence" else delta  # Σ_t Δ_t or mean_t Δ_t = δ_s
    ref = lp - per_token[:, None]
    x = logits.clone().requires_grad_()
    loss = opo_kernels.opo_loss(x, labels, ref, rewards, mask=mask, group_size=K, mu=mu,
                                level=level, coordinates=coords, backend=backend, **options)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().max() < 1e-10
    # and moving away from it gives a nonzero gradient (the check can fail)
    x2 = logits.clone().requires_grad_()
    loss2 = opo_kernels.opo_loss(x2, labels, ref + 0.1, rewards, mask=mask, group_size=K,
                                 mu=mu, level=level, coordinates=coords, backend=backend,
                                 **options)
    assert torch.autograd.grad(loss2, x2)[0].abs().max() > 1e-4


def _off_policy(lp, seed):
    """ref_logprobs of a sampling policy a little away from the current one."""
    return lp + on_device(0.1 * torch.randn(B, T, generator=torch.Generator().manual_seed(seed),
                                            dtype=torch.float64))


def _run(backend, logits, labels, ref, rewards, mask, **options):
    x = logits.clone().requires_grad_()
    loss, metrics = opo_kernels.opo_loss(x, labels, ref, rewards, mask=mask, group_size=K,
                                         backend=backend, return_metrics=True, **options)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), metrics, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence_mean", "token"])
def test_mu_leaves_omega_unchanged(backend, level):
    logits, labels, mask, rewards, lp = _problem(2)
    ref = _off_policy(lp, seed=5)
    runs = [_run(backend, logits, labels, ref, rewards, mask, mu=mu, level=level)
            for mu in (0.0, 1.0, 2.0)]
    (l0, m0, g0), (l1, m1, g1), (l2, m2, g2) = runs
    for k in ("omega_mean", "omega_max", "tau"):
        assert torch.allclose(m0[k], m1[k], rtol=1e-12) and torch.allclose(m1[k], m2[k],
                                                                            rtol=1e-12)
    # ω fixed => L(μ) and ∇L(μ) are affine in μ
    torch.testing.assert_close(l2 - l1, l1 - l0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2 - g1, g1 - g0, rtol=1e-7, atol=1e-12)
    assert (l1 - l0).abs() > 1e-8  # the penalty is really there


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "sequence_mean", "token"])
def test_alpha_leaves_penalty_unchanged(backend, level):
    logits, labels, mask, rewards, lp = _problem(3)
    ref = _off_policy(lp, seed=6)
    runs = [_run(backend, logits, labels, ref, rewards, mask, alpha=a, level=level)
            for a in (0.0, 0.6, 1.0)]
    penalties = [m["penalty"] for _, m, _ in runs]
    assert penalties[0] > 0
    for p in penalties[1:]:
        torch.testing.assert_close(p, penalties[0], rtol=1e-12, atol=0)
    assert not torch.allclose(runs[0][1]["omega_mean"], runs[2][1]["omega_mean"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha1_uniform_ptilde_gives_q(backend):
    logits, labels, mask, rewards, lp = _problem(4)
    q = _group_softmax(rewards / 0.15)
    for ref in (lp, None):  # Δ = 0 (given explicitly, or on-policy): p̃ uniform
        _, m, _ = _run(backend, logits, labels, ref, rewards, mask, alpha=1.0)
        torch.testing.assert_close(m["omega_mean"], q.mean(), rtol=1e-12, atol=0)
        torch.testing.assert_close(m["omega_max"], q.max(), rtol=1e-12, atol=0)
    # and with α < 1 and uniform p̃ = 1/K: ω = Q^(2−α)·K^(1−α)
    _, m, _ = _run(backend, logits, labels, lp, rewards, mask, alpha=0.6)
    omega = q ** 1.4 * K ** 0.4
    torch.testing.assert_close(m["omega_mean"], omega.mean(), rtol=1e-12, atol=0)
