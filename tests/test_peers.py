"""The benchmarks' peer adapters (benchmarks/peers.py, benchmarks/peers_torch.py) at tiny sizes
on the CPU: where a peer computes the same math as ours, its loss and gradients equal the
reference's (``opo_kernels.reference``); Liger's GSPO rows (no OPO in Liger) agree with each
other and with GSPO's formula. The peers' Triton kernels run under the interpreter where they
can (Liger's triton_grpo_loss); cut-cross-entropy's cannot (a None kernel argument), so its
documented torch implementation stands in for them on the CPU: the same math, not the same code.
"""

import sys
from pathlib import Path

import pytest
import torch

import opo_kernels
from opo_kernels import reference

pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import peers  # noqa: E402
from benchmarks.peers_torch import TorchOPO  # noqa: E402

# bf16 inputs, fp32 losses: the peers round the logits / gradients like ours do
LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
LOGPROB_TOL = dict(rtol=0, atol=2e-2)    # one bf16 logit rounding of a log-prob near −4
GRAD_TOL = dict(rtol=2e-2, atol=2e-3)    # bf16 gradients


def _problem(seed=0, b=6, t=9, h=16, v=50, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * h ** -0.5).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=gen)
    mask = (torch.rand(b, t, generator=gen) < 0.7).long()
    mask[:, 0] = 1  # no empty sequence
    logits = (hidden.float() @ weight.float().t()).to(dtype)
    ref = reference.chunked_logprobs(logits, labels) + 0.05 * torch.randn(b, t, generator=gen)
    rewards = torch.randn(b, generator=gen)
    return hidden, weight, labels, mask, ref, rewards


def _grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


# ---- strong torch ----------------------------------------------------------------------------


@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
@pytest.mark.parametrize("layout", ["padded_shift", "packed"])
def test_strong_torch_equals_reference(layout, on_policy):
    hidden, weight, labels, mask, ref, rewards = _problem()
    ref = None if on_policy else ref
    opo = TorchOPO(backend="eager")  # Dynamo traces the whole loss (no graph break allowed)
    if layout == "packed":
        n = int(mask.sum())
        logits = torch.randn(n, 50).to(torch.bfloat16).requires_grad_()
        seq = torch.arange(6).repeat_interleave(mask.sum(1))
        lab = labels[mask != 0]
        r = None if ref is None else ref[mask != 0]
        prepared = opo.prepare(lab, r, rewards, vocab_size=50, seq_ids=seq, group_size=3)
        loss = opo(logits, prepared)
        want = reference.opo_loss(logits, lab, r, rewards, seq_ids=seq, group_size=3)
    else:  # the model's [B, T+1, V] output, the loss reading its [:, :-1]
        logits = torch.randn(6, 10, 50).to(torch.bfloat16).requires_grad_()
        prepared = opo.prepare(labels, ref, rewards, vocab_size=50, mask=mask, group_size=3)
        loss = opo(logits, prepared, shift=True)
        want = reference.opo_loss(logits[:, :-1], labels, ref, rewards, mask=mask,
                                  group_size=3)
    torch.testing.assert_close(loss, want, **LOSS_TOL)
    (got,), (exp,) = _grads(loss, logits), _grads(want, logits)
    torch.testing.assert_close(got.float(), exp.float(), **GRAD_TOL)
    if layout == "padded_shift":
        assert (got[:, -1] == 0).all()  # the last position is not read



def _big_buffers(code, numel):
    """The buffers of at least ``numel`` elements that Inductor's generated code allocates."""
    import math
    import re

    shapes = re.findall(r"empty_strided_\w+\(\(([0-9, ]+)\)", code)
    sizes = [math.prod(int(d) for d in s.split(",") if d.strip()) for s in shapes]
    return [n for n in sizes if n >= numel]


