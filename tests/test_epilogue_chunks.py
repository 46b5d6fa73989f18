"""The epilogue's phase 1 split over token chunks (epilogue/kernel.py ``_chunks``): at shapes
long enough for several chunks and several blocks of sequences, the loss, the metrics and the
per-token gradients still equal the reference's, a bad value in the last chunk of the last
block is still reported, and the chunks' sums are added in a fixed order (bitwise repeatable).

The rest of the suite runs at small T and N, where phase 1 is one chunk per block of
sequences; these shapes are chosen so that it is not.
"""

import pytest
import torch
from problems import make_problem
from test_opo_loss import TOL, assert_close, grad_atol

import opo_kernels
from opo_kernels.epilogue.kernel import _chunks

# (B, T) of make_problem: padded 21 sequences (2 blocks of 16) x 1100 positions (chunks of
# 512: 3); packed 36 sequences (2 blocks of 32) of up to 150 tokens + padding rows (> 2048
# rows: 3 chunks of 1024)
SHAPES = {"padded": (21, 1100, 64), "packed": (36, 150, 128)}


def _problem(layout, seed=0):
    B, T, block_t = SHAPES[layout]
    problem = make_problem(B, T, 5, torch.float32, layout, seed=seed)
    length = T if layout == "padded" else problem.labels.numel()
    assert _chunks(length, block_t)[1] >= 3, "the shape no longer spans several chunks"
    lp = torch.log_softmax(problem.logits.nan_to_num().float(), -1).gather(
        -1, problem.labels.clamp(min=0)[..., None])[..., 0]
    return problem, lp


def _call(problem, lp, backend, ref, **options):
    x = lp.clone().requires_grad_()
    h = (-lp).clamp(min=0).clone().requires_grad_()  # any non-negative entropy-like values
    loss, metrics = opo_kernels.opo_loss_from_logprobs(
        x, ref, problem.rewards, entropy=h, vocab_size=5, entropy_coef=0.03,
        return_metrics=True, backend=backend, **problem.layout, **options)
    gx, gh = torch.autograd.grad(loss * 1.7, (x, h))
    return loss.detach(), metrics, gx, gh


@pytest.mark.parametrize("level", ["sequence_mean", "token"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_sums_match_reference(layout, on_policy, level):
    problem, lp = _problem(layout, seed=1 + int(on_policy))
    ref = None if on_policy else problem.ref_logprobs
    got = _call(problem, lp, "triton", ref, level=level)
    want = _call(problem, lp, "torch", ref, level=level)
    rtol, atol = TOL[torch.float32]["loss"]
    assert_close(got[0], want[0], rtol, atol, "loss")
    for k in want[1]:
        assert_close(got[1][k], want[1][k], rtol, atol, k)
    assert_close(got[2], want[2], TOL[torch.float32]["grad"][0], grad_atol(want[2], 4e-6),
                 "grad logprobs")
    assert_close(got[3], want[3], 1e-6, 1e-9, "grad entropy")
    again = _call(problem, lp, "triton", ref, level=level)
    for a, b in zip((got[0], *got[2:]), (again[0], *again[2:])):
        assert torch.equal(a, b), "two identical calls differ"


def test_bad_value_in_last_chunk_is_reported():
    """NaN in a counted ref_logprob of the last sequence at its last counted position: the
    program of the last chunk of the last block counts it."""
    problem, lp = _problem("padded")
    ref = problem.ref_logprobs.clone()
    mask = problem.layout["mask"] != 0
    t_last = int(mask[-1].nonzero().max())
    assert t_last >= 1024  # in the third chunk
    ref[-1, t_last] = float("nan")
    with pytest.raises(ValueError, match="ref_logprobs"):
        opo_kernels.opo_loss_from_logprobs(lp, ref, problem.rewards, vocab_size=5,
                                           backend="triton", **problem.layout)


def test_bad_seq_id_in_last_chunk_is_reported():
    problem, lp = _problem("packed")
    layout = dict(problem.layout)
    seq_ids = layout["seq_ids"].clone()
    seq_ids[-1] = problem.rewards.numel()  # one past the last sequence, in the last chunk
    layout["seq_ids"] = seq_ids
    with pytest.raises(ValueError, match="seq_ids"):
        opo_kernels.opo_loss_from_logprobs(lp, problem.ref_logprobs, problem.rewards,
                                           vocab_size=5, backend="triton", **layout)
