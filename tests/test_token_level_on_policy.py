"""On-policy (ref_logprobs=None) at level "token" with the Z-loss and the adaptive τ: the
on-policy coefficients then depend on τ, so the call runs the general two passes, whose
backward reads Δ_t = lp_t − ref_t with the log-probs standing in for ref. The stand-in must
be read at the token's own row: padded rows b > 0 once read the log-prob of row t of the
first sequence (a wrong gradient, found while trimming the host path)."""

import pytest
import torch
from problems import make_problem

import opo_kernels


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradient_matches_the_reference(layout):
    p = make_problem(3, 6, 13, torch.float32, layout, seed=4)
    options = dict(level="token", logit_reg_coef=0.1, adaptive_tau=True, **p.layout)
    assert not opo_kernels.OPOLossConfig(level="token", logit_reg_coef=0.1).one_pass_exact
    results = {}
    for backend in ("triton", "torch"):
        x = p.leaf()
        loss = opo_kernels.opo_loss(x, p.labels, None, p.rewards, backend=backend, **options)
        grad_up = torch.tensor(0.7)  # a non-unit upstream gradient
        results[backend] = (loss, torch.autograd.grad(loss, x, grad_up)[0])
    (loss_k, grad_k), (loss_r, grad_r) = results["triton"], results["torch"]
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_k.nan_to_num(), grad_r.nan_to_num(), rtol=1e-4, atol=1e-6)
