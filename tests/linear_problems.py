"""Shared by the fused-linear tests (test_fused_linear.py, test_fused_linear_loops.py): a
random problem with the awkward parts built in, one run of a backend (loss, metrics, the
gradients of hidden, weight and bias) and the comparison with a float64 oracle.

Every comparison is against a float64 oracle (``reference.opo_loss`` on ``F.linear`` of the same
input values upcast to float64); for bf16 the bf16 reference (backend="torch") is held to the
same tolerance, so the kernel is never judged against a rounded reference.

Shape, and why: the per-row kernels are already tested over V and dtypes in test_opo_loss.py,
and the interpreter is slow, so every problem is tiny (B=4, T=5, H=12, V=23; N = 20 padded
rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from problems import on_device

from opo_kernels import fused_linear_opo_loss, reference

# Per input dtype, against the float64 oracle: "loss" (loss and metrics): (rtol, absolute atol);
# "grad": (rtol, atol as a fraction of max|oracle gradient|). Absolute for the scalars because
# the log-ratio metrics are means of small Δ_t with cancellation, so their error follows the
# size of the logits, not their own. fp32: the logits are a length-H fp32 dot product (~1e-7
# relative), the gradients go through two more fp32 matmuls. bf16: the logits are rounded to
# bf16 (8 significant bits, |z| up to ~5) before the softmax, so every log-prob moves by up to
# ~1e-2 and Δ ~ 0.1 by ~10%; the bf16 reference has the same error (it rounds the same logits).
# Measured worst case over 24 problems (chunk 3), kernel and bf16 reference alike: loss and
# metrics 7.7e-3 absolute; gradients 1.1e-2 of max|grad|. fp32: 3e-7 and 5e-7.
TOL = {
    torch.float32: {"loss": (1e-5, 1e-6), "grad": (1e-4, 2e-6)},
    torch.bfloat16: {"loss": (2e-2, 1.5e-2), "grad": (3e-2, 2.5e-2)},
    torch.float64: {"loss": (1e-10, 1e-12), "grad": (1e-9, 1e-12)},
}
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}
B, T, H, V = 4, 5, 12, 23


def assert_close(actual, expected, rtol, atol, what):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    assert (err <= bound).all(), (
        f"{what}: max err {err.max().item():.3e} (rtol={rtol}, atol={atol:.2e})")


def grad_atol(expected, frac):
    return frac * max(expected.abs().max().item(), 1e-30)


class Problem:
    """A random problem in float64 with the awkward parts built in: padded hidden is a
    [:, :-1] view of a buffer whose last column is NaN (never to be read), packed hidden rows
    have stride H + 3; sequence 1 is empty; uncounted rows have label −100 and NaN
    ref_logprobs; ref_logprobs = true log-probs + N(0, 0.1²) (small log-ratios, as in RL)."""

    def __init__(self, layout: str, seed: int, bias: bool = True, B=B, T=T, H=H, V=V):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2 / math.sqrt(H))
        self.bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
        self.rewards = torch.rand(B, generator=g)
        if layout == "padded":
            counted = torch.rand(B, T, generator=g) < 0.7
            counted[:, 0] = True
            counted[1] = False  # an empty sequence (group 0 keeps one member)
            self.buffer = torch.randn(B, T + 1, H, generator=g, dtype=torch.float64)
            self.buffer[:, -1] = float("nan")
            self.view = lambda buf: buf[:, :-1]
            self.labels = torch.randint(0, V, (B, T), generator=g).masked_fill(~counted, -100)
            mask = counted.to(torch.int64) if seed % 2 else counted  # 0/1 ints or bool
            self.layout = {"mask": mask, "group_size": 2}
        else:
            lengths = torch.randint(1, T + 1, (B,), generator=g)
            lengths[1] = 0
            seq = torch.repeat_interleave(torch.arange(B), lengths)
            seq = torch.cat([seq, torch.full((3,), -1)])  # 3 rows not counted
            seq = seq[torch.randperm(seq.numel(), generator=g)]  # interleaved sequences
            counted = seq >= 0
            n = seq.numel()
            self.buffer = torch.randn(n, H + 3, generator=g, dtype=torch.float64)
            self.buffer[:, H:] = float("nan")
            self.view = lambda buf: buf[:, :H]
            self.labels = torch.randint(0, V, (n,), generator=g).masked_fill(~counted, -100)
            group_ids = torch.tensor([7, 3, 7, 3])  # groups not given as consecutive blocks
            self.layout = {"seq_ids": seq.to(torch.int32), "group_ids": group_ids}
        self.counted = counted
        logits = F.linear(self.view(self.buffer), self.weight, self.bias)
        lp = torch.log_softmax(logits, -1).gather(-1, self.labels.clamp(min=0)[..., None])[..., 0]
        noise = 0.1 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
        self.ref = torch.where(counted, lp + noise, float("nan")).float()
        for name in ("weight", "bias", "rewards", "buffer", "labels", "layout", "counted", "ref"):
            setattr(self, name, on_device(getattr(self, name)))  # drawn on the CPU, then moved

    def params(self, dtype, oracle_of=None):
        """Fresh leaves (buffer, weight, bias) in dtype; with oracle_of, the values of the
        `oracle_of` inputs in float64."""
        def leaf(t):
            if t is None:
                return None
            t = t.to(oracle_of).to(torch.float64) if oracle_of is not None else t.to(dtype)
            return t.clone().requires_grad_()
        return leaf(self.buffer), leaf(self.weight), leaf(self.bias)


def run(problem, backend, dtype, g, *, oracle_of=None, on_policy=False, chunk_size=None,
        logits_budget=None, **options):
    """loss, metrics, gradients of g·loss w.r.t. (hidden, weight, bias) for one backend."""
    buf, weight, bias = problem.params(dtype, oracle_of)
    hidden = problem.view(buf)
    ref = None if on_policy else problem.ref.to(torch.float64 if backend == "oracle"
                                                else torch.float32)
    args = (problem.labels, ref, problem.rewards)
    if backend == "oracle":
        loss, metrics = reference.opo_loss(F.linear(hidden, weight, bias), *args,
                                           return_metrics=True, **problem.layout, **options)
    else:
        loss, metrics = fused_linear_opo_loss(hidden, weight, *args, bias=bias,
                                              chunk_size=chunk_size, backend=backend,
                                              logits_budget=logits_budget,
                                              return_metrics=True, **problem.layout, **options)
    leaves = [t for t in (buf, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss * g, leaves)
    grad_buf = grads[0]
    outside = torch.ones_like(grad_buf, dtype=torch.bool)
    problem.view(outside).fill_(False)
    assert (grad_buf[outside] == 0).all(), "gradient outside the hidden view"
    return loss.detach(), metrics, (problem.view(grad_buf),) + tuple(grads[1:])


def upstream(seed):
    """A random upstream gradient, away from 0 and of either sign."""
    g = torch.randn((), generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return g + g.sign() * 0.5


def compare(problem, dtype, seed, backends=("triton", "torch"), **kwargs):
    g = upstream(seed)
    exp_loss, exp_metrics, exp_grads = run(problem, "oracle", torch.float64, g,
                                           oracle_of=dtype, **kwargs)
    rtol_l, atol_l = TOL[dtype]["loss"]
    rtol_g, atol_g = TOL[dtype]["grad"]
    for backend in backends:
        loss, metrics, grads = run(problem, backend, dtype, g.to(compute(dtype)), **kwargs)
        assert loss.dtype == compute(dtype)
        assert_close(loss, exp_loss, rtol_l, atol_l, f"{backend} loss")
        assert set(metrics) == set(exp_metrics)
        for k in metrics:
            assert_close(metrics[k], exp_metrics[k], rtol_l, atol_l, f"{backend} metric {k}")
        for name, grad, exp in zip(("hidden", "weight", "bias"), grads, exp_grads):
            assert grad.dtype == dtype, f"{backend} grad {name} dtype"
            assert_close(grad, exp, rtol_g, grad_atol(exp, atol_g), f"{backend} grad {name}")
        assert (grads[0][~problem.counted] == 0).all(), "rows not counted: zero hidden grad"


def compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32
