"""validate=False trusts the inputs, but a bad seq_id must still not make a kernel read or write
out of bounds: a packed row whose seq_id is outside [-1, B) is treated as not counted by every
kernel (the epilogue, the forward, backward, one-pass and log-prob gradient kernels), so the
result equals the same call with that row's seq_id = -1. (validate=True reports it instead.)"""

import pytest
import torch
from problems import make_problem, on_device

import opo_kernels


@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
def test_out_of_range_seq_ids_are_not_counted(on_policy):
    problem = make_problem(6, 5, 9, torch.float32, "packed", seed=4)
    seq = problem.layout["seq_ids"].clone()
    counted = (seq >= 0).nonzero()[:, 0]
    bad = seq.clone()
    bad[counted[0]] = 6          # = B
    bad[counted[1]] = 1000       # far outside
    fixed = seq.clone()
    fixed[counted[:2]] = -1
    ref = None if on_policy else problem.ref_logprobs
    results = []
    for seq_ids in (bad, fixed):
        x = problem.leaf()
        loss = opo_kernels.opo_loss(x, problem.labels, ref, problem.rewards, seq_ids=seq_ids,
                                    group_ids=problem.layout["group_ids"], validate=False,
                                    backend="triton")
        (grad,) = torch.autograd.grad(loss * 1.5, x)
        results.append((loss.detach(), grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert (results[0][1][counted[:2]] == 0).all()
    with pytest.raises(ValueError, match="seq_ids"):
        opo_kernels.opo_loss(problem.leaf(), problem.labels, ref, problem.rewards, seq_ids=bad,
                             group_ids=problem.layout["group_ids"], backend="triton")


def test_out_of_range_seq_ids_logprob_api():
    g = torch.Generator().manual_seed(0)
    lp, rewards = on_device((-torch.rand(12, generator=g), torch.rand(6, generator=g)))
    lp.requires_grad_()
    seq = on_device(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 5, 4, -1, 9]))  # 9 >= B = 6
    grads = []
    for seq_ids in (seq, torch.where(seq >= 6, -1, seq)):
        loss = opo_kernels.opo_loss_from_logprobs(lp, lp.detach() - 0.1, rewards,
                                                  seq_ids=seq_ids, group_size=2, vocab_size=10,
                                                  validate=False, backend="triton")
        grads.append(torch.autograd.grad(loss, lp)[0])
    assert torch.equal(grads[0], grads[1]) and grads[0][11] == 0
