"""Confident tokens: the label's logit 15–40 above the rest of its row, as for most tokens of an
RL batch. The label entry of the gradient, c_t·(1 − p_label)/temperature, is then c_t times a
number between 1e−4 and 1e−15: computed as 1 − exp(lp) in fp32 it would be 0 (no digit right),
and lp itself is only accurate if log Σ exp does not round the 1 + tiny sum to 1. The kernel
keeps the label's term out of the row sum and uses −expm1(lp); here the label entry must match
a float64 oracle to a relative 1e−4, where the oracle's 1 − p is the exact Σ_{j≠label} p_j
(float64's own 1 − p would have no digit right past a gap of ~37).

V = 1000 is one block of the vocabulary loop; V = 32003 puts the label in one of several blocks.
"""

import pytest
import torch
from problems import DEVICE

import opo_kernels
from opo_kernels import reference


def _confident_problem(V: int, gaps, seed: int = 0):
    """Packed rows whose label logit is `gap` above the row's largest other logit."""
    g = torch.Generator().manual_seed(seed)
    n = len(gaps)
    logits = torch.randn(n, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (n,), generator=g)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    logits[torch.arange(n), labels] = others + torch.tensor(gaps, dtype=torch.float64)
    logits = logits.float()  # the kernel's input; the oracle uses the same fp32 values
    seq_ids = torch.arange(n) // 2  # two tokens per sequence
    num_seqs = int(seq_ids.max()) + 1
    lp = torch.log_softmax(logits.double(), -1).gather(1, labels[:, None])[:, 0]
    ref = (lp + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    rewards = torch.rand(num_seqs, generator=g)
    return logits, labels, ref, rewards, seq_ids, num_seqs


def _oracle_label_entries(logits, labels, ref, rewards, seq_ids, group_size, temperature):
    """Float64: c_t = ∂L/∂lp_t from the reference objective (autograd), times the exact
    1 − p_label = Σ_{j≠label} p_j, over the temperature."""
    z = logits.double() / temperature
    log_p = torch.log_softmax(z, -1)
    lp = log_p.gather(1, labels[:, None])[:, 0].detach().requires_grad_()
    cfg = opo_kernels.OPOLossConfig(temperature=temperature)
    group = torch.arange(rewards.shape[0]) // group_size
    loss, _ = reference.objective(cfg, lp, ref.double(), None, seq_ids, rewards.double(), group,
                                  None, logits.shape[-1])
    (c,) = torch.autograd.grad(loss, lp)
    p_others = log_p.exp().scatter(1, labels[:, None], 0.0).sum(1)
    return c * p_others / temperature, p_others


@pytest.mark.parametrize("V", [1000, 32003])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_label_entry_relative_error(V, temperature):
    gaps = [15.0, 20.0, 25.0, 30.0, 35.0, 40.0] * 2
    logits, labels, ref, rewards, seq_ids, num_seqs = _confident_problem(V, gaps)
    expected, one_minus_p = _oracle_label_entries(logits, labels, ref, rewards, seq_ids, 2,
                                                  temperature)
    assert one_minus_p.min() < 1e-12, "the problem must reach 1 − p far below fp32 epsilon"
    x = logits.clone().to(DEVICE).requires_grad_()
    loss = opo_kernels.opo_loss(x, labels.to(DEVICE), ref.to(DEVICE), rewards.to(DEVICE),
                                seq_ids=seq_ids.to(DEVICE), group_size=2,
                                temperature=temperature, backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    got = grad.cpu().double()[torch.arange(len(gaps)), labels]
    rel = ((got - expected).abs() / expected.abs()).max().item()
    assert rel < 1e-4, f"label entry: max relative error {rel:.3e} (1 − p down to " \
                       f"{one_minus_p.min().item():.1e})"
