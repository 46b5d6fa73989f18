"""torch.autograd.gradcheck in float64, of the reference and of the Triton path.

The spec's gradient treats ω, τ, p̃ and Q as constants, so finite differences agree with it only
where ω does not depend on the logits: a caller-given weights tensor, or α = 1 (ω = Q for the
"seed" and "escort" rules). Those are the configurations checked here; the general case is
covered by the kernel-vs-reference tests.

The whole Jacobian (one finite difference per logit, 2·B·T·V loss calls) of the Triton path
under the interpreter costs ~60 s a padded case (90 logits) and ~20 s a packed one on the CI
machine, so it is taken for FULL_JACOBIAN: packed, a subset in which every level, every
coordinate system and both weight kinds appear; padded, one of them. The other Triton cases use
gradcheck's fast mode (the same tolerances on the directional derivative along a random vector:
a wrong partial derivative still fails it, unless the random vector happens to hide it; see the
last test). The reference is checked in full everywhere.
"""

import itertools

import pytest
import torch
from problems import make_problem

import opo_kernels

CASES = list(itertools.product(
    ["sequence", "sequence_mean", "token"], ["ratio", "log"], ["tensor", "seed-alpha1"],
))
FULL_JACOBIAN = {
    "packed": {("sequence", "ratio", "tensor"), ("sequence_mean", "log", "seed-alpha1"),
               ("token", "ratio", "seed-alpha1"), ("token", "log", "tensor")},
    "padded": {("sequence_mean", "log", "seed-alpha1")},
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("level,coords,weights", CASES, ids=["-".join(c) for c in CASES])
def test_gradcheck(level, coords, weights, layout, backend):
    problem = make_problem(6, 3, 5, torch.float64, layout, seed=len(level) + len(coords),
                           scale=0.5, noise=0.05)
    x = problem.logits.detach().nan_to_num().clone().requires_grad_()
    labels, ref, rewards = problem.args()
    options = dict(level=level, coordinates=coords, temperature=0.8, entropy_coef=0.1,
                   backend=backend, **problem.layout)
    if weights == "tensor":
        options["weights"] = torch.randn(6, dtype=torch.float64).to(x.device)
    else:
        options["alpha"] = 1.0
    fn = lambda logits: opo_kernels.opo_loss(logits, labels, ref.double(), rewards, **options)  # noqa: E731
    fast = backend == "triton" and (level, coords, weights) not in FULL_JACOBIAN[layout]
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


class _OnePartialOff(torch.autograd.Function):
    """Identity whose backward adds 1e-4 to one partial derivative: a wrong gradient entry."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[2, 1, 3] += 1e-4
        return grad


def test_fast_mode_fails_on_one_wrong_partial():
    """The fast mode used above is not a check that cannot fail: on a problem of the same
    size, a gradient with ONE partial derivative off by 1e-4 fails it, and the true one passes.
    (The reference backend: a failing fast check re-runs the whole Jacobian for its report,
    which would cost the interpreter a minute; the check's power does not depend on it.)"""
    problem = make_problem(6, 3, 5, torch.float64, "padded", seed=9, scale=0.5, noise=0.05)
    x = problem.logits.detach().nan_to_num().clone().requires_grad_()
    labels, ref, rewards = problem.args()
    options = dict(level="token", coordinates="ratio", temperature=0.8, entropy_coef=0.1,
                   alpha=1.0, backend="torch", **problem.layout)

    def fn(wrong):
        def loss(logits):
            logits = _OnePartialOff.apply(logits) if wrong else logits
            return opo_kernels.opo_loss(logits, labels, ref.double(), rewards, **options)
        return loss

    torch.manual_seed(0)  # fast mode draws its random vector from the global generator
    kwargs = dict(eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True, raise_exception=False)
    assert torch.autograd.gradcheck(fn(False), (x,), **kwargs)
    assert not torch.autograd.gradcheck(fn(True), (x,), **kwargs)