def test_strong_torch_backward_is_one_kernel_that_writes_the_gradient():
    """Inductor (its CPU backend: the same graph and fusion decisions as on CUDA, C++ instead of
    Triton) compiles the log-prob graph's backward into ONE kernel, and allocates nothing of
    [B, T(+1), V] but the gradient it returns. Written with gather(label), the backward made a
    zero-filled bf16 [B, T, V] buffer, scattered into it, then read it in a second kernel; with
    logsumexp's max not detached, it allocated an fp32 [B, T, V] buffer."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    b, t, v = 3, 7, 64
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(b, t + 1, v, generator=gen).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=gen)
    rows = torch.tensor([0, 2, 3, 8, 9, 15, 20])
    g = torch.randn(rows.numel(), generator=gen)
    opo = TorchOPO(backend="inductor")

    def step():
        lp = opo._logprobs(x, labels, rows, True)
        return lp, torch.autograd.grad(lp, x, g)[0]

    (lp, grad), codes = run_and_get_code(step)
    assert len(codes) == 2, f"expected a forward and a backward graph, got {len(codes)}"
    backward = codes[1]
    kernels = [line for line in backward.splitlines() if " = async_compile." in line]
    assert len(kernels) == 1, "backward kernels:\n" + "\n".join(kernels)
    assert "scatter" not in backward
    assert _big_buffers(backward, t * v) == [b * (t + 1) * v]  # the gradient only

    x2 = x.detach().float().requires_grad_()
    want = torch.log_softmax(x2[:, :-1], -1).gather(-1, labels[..., None])[..., 0]
    want = want.reshape(-1)[rows]
    torch.testing.assert_close(lp, want, **LOGPROB_TOL)
    (want_grad,) = torch.autograd.grad(want, x2, g)
    torch.testing.assert_close(grad.float(), want_grad, **GRAD_TOL)


def test_strong_torch_never_falls_back_to_eager():
    """Timed as the kernel-level suite does (a new TorchOPO per shape, one untimed call, then
    the timed ones), ten shapes in sequence, more than Dynamo's default recompile limit of 8:
    every timed call runs both compiled graphs. (With the limit at 8, the objective's graph
    ran eagerly from the ninth shape on, without an error.) A timed call that would compile
    again raises."""
    ran = []

    def counting(gm, example_inputs):  # a backend that notes each run of a compiled graph
        def run(*args):
            ran.append(1)
            return gm.forward(*args)
        return run

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):
        for k in range(10):
            b, t, v = 6, 5 + k, 40 + k
            gen = torch.Generator().manual_seed(k)
            x = torch.randn(b, t + 1, v, generator=gen).requires_grad_()
            mask = torch.ones(b, t, dtype=torch.long)
            opo = TorchOPO(backend=counting)
            prepared = opo.prepare(torch.randint(0, v, (b, t), generator=gen),
                                   torch.randn(b, t, generator=gen), torch.randn(b, generator=gen),
                                   vocab_size=v, mask=mask, group_size=3)
            torch.autograd.grad(opo(x, prepared, shift=True), x)  # warm-up: compiles
            ran.clear()
            for _ in range(2):
                torch.autograd.grad(opo(x, prepared, shift=True), x)
            assert len(ran) == 4, f"shape {k}: {len(ran)} compiled graph runs in 2 calls"
        if hasattr(torch.compiler, "set_stance"):  # torch >= 2.6
            with pytest.raises(RuntimeError, match="fail_on_recompile"):
                opo(torch.randn(b, t + 2, v), prepared, shift=True)


# ---- log-prob providers: cut-cross-entropy, TRL's head -----------------------------------


def _opo_from(lp, mask, ref, rewards):
    return opo_kernels.opo_loss_from_logprobs(lp, ref, rewards, mask=mask, group_size=3,
                                              vocab_size=50, backend="triton", validate=False)


PEER_CASES = [("cce", torch.bfloat16), ("trl_head", torch.bfloat16),
              # torch's linear_cross_entropy returns its per-token losses in the inputs' dtype:
              # exact from fp32 inputs; from bf16 ones see test_torch_lce_bf16_logprobs
              ("torch_lce", torch.float32)]


@pytest.mark.parametrize("peer,dtype", PEER_CASES, ids=[p for p, _ in PEER_CASES])
def test_peer_logprobs_give_the_reference_loss(peer, dtype):
    if peer == "torch_lce" and peers.unavailable(peer):
        pytest.skip(peers.unavailable(peer))  # an older torch: a version, not an install
    if peers.unavailable(peer):
        pytest.fail(peers.unavailable(peer))  # the bench extra installs them (torch_lce: 2.13)
    hidden, weight, labels, mask, ref, rewards = _problem(seed=1, dtype=dtype)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    counted = mask != 0
    if peer == "cce":
        lp = peers.cce_logprobs(h, w, torch.where(counted, labels, peers.IGNORE_INDEX))
    elif peer == "torch_lce":
        lp = peers.torch_lce_logprobs(h, w, labels, counted)
    else:
        lp = peers.trl_head_logprobs(h, w, labels, counted)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    assert (lp[~counted] == 0).all()
    want_lp = reference.chunked_logprobs((hidden.float() @ weight.float().t()), labels)
    torch.testing.assert_close(lp[counted].detach(), want_lp[counted], **LOGPROB_TOL)

    loss = _opo_from(lp, mask, ref, rewards)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = reference.opo_loss(h2 @ w2.t(), labels, ref, rewards, mask=mask, group_size=3)
    torch.testing.assert_close(loss, want, rtol=2e-3, atol=1e-4)
    for got, exp in zip(_grads(loss, h, w), _grads(want, h2, w2)):
        torch.testing.assert_close(got.float(), exp.float(), **GRAD_TOL)


def test_torch_lce_bf16_logprobs():
    """From bf16 hidden states torch's linear_cross_entropy returns bf16 per-token losses
    (whatever its accumulation dtype): the log-probs are the reference's to within one more
    bf16 rounding, but a log-ratio against fp32 old log-probs then carries that rounding
    (~2^-9 of a log-prob near −4: ~0.01), as large as the ratios of an RL batch. Its OPO loss
    is the loss of those rounded log-probs, not the exact one: the step benchmark shows it
    beside the exact paths (grid.APPROXIMATE)."""
    if peers.unavailable("torch_lce"):
        pytest.skip(peers.unavailable("torch_lce"))  # torch < 2.13
    hidden, weight, labels, mask, ref, rewards = _problem(seed=1)
    counted = mask != 0
    lp = peers.torch_lce_logprobs(hidden, weight, labels, counted)
    assert lp.dtype == torch.bfloat16 and (lp[~counted] == 0).all()
    want_lp = reference.chunked_logprobs((hidden.float() @ weight.float().t()), labels)
    torch.testing.assert_close(lp[counted].float(), want_lp[counted], **LOGPROB_TOL)
    assert (lp[counted].float() - want_lp[counted]).abs().max() > 1e-3  # rounded to bf16
    extra = peers.torch_lce_extra(torch.device("cuda"), torch.bfloat16)
    assert extra["torch_lce_logprob_dtype"] == "bfloat16"
    assert "acc_policy" in extra["torch_lce_auto"]


def test_cce_filter_is_passed_on_cuda_only():
    """cce runs exact (filter_eps=None), cce_filtered at cut-cross-entropy's default "high";
    its torch implementation (CPU) takes no filter."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert peers.cce_kwargs(cuda) == {"impl": "cce", "filter_eps": None}
    assert peers.cce_kwargs(cuda, peers.CCE_DEFAULT_FILTER_EPS) == {"impl": "cce",
                                                                     "filter_eps": "high"}
    assert peers.cce_kwargs(cpu, "high") == {"impl": "torch_compile"}
    # cce_torch_compile: its torch implementation on CUDA too, exact (it has no filter)
    assert peers.cce_kwargs(cuda, None, "torch_compile") == {"impl": "torch_compile"}
    assert peers.cce_extra(cuda, None, "torch_compile")["cce_filter_eps"] == "exact (None)"
    with pytest.raises(ValueError, match="cce_exact"):
        peers.cce_kwargs(cuda, None, "cce_exact")  # not in the 25.1.1 wheel: filter_eps=None
    import inspect

    from cut_cross_entropy import linear_cross_entropy
    default = inspect.signature(linear_cross_entropy).parameters["filter_eps"].default
    assert default == peers.CCE_DEFAULT_FILTER_EPS  # the row is the package's own default
    assert peers.cce_extra(cpu)["cce_filter_eps"] == "exact (None)"
    assert peers.cce_extra(cuda, "high")["cce_filter_eps"].startswith("'high' (its default")


