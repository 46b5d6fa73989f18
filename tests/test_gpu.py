"""GPU-only tests at production sizes (skipped without CUDA; run with
``TRITON_INTERPRET=0 python -m pytest -m gpu``).

The full reference would materialize several float32 copies of [N, V] (tens of GB at
N=16384, V=151936), so here the oracle is built row-wise: reference log-probs in chunks
(no grad), the reference objective on them (autograd gives c_t = ∂L/∂lp_t), and the gradient of
a sample of rows rebuilt in float64 as (1/temperature)·c_t·(onehot − p). Every row is also
checked for being finite, and rows not counted for being exactly zero.
"""

import pytest
import torch

import opo_kernels
from opo_kernels import reference
from opo_kernels.__main__ import padded_problem
from opo_kernels.utils import interpreter_on

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _oracle(logits, labels, ref, rewards, seq, num_seqs, group, temperature=1.0, chunk=2048,
            **options):
    """Row-wise reference: (loss, c [n counted], rows [n]) in float64."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    rows = (seq >= 0).nonzero()[:, 0]
    lp = torch.cat([reference.chunked_logprobs(flat[r].double(), labels[r], temperature, chunk)
                    for r in rows.split(chunk)]).requires_grad_()
    cfg = opo_kernels.OPOLossConfig(temperature=temperature, **options)
    loss, _ = reference.objective(cfg, lp, ref[rows].double(), None, seq[rows], rewards.double(),
                                  group, None, V)
    (c,) = torch.autograd.grad(loss, lp)
    return loss.detach(), c, rows


def _check_rows(grad, logits, labels, c, rows, temperature, sample=64):
    V = logits.shape[-1]
    flat, gflat = logits.reshape(-1, V), grad.reshape(-1, V)
    pick = torch.linspace(0, rows.numel() - 1, sample, device=rows.device).long()
    r = rows[pick]
    z = flat[r].double() / temperature
    p = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(labels[r], V).double()
    expected = c[pick, None] * (onehot - p) / temperature
    got = gflat[r].double()
    # bf16 rounding to nearest: 2^-8 relative (the CPU interpreter truncates: 2^-7)
    tol = {torch.bfloat16: 2**-7 if interpreter_on() else 2**-8}.get(logits.dtype, 1e-5)
    err = (got - expected).abs() - tol * expected.abs()
    assert err.max() <= 1e-5 * expected.abs().max(), f"max excess err {err.max().item():.3e}"


def _run_and_check(logits, labels, ref, rewards, mask, group_size, temperature=1.0):
    B, T, V = logits.shape
    x = logits.detach().requires_grad_()
    loss = opo_kernels.opo_loss(x, labels, ref, rewards, mask=mask, group_size=group_size,
                                temperature=temperature, backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    seq = torch.where(mask.reshape(-1), torch.arange(B * T, device=DEV) // T, -1)
    group = torch.arange(B, device=DEV) // group_size
    exp_loss, c, rows = _oracle(logits, labels.reshape(-1), ref.reshape(-1), rewards, seq, B,
                                group, temperature)
    torch.testing.assert_close(loss.double(), exp_loss, rtol=2e-5, atol=2e-6)
    assert torch.isfinite(grad).all()
    assert (grad.reshape(-1, V)[seq < 0] == 0).all()
    _check_rows(grad, logits, labels.reshape(-1), c, rows, temperature)


def test_qwen_vocab_16k_tokens_bf16():
    """V = 151936 (Qwen2) at N = 16384: also N·V = 2.49e9 > 2^31 (int64 offsets)."""
    logits, labels, ref, rewards, mask = padded_problem(16, 1024, 151936, torch.bfloat16, DEV)
    assert logits.numel() > 2**31
    _run_and_check(logits, labels, ref, rewards, mask, group_size=4, temperature=0.9)


def test_packed_offsets_past_2_31_fp32():
    """Packed fp32 rows with N·V > 2^31: the last rows are read at offsets beyond int32."""
    N, V, B = 20000, 110000, 8
    g = torch.Generator(device=DEV).manual_seed(1)
    logits = torch.randn(N, V, device=DEV, generator=g)
    assert logits.numel() > 2**31
    labels = torch.randint(0, V, (N,), device=DEV, generator=g)
    seq = torch.arange(N, device=DEV) * B // N
    seq[::7] = -1
    ref = -torch.rand(N, device=DEV, generator=g) * 12
    rewards = torch.rand(B, device=DEV, generator=g)
    group_ids = torch.arange(B, device=DEV) // 2
    x = logits.detach().requires_grad_()
    loss = opo_kernels.opo_loss(x, labels, ref, rewards, seq_ids=seq, group_ids=group_ids,
                                level="token", coordinates="log", backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    exp_loss, c, rows = _oracle(logits, labels, ref, rewards, seq, B, group_ids,
                                level="token", coordinates="log")
    torch.testing.assert_close(loss.double(), exp_loss, rtol=2e-5, atol=2e-6)
    last = rows[-64:]  # rows whose offsets exceed 2^31
    assert last[0].item() * V > 2**31
    _check_rows(grad, logits, labels, c[-64:], last, 1.0, sample=64)


def test_long_sequences_t_over_65535():
    """T > 65,535 rows per sequence: rows are flattened on grid axis 0, never on axis 1."""
    logits, labels, ref, rewards, mask = padded_problem(2, 70000, 512, torch.bfloat16, DEV, seed=2)
    x = logits.detach().requires_grad_()
    loss = opo_kernels.opo_loss(x, labels, ref, rewards, mask=mask, group_size=2,
                                entropy_coef=0.01, backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    y = logits.detach().float().requires_grad_()
    exp = reference.opo_loss(y, labels, ref, rewards, mask=mask, group_size=2, entropy_coef=0.01)
    (exp_grad,) = torch.autograd.grad(exp, y)
    torch.testing.assert_close(loss, exp, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad.float(), exp_grad, rtol=2**-8, atol=1e-5 *
                               exp_grad.abs().max().item())


def test_transposed_view_offsets_past_2_31():
    """Logits as a column-major view (``base.t()``, stride over V = 16384): a row's element
    offsets reach V·16384 = 2.49e9 > 2^31 inside the vocabulary loop (GPU review finding 5:
    32-bit ``offs * stride_v`` would wrap). Only 48 rows are read. Checked against the reference
    on a contiguous copy."""
    V, width, B, T = 151936, 16384, 6, 8
    g = torch.Generator(device=DEV).manual_seed(3)
    base = torch.empty(V, width, device=DEV, dtype=torch.bfloat16)
    logits = base.t()[: B * T].view(B, T, V)  # [B, T, V], stride over V = width
    logits.copy_(torch.randn(B, T, V, device=DEV, generator=g))
    assert logits.stride(-1) * (V - 1) > 2**31
    labels = torch.randint(0, V, (B, T), device=DEV, generator=g)
    mask = torch.rand(B, T, device=DEV, generator=g) < 0.8
    ref = reference.chunked_logprobs(logits, labels) + 0.05 * torch.randn(
        B, T, device=DEV, generator=g)
    rewards = torch.rand(B, device=DEV, generator=g)
    x = logits.detach().requires_grad_()
    loss = opo_kernels.opo_loss(x, labels, ref, rewards, mask=mask, group_size=3,
                                backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    y = logits.detach().contiguous().float().requires_grad_()
    exp = reference.opo_loss(y, labels, ref, rewards, mask=mask, group_size=3)
    (exp_grad,) = torch.autograd.grad(exp, y)
    torch.testing.assert_close(loss, exp, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad.float(), exp_grad, rtol=2**-8, atol=1e-5 *
                               exp_grad.abs().max().item())


@pytest.mark.parametrize("in_place", [True, False], ids=["addmm", "mm-then-add"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_linear_sums_16bit_products_unrounded(dtype, in_place, monkeypatch):
    """The fused-linear backward's split sums (∂W over chunks of rows, ∂hidden over blocks of
    columns) add 16-bit products into an fp32 accumulator; on CUDA each product goes into it
    inside the matmul (``out_dtype``), unrounded, or, where this torch's addmm refuses an fp32
    accumulator, as an fp32 product added to it (forced here by ``in_place=False``). Four
    parts, a transposed left operand as in ∂W: the sum agrees with float64 to fp32 accuracy,
    ~100× tighter than a product rounded to 16 bits would allow (its relative error alone is
    up to 2^-9 for bf16)."""
    from opo_kernels import linear_chunks
    from opo_kernels.linear_chunks import _MM_OUT_DTYPE, _add_product

    assert _MM_OUT_DTYPE, "torch >= 2.8 has mm/addmm with out_dtype"
    if in_place:  # (the answer this torch gives, asked afresh)
        monkeypatch.setattr(linear_chunks, "_ADDMM_SUMS", {})
        assert linear_chunks._addmm_sums_in_place(torch.device(DEV)), (
            f"torch {torch.__version__}: addmm(fp32 acc, 16-bit a, b, out_dtype=float32) "
            "refused; the sums take the mm-then-add path")
    else:
        monkeypatch.setattr(linear_chunks, "_ADDMM_SUMS", {"cuda": False})
    g = torch.Generator(device=DEV).manual_seed(0)
    parts = [(torch.randn(512, 96, device=DEV, generator=g).to(dtype),
              torch.randn(512, 80, device=DEV, generator=g).to(dtype)) for _ in range(4)]
    acc = torch.empty(96, 80, device=DEV, dtype=torch.float32)
    for i, (a, b) in enumerate(parts):
        _add_product(acc, a.t(), b, first=i == 0)
    exact = sum(a.t().double() @ b.double() for a, b in parts)
    err = (acc.double() - exact).abs().max().item() / exact.abs().max().item()
    assert err < 2e-6, err
