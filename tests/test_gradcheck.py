"""torch.autograd.gradcheck in float64, of the reference and of the Triton path.

The spec's gradient treats ω, τ, p̃ and Q as constants, so finite differences agree with it only
where ω does not depend on the logits: a caller-given weights tensor, or α = 1 (ω = Q for the
"seed" and "escort" rules). Those are the configurations checked here; the general case is
covered by the kernel-vs-reference tests.
"""

import itertools

import pytest
import torch
from problems import make_problem

import opo_kernels

CASES = list(itertools.product(
    ["sequence", "sequence_mean", "token"], ["ratio", "log"], ["tensor", "seed-alpha1"],
))


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
        options["weights"] = torch.randn(6, dtype=torch.float64)
    else:
        options["alpha"] = 1.0
    fn = lambda logits: opo_kernels.opo_loss(logits, labels, ref.double(), rewards, **options)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
