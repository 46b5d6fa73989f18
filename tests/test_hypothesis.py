"""Property-based: random shapes, masks, groups and options — the fused path equals the float64
reference (loss and gradient). Complements the fixed grids of test_opo_loss.py with cases
nobody thought of (single-token sequences, one group, B = 1, all-ties rewards, ...)."""

import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from problems import on_device
from test_opo_loss import TOL, assert_close, grad_atol

import opo_kernels
from opo_kernels import reference


@st.composite
def problems(draw):
    group_size = draw(st.integers(1, 4))
    B = group_size * draw(st.integers(1, 3))
    T = draw(st.integers(1, 6))
    V = draw(st.sampled_from([1, 2, 5, 33, 130]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < draw(st.sampled_from([0.3, 0.7, 1.0]))
    ties = draw(st.booleans())
    rewards = torch.zeros(B) if ties else torch.rand(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0]
    ref = (lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    options = dict(
        level=draw(st.sampled_from(["sequence", "sequence_mean", "token"])),
        coordinates=draw(st.sampled_from(["ratio", "log"])),
        weights=draw(st.sampled_from(["seed", "escort"])),
        center_weights=draw(st.booleans()),
        adaptive_tau=draw(st.booleans()),
        alpha=draw(st.floats(0, 1)),
        mu=draw(st.floats(0, 3)),
        temperature=draw(st.sampled_from([0.5, 1.0, 1.3])),
        entropy_coef=draw(st.sampled_from([0.0, 0.1])),
    )
    on_policy = draw(st.booleans())
    logits, labels, ref, rewards, mask = on_device((logits, labels, ref, rewards, mask))
    return logits, labels, None if on_policy else ref, rewards, mask, group_size, options


# derandomize: CI sees the same examples every run; explore more with
# `pytest tests/test_hypothesis.py --hypothesis-seed=<n>` and OPO_HYPOTHESIS_EXAMPLES=<n>
@settings(max_examples=int(os.environ.get("OPO_HYPOTHESIS_EXAMPLES", 40)), deadline=None,
          derandomize="OPO_HYPOTHESIS_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_fused_equals_reference(problem):
    logits, labels, ref, rewards, mask, group_size, options = problem
    kw = dict(mask=mask, group_size=group_size, **options)
    x = logits.clone().requires_grad_()
    loss = opo_kernels.opo_loss(x, labels, ref, rewards, backend="triton", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = logits.double().requires_grad_()
    if ref is None:  # on-policy: the reference with π_ref = the current policy, detached
        with torch.no_grad():
            lp = torch.log_softmax(x64 / options["temperature"], -1)
            ref64 = lp.gather(-1, labels[..., None])[..., 0]
    else:
        ref64 = ref.double()
    exp = reference.opo_loss(x64, labels, ref64, rewards, **kw)
    # level "sequence" with ratios exponentiates a SUM of log-ratios: past e^88 the answer is
    # not representable in float32 (docs/spec.md, "Large log-ratios: overflow": coordinates="log"
    # bounds v only; weights="escort", score_clip or delta_clip bound ω; finite needs both)
    assume(abs(exp.item()) < 1e30)
    (exp_grad,) = torch.autograd.grad(exp, x64)
    x32 = logits.clone().requires_grad_()  # the float32 reference: how well float32 can do
    loss32 = opo_kernels.opo_loss(x32, labels, ref, rewards, backend="torch", **kw)
    (grad32,) = torch.autograd.grad(loss32, x32)
    rtol, atol = TOL[torch.float32]["loss"]
    _table_or_reference(loss.detach(), exp.detach(), loss32.detach(), rtol,
                        atol * max(1.0, exp.abs().item()), "loss")
    rtol, frac = TOL[torch.float32]["grad"]
    _table_or_reference(grad, exp_grad, grad32, rtol, grad_atol(exp_grad, frac), "grad")


def _table_or_reference(actual, expected, ref32, rtol, atol, what):
    """Within the tolerance table, or no worse than twice the float32 reference's own error.

    The fixed grids (test_opo_loss.py) hold the kernel to the table alone. Random problems also
    reach numerics where float32 itself cannot do better: a gradient that is the tiny
    difference of O(1) terms (centered weights that nearly cancel, p → 1 at the label, a
    far-off-policy e^δ). There the yardstick is the float32 reference (the criterion of the
    flash-attention tests)."""
    try:
        assert_close(actual, expected, rtol, atol, what)
    except AssertionError:
        err = (actual.double() - expected.double()).abs().max().item()
        ref_err = (ref32.double() - expected.double()).abs().max().item()
        assert err <= 2 * ref_err + atol, (
            f"{what}: error {err:.3e} is over the table and over twice the float32 "
            f"reference's error {ref_err:.3e}")
