"""Fused Triton path vs the in-package reference: loss, metrics AND gradient w.r.t. logits.

Every comparison is against a float64 oracle (the reference on the same logit values upcast to
float64); for 16-bit logits the 16-bit reference is held to the same tolerance, so the kernel is
never judged against a rounded reference.

Shape grid, and why:
- the option grid (level × coordinates × weights × center × adaptive τ × entropy × temperature,
  both layouts) runs at one tiny shape (B=9, T=6, V=7): the options only touch the epilogue and
  the per-row coefficients, and the interpreter is slow;
- the shape grid covers V = 1 (a single block, lse = logit), 7 (block padding), 1000 (several
  warps' worth, one block), 32003 (prime, several blocks of the V loop with a ragged tail) in
  fp32/bf16/fp16 and both layouts.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from problems import DEVICE, make_problem, on_device

import opo_kernels
import opo_kernels.utils as ok_utils
from opo_kernels import reference

# Per logits dtype: loss/metrics (rtol, atol) and gradient (rtol, atol as a fraction of
# max|oracle grad|). Losses and metrics are computed in fp32 from the same logit values whatever
# the logits dtype: fp32 log-probs of size ~2-10 carry ~1e-6 absolute error, and log-ratio
# metrics are small differences of them, hence an absolute floor. The same ~1e-6 error in Δ_t
# reaches the gradient through c_t (the penalty's part is proportional to v_t ≈ Δ_t), so a row
# with Δ_t ≈ 0 carries error at 1e-6 of the gradient's scale even in the fp32 reference (seen
# by the hypothesis test: 1.0e-6 there), hence the fp32 atol of 4e-6 of max|grad|. Gradients are
# rounded to the
# logits dtype (bf16: 8 significant bits -> at most 2^-8 relative error when rounding to
# nearest; fp16: 11 bits -> 2^-11). The Triton interpreter (CPU CI) casts fp32 -> bf16 by
# truncation, whatever rounding is asked for (checked with triton 3.9): up to one ulp, 2^-7.
BF16_RTOL = 2**-7 if ok_utils.interpreter_on() else 2**-8
TOL = {
    torch.float32: {"loss": (2e-5, 2e-6), "grad": (1e-4, 4e-6)},
    torch.bfloat16: {"loss": (2e-5, 2e-6), "grad": (BF16_RTOL, 1e-5)},
    torch.float16: {"loss": (2e-5, 2e-6), "grad": (2**-11, 1e-5)},
    torch.float64: {"loss": (1e-10, 1e-12), "grad": (1e-9, 1e-12)},
}
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
              torch.float64: "fp64"}


def assert_close(actual, expected, rtol, atol, what):
    """|actual − expected| <= atol + rtol·|expected| elementwise, NaN never passes."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    worst = (err - bound).argmax() if err.dim() else None
    assert (err <= bound).all(), (
        f"{what}: max err {err.max().item():.3e} "
        f"(at {worst.item() if worst is not None else '-'}; rtol={rtol}, atol={atol:.2e})"
    )


def grad_atol(expected, frac):
    """frac of the gradient's scale. A gradient that is exactly 0 in exact arithmetic (e.g. a
    one-sequence group with centered weights, on-policy) is rounding noise in both the oracle
    and the kernel: its scale is floored at 1e-6 (an O(1/N) loss gradient is far above that)."""
    return frac * max(expected.abs().max().item(), 1e-6)


def assert_matches(loss, metrics, grad, exp_loss, exp_metrics, exp_grad, dtype=torch.float32):
    """A kernel call's loss, metrics (the same names) and logits gradient against the float64
    reference's, at TOL[dtype]."""
    rtol, atol = TOL[dtype]["loss"]
    assert_close(loss, exp_loss, rtol, atol, "loss")
    assert set(metrics) == set(exp_metrics)
    for k in exp_metrics:
        assert_close(metrics[k], exp_metrics[k], rtol, atol, k)
    rtol, frac = TOL[dtype]["grad"]
    assert_close(grad, exp_grad, rtol, grad_atol(exp_grad, frac), "grad")


def run(problem, backend, dtype=None, g=None, **options):
    """loss, metrics, ∂(g·loss)/∂logits for one backend."""
    leaf = problem.leaf(dtype)
    labels, ref, rewards = problem.args()
    if dtype == torch.float64:
        ref = ref.double()
    fn = reference.opo_loss if backend == "oracle" else opo_kernels.opo_loss
    extra = {} if backend == "oracle" else {"backend": backend}
    loss, metrics = fn(leaf, labels, ref, rewards, return_metrics=True, **problem.layout,
                       **extra, **options)
    (grad,) = torch.autograd.grad(loss * (g if g is not None else 1.0), leaf)
    return loss.detach(), metrics, grad


