"""The remembered Triton variants of opo_kernels/launches.py on a GPU (``-m gpu``): a repeated
call of one signature launches the compiled kernels directly (Triton's binder skipped), and
computes bit for bit what Triton's own launch path computes, also when the alignment of an
input changes between calls (another variant). Without CUDA these are skipped: the CPU suite
checks the cache's logic with a stand-in compiled kernel (tests/test_host_path.py)."""

import pytest
import torch
from problems import make_problem

import opo_kernels
from opo_kernels import launches

pytestmark = pytest.mark.gpu


@pytest.fixture
def direct_count(monkeypatch):
    """How many launches went straight to a compiled kernel."""
    from triton.compiler.compiler import CompiledKernel

    count = [0]
    original = CompiledKernel.__getitem__

    def counted(self, grid):
        count[0] += 1
        return original(self, grid)
    monkeypatch.setattr(CompiledKernel, "__getitem__", counted)
    return count


def _step(p, logits, on_policy, **options):
    x = logits.detach().clone().requires_grad_()
    loss, metrics = opo_kernels.opo_loss(x, p.labels, None if on_policy else p.ref_logprobs,
                                         p.rewards, return_metrics=True, backend="triton",
                                         compute_entropy=True, **p.layout, **options)
    grad = torch.autograd.grad(loss * 0.7, x)[0]
    return loss, torch.stack(list(metrics.values())), grad


@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_direct_launches_compute_what_triton_s_path_computes(layout, on_policy, direct_count,
                                                              monkeypatch):
    assert launches.ENABLED, "the launch cache is off (Triton version or environment)"
    p = make_problem(6, 40, 1000, torch.bfloat16, layout, seed=1)
    options = dict(alpha=0.5, validate=False)
    first = _step(p, p.logits, on_policy, **options)
    before = direct_count[0]
    second = _step(p, p.logits, on_policy, **options)
    assert direct_count[0] > before  # the second call of the signature skipped the binder
    assert launches.ENABLED  # and no direct launch was refused (launches._turn_off)
    monkeypatch.setattr(launches, "ENABLED", False)
    plain = _step(p, p.logits, on_policy, **options)
    for a, b, c in zip(first, second, plain):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_another_alignment_gets_its_own_variant(direct_count, monkeypatch):
    p = make_problem(3, 17, 1000, torch.bfloat16, "packed", seed=2)
    n, v = p.logits.shape

    def step(offset):  # logits at `offset` elements into a buffer: 16-byte aligned or not
        buf = torch.zeros(n * v + 1, dtype=p.logits.dtype, device=p.logits.device)
        buf[offset:offset + n * v].view(n, v).copy_(p.logits)
        buf.requires_grad_()
        logits = buf[offset:offset + n * v].view(n, v)
        assert (logits.data_ptr() % 16 == 0) == (offset == 0)
        loss = opo_kernels.opo_loss(logits, p.labels, p.ref_logprobs, p.rewards,
                                    backend="triton", **p.layout)
        grad = torch.autograd.grad(loss, buf)[0][offset:offset + n * v].view(n, v)
        return loss, grad

    results = [step(offset) for offset in (0, 1, 0, 1)]
    assert direct_count[0] > 0 and launches.ENABLED
    monkeypatch.setattr(launches, "ENABLED", False)
    for offset in (0, 1):
        plain = step(offset)
        for result in results[offset::2]:
            assert torch.equal(result[0], plain[0]) and torch.equal(result[1], plain[1])