def test_cce_shift_reads_the_next_token():
    """shift=True (the step benchmark's call on the backbone's [B, L, H]): position t is scored
    against targets[t + 1], without a copy of hidden."""
    hidden, weight, labels, mask, _ref, _rewards = _problem(seed=2)
    full = torch.cat([torch.full((6, 1), peers.IGNORE_INDEX),
                      torch.where(mask != 0, labels, peers.IGNORE_INDEX)], 1)  # [B, T+1]
    h = torch.cat([hidden, hidden[:, :1]], 1)  # [B, T+1, H]; the last position is not read
    shifted = peers.cce_logprobs(h, weight, full, shift=True)
    plain = peers.cce_logprobs(hidden, weight, full[:, 1:])
    assert shifted.shape == labels.shape
    torch.testing.assert_close(shifted, plain)


# ---- Liger (GSPO) ----------------------------------------------------------------------------


def _gspo(lp, old, adv, mask, level="sequence"):
    """GSPO (level="sequence": one ratio per sequence, its tokens' mean log-ratio) or GRPO
    (level="token": one ratio per token) with Liger's GRPO normalization (per-sequence token
    mean, then mean over B), beta = 0, the clip of peers.LIGER_GSPO_KWARGS."""
    m = mask.float()
    if level == "sequence":
        coef = (((lp - old) * m).sum(1) / m.sum(1).clamp(min=1)).exp()[:, None]
    else:
        coef = (lp - old).exp()
    clipped = coef.clamp(1 - peers.LIGER_GSPO_KWARGS["eps_low"],
                         1 + peers.LIGER_GSPO_KWARGS["eps_high"])
    per_token = -torch.minimum(coef * adv[:, None], clipped * adv[:, None])
    return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def test_liger_rows_agree_with_gspo_and_grpo():
    if peers.unavailable("liger"):
        pytest.fail(peers.unavailable("liger"))
    hidden, weight, labels, mask, old, rewards = _problem(seed=3)
    adv = rewards  # any per-sequence advantages: raw rewards keep the loss O(1)
    logits = torch.cat([hidden, hidden[:, :1]], 1).float() @ weight.float().t()
    lp = reference.chunked_logprobs(logits[:, :-1], labels)
    want = _gspo(lp, old, adv, mask)

    full = logits.to(torch.bfloat16).requires_grad_()  # [B, T+1, V], as Liger takes them
    got_logits = peers.liger_grpo_logits(full, old, labels, adv, mask, inplace=False)
    torch.testing.assert_close(got_logits, want, rtol=2e-2, atol=1e-4)
    # liger_grpo_token: the same call at token level is GRPO, not GSPO
    got_token = peers.liger_grpo_logits(full, old, labels, adv, mask, inplace=False,
                                        level="token")
    torch.testing.assert_close(got_token, _gspo(lp, old, adv, mask, level="token"),
                               rtol=2e-2, atol=1e-4)
    assert not torch.allclose(got_token, got_logits)  # the two levels differ at this data
    with pytest.raises(ValueError, match="importance_sampling_level"):
        peers.liger_grpo_logits(full, old, labels, adv, mask, level="gspo")

    before = torch.get_float32_matmul_precision()
    # Liger's default chunk (1 sequence) and the tuned one (all B = 6 sequences in one chunk)
    for tf32, chunk in ((False, 1), (True, 1), (True, 6)):
        module = peers.liger_fused_linear_module(chunk)
        assert peers.liger_extra(module)["liger_chunk_size"] == chunk
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        got = peers.liger_fused_linear_gspo(module, h, w, labels, mask, adv, old, tf32=tf32)
        assert torch.get_float32_matmul_precision() == before  # restored after the call
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4)
        gh, gw = _grads(got, h, w)
        assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


def test_group_advantages():
    adv = peers.group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
                               rtol=0, atol=1e-3)


def test_matmul_precision_is_restored_after_an_error():
    before = torch.get_float32_matmul_precision()
    with pytest.raises(RuntimeError, match="boom"):
        with peers.matmul_precision(tf32=before == "highest"):
            assert torch.get_float32_matmul_precision() != before
            raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == before


def test_unavailable_names_the_package_and_rejects_unknown_peers():
    with pytest.raises(ValueError, match="unknown peer"):
        peers.unavailable("quack")
    assert set(peers.versions()) >= {"cut-cross-entropy", "trl", "liger-kernel"}