def compare(problem, dtype, **options):
    g = torch.randn((), generator=torch.Generator().manual_seed(1)).abs() + 0.5
    exp_loss, exp_metrics, exp_grad = run(problem, "oracle", torch.float64, g=g, **options)
    rtol_l, atol_l = TOL[dtype]["loss"]
    rtol_g, atol_g = TOL[dtype]["grad"]
    for backend in ("triton", "torch"):  # the 16-bit reference must meet the same bar
        loss, metrics, grad = run(problem, backend, g=g, **options)
        assert loss.dtype == torch.float32
        assert grad.dtype == dtype and grad.shape == problem.logits.shape
        assert_close(loss, exp_loss, rtol_l, atol_l, f"{backend} loss")
        assert set(metrics) == set(exp_metrics)
        for k in metrics:
            assert_close(metrics[k], exp_metrics[k], rtol_l, atol_l, f"{backend} metric {k}")
        assert_close(grad, exp_grad, rtol_g, grad_atol(exp_grad, atol_g), f"{backend} grad")
        counted = (problem.layout["mask"] != 0 if "mask" in problem.layout
                   else problem.layout["seq_ids"] >= 0)
        assert (grad[~counted] == 0).all(), "rows not counted must get a zero gradient"


# ---- the option grid -----------------------------------------------------------------------
WEIGHTS = ["seed", "escort", "tensor"]
OPTION_GRID = list(itertools.product(
    ["sequence", "sequence_mean", "token"],  # level
    ["ratio", "log"],                        # coordinates
    WEIGHTS,
    [False, True],                           # center_weights
    [False, True],                           # adaptive_tau
    [0.0, 0.05],                             # entropy_coef
    [1.0, 0.7],                              # temperature
))


def _option_id(opts):
    level, coords, weights, center, adaptive, beta, temp = opts
    return (f"{level}-{coords}-{weights}{'-center' if center else ''}"
            f"{'-adaptive' if adaptive else ''}{f'-ent{beta}' if beta else ''}"
            f"{f'-temp{temp}' if temp != 1 else ''}")


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("opts", OPTION_GRID, ids=[_option_id(o) for o in OPTION_GRID])
def test_options(opts, layout):
    level, coords, weights, center, adaptive, beta, temp = opts
    seed = OPTION_GRID.index(opts)
    problem = make_problem(9, 6, 7, torch.float32, layout, seed=seed, temperature=temp)
    if weights == "tensor":
        weights = on_device(torch.randn(9, generator=torch.Generator().manual_seed(seed)))
    compare(problem, torch.float32, level=level, coordinates=coords, weights=weights,
            center_weights=center, adaptive_tau=adaptive, entropy_coef=beta, temperature=temp,
            alpha=0.3 + 0.1 * (seed % 5), mu=0.5 + (seed % 3))


