"""Forward + backward of one loss call captured in a CUDA graph and replayed (GPU only; run
with ``TRITON_INTERPRET=0 python -m pytest -m gpu``). With validate=False a call makes no host
sync and allocates nothing it must copy from the host after its first (warm-up) call, so it is
capturable; the replays must give the eager results on new input values, bit for bit (the
kernels are deterministic), in the general and the on-policy mode.
"""

import pytest
import torch

import opo_kernels

pytestmark = pytest.mark.gpu


def _inputs(seed, B=12, T=40, V=1000, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(B, T, V, device="cuda", generator=g).to(dtype)
    labels = torch.randint(0, V, (B, T), device="cuda", generator=g)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
    ref = ref + 0.05 * torch.randn(B, T, device="cuda", generator=g)
    rewards = torch.rand(B, device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) < 0.8
    return logits, labels, ref, rewards, mask


@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
def test_capture_and_replay(on_policy):
    static = [t.clone() for t in _inputs(0)]
    logits = static[0].requires_grad_()

    def step():
        labels, ref, rewards, mask = static[1:]
        loss = opo_kernels.opo_loss(logits, labels, None if on_policy else ref, rewards,
                                    mask=mask, group_size=6, validate=False, entropy_coef=0.01)
        (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture (compiles, caches parameters)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_out, grad_out = step()

    for seed in (1, 2):
        fresh = _inputs(seed)
        with torch.no_grad():
            for dst, src in zip(static, fresh):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        eager_loss, eager_grad = step()
        assert torch.equal(loss_out, eager_loss), (loss_out.item(), eager_loss.item())
        assert torch.equal(grad_out, eager_grad)