# ---- the shape × dtype grid ----------------------------------------------------------------
SHAPES = [(3, 5, 1), (9, 6, 7), (6, 4, 1000), (3, 3, 32003)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPE_GRID = list(itertools.product(SHAPES, DTYPES, ["padded", "packed"]))


@pytest.mark.parametrize(
    "shape,dtype,layout", SHAPE_GRID,
    ids=[f"B{b}-T{t}-V{v}-{DTYPE_NAME[d]}-{lay}" for (b, t, v), d, lay in SHAPE_GRID],
)
def test_shapes_dtypes(shape, dtype, layout):
    B, T, V = shape
    problem = make_problem(B, T, V, dtype, layout, seed=V + B)
    compare(problem, dtype, entropy_coef=0.02)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_float64_logits(layout):
    problem = make_problem(6, 5, 11, torch.float64, layout, seed=3)
    exp_loss, _, exp_grad = run(problem, "oracle", torch.float64)
    loss, _, grad = run(problem, "triton", torch.float64)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert_close(loss, exp_loss, *TOL[torch.float64]["loss"], "loss")
    rtol, frac = TOL[torch.float64]["grad"]
    assert_close(grad, exp_grad, rtol, grad_atol(exp_grad, frac), "grad")


# ---- behaviours of the fused path ----------------------------------------------------------
def test_inputs_not_modified_and_inplace_backward():
    problem = make_problem(6, 5, 13, torch.float32, "padded", seed=5)
    leaf = problem.leaf()
    before = leaf.detach().clone()
    loss = opo_kernels.opo_loss(leaf, *problem.args(), backend="triton", **problem.layout)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(leaf.detach().nan_to_num(7), before.nan_to_num(7)), "logits modified"

    # in place: the gradient is written into the logits buffer itself, with the same values
    x = before.clone().requires_grad_()  # a buffer the caller agrees to lose
    loss2 = opo_kernels.opo_loss(x, *problem.args(), backend="triton", inplace_backward=True,
                                 **problem.layout)
    (grad2,) = torch.autograd.grad(loss2, x)
    assert grad2.data_ptr() == x.data_ptr()
    torch.testing.assert_close(grad2, grad, rtol=0, atol=0)


def test_uncounted_rows_not_read():
    """NaN in every row that is not counted (built into the problems) must not leak: the loss
    is finite and equal to the reference without those rows' values."""
    problem = make_problem(6, 8, 9, torch.float32, "padded", seed=11)
    assert torch.isnan(problem.logits).any()
    loss, _, grad = run(problem, "triton")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_no_counted_token_gives_zero():
    problem = make_problem(3, 4, 5, torch.float32, "padded", seed=2)
    problem.layout["mask"] = torch.zeros(3, 4, dtype=torch.bool, device=DEVICE)
    for backend in ("triton", "torch"):
        loss, metrics, grad = run(problem, backend)
        assert loss.item() == 0.0
        assert (grad == 0).all()
        assert all(torch.isfinite(v) for v in metrics.values())


def test_on_policy_ref_none_matches_detached_logprobs():
    """ref_logprobs=None is the on-policy mode: π_ref = the detached current policy."""
    problem = make_problem(6, 5, 9, torch.float32, "packed", seed=4)
    leaf = problem.leaf()
    seq = problem.layout["seq_ids"]
    lp = reference.token_stats(leaf.detach().nan_to_num(), problem.labels.clamp(min=0), 1.0,
                               False)[0]
    ref = torch.where(seq >= 0, lp, float("nan")).float()
    g = torch.tensor(1.7)
    for backend in ("triton", "torch"):
        out = opo_kernels.opo_loss(leaf, problem.labels, None, problem.rewards,
                                   backend=backend, **problem.layout)
        exp = reference.opo_loss(leaf, problem.labels, ref, problem.rewards, **problem.layout)
        (g1,) = torch.autograd.grad(out * g, leaf)
        (g2,) = torch.autograd.grad(exp * g, leaf)
        assert_close(out.detach(), exp.detach(), 1e-6, 1e-7, f"{backend} loss")
        assert_close(g1, g2, 1e-5, grad_atol(g2, 1e-6), f"{backend} grad")


def test_module_and_auto_backend():
    problem = make_problem(6, 4, 10, torch.float32, "padded", seed=6)
    module = opo_kernels.OPOLoss(alpha=0.4, level="token")
    assert "alpha=0.4" in repr(module)
    leaf = problem.leaf()
    out = module(leaf, *problem.args(), **problem.layout)
    exp = opo_kernels.opo_loss(leaf, *problem.args(), alpha=0.4, level="token",
                               backend="torch", **problem.layout)
    assert_close(out.detach(), exp.detach(), 2e-5, 1e-6, "module loss")


def test_strided_1d_labels_and_seq_ids():
    """Packed labels/seq_ids given as strided views (x[::2]) are read correctly."""
    problem = make_problem(6, 5, 9, torch.float32, "packed", seed=8)
    n = problem.labels.shape[0]
    zeros = torch.zeros(n, dtype=torch.long, device=DEVICE)
    labels = torch.stack([problem.labels, zeros], 1).reshape(-1)[::2]
    seq = problem.layout["seq_ids"]
    seq2 = torch.stack([seq, torch.full_like(seq, 99)], 1).reshape(-1)[::2]
    assert not labels.is_contiguous() and not seq2.is_contiguous()
    kwargs = dict(seq_ids=seq2, group_ids=problem.layout["group_ids"])
    x = problem.leaf()
    out = opo_kernels.opo_loss(x, labels, problem.ref_logprobs, problem.rewards,
                               backend="triton", **kwargs)
    exp = reference.opo_loss(x, problem.labels, problem.ref_logprobs, problem.rewards,
                             **problem.layout)
    assert_close(out.detach(), exp.detach(), 2e-5, 2e-6, "loss")


@pytest.mark.parametrize("level", ["sequence", "sequence_mean"])
def test_far_off_policy_ratio_gradient(level):
    """e^δ << 1 (the batch is far from the current policy): dv/dδ = e^δ must not be formed as
    v + 1 = (e^δ − 1) + 1, which cancels to a few ulps of 1 (found by the hypothesis test)."""
    problem = make_problem(6, 4, 33, torch.float32, "padded", seed=12, noise=0.0)
    problem.ref_logprobs = problem.ref_logprobs + 12.0  # Δ ≈ −12 on every token
    compare(problem, torch.float32, level=level, mu=0.0, temperature=0.5)


@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_compute_entropy_is_metric_only(layout, on_policy):
    """compute_entropy=True adds entropy_mean (from the same pass) and changes nothing else."""
    problem = make_problem(6, 5, 50, torch.float32, layout, seed=9)
    if on_policy:
        problem.ref_logprobs = None
    exp_metrics = (None if on_policy else
                   run(problem, "oracle", torch.float64, compute_entropy=True)[1])
    for backend in ("triton", "torch"):
        base_loss, base_metrics, base_grad = run(problem, backend)
        loss, metrics, grad = run(problem, backend, compute_entropy=True)
        assert set(metrics) == set(base_metrics) | {"entropy_mean"}
        assert_close(loss, base_loss, 1e-6, 1e-7, f"{backend} loss")
        assert_close(grad, base_grad, 1e-5, grad_atol(base_grad, 1e-6), f"{backend} grad")
        if exp_metrics is not None:
            assert_close(metrics["entropy_mean"], exp_metrics["entropy_mean"],
                         *TOL[torch.float32]["loss"], f"{backend} entropy_mean")
