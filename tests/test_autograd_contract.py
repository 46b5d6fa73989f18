"""What the fused entry points promise autograd (docs/spec.md, "Autograd"): an in-place write is
visible to autograd's version check; a second differentiation through a kernel-computed
backward raises instead of treating the gradient as a constant; an on-policy call that needs
no gradient writes none (in place or not); fp16 on-policy keeps the small gradient entries a
loss scale protects; logits whose elements share memory are refused for in-place writes."""

import pytest
import torch
from problems import on_device

from opo_kernels import fused_linear_opo_loss, opo_loss, opo_loss_from_logprobs

pytestmark = pytest.mark.cpu_only  # the Triton interpreter on CPU tensors

B, T, V, H = 4, 3, 11, 6


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return on_device({
        "raw": torch.randn(B, T, V, generator=g).to(dtype),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "ref": -torch.rand(B, T, generator=g) * 2,
        "rewards": torch.rand(B, generator=g),
    })


@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
def test_inplace_write_is_seen_by_a_node_that_saved_the_logits(on_policy):
    """tanh saves its output, the logits: once the loss wrote its gradient there, tanh's
    backward must refuse (PyTorch's in-place error), not read the gradient as logits."""
    d = _data()
    raw = d["raw"].clone().requires_grad_()
    logits = torch.tanh(raw)
    version = logits._version
    loss = opo_loss(logits, d["labels"], None if on_policy else d["ref"], d["rewards"],
                    group_size=2, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    assert logits._version > version


def test_inplace_write_through_a_view_is_seen_and_the_view_keeps_its_gradient():
    """On-policy, the one-pass mode writes during forward; autograd is told at backward, so a
    view passed as logits is still found by autograd.grad(loss, view) (telling it in forward
    would rebuild the view's grad_fn) and a node that saved its base still refuses."""
    d = _data()
    raw = d["raw"].clone().requires_grad_()
    view = torch.tanh(raw)[:, :-1]
    loss = opo_loss(view, d["labels"][:, :-1], None, d["rewards"], group_size=2,
                    inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    x = d["raw"].clone().requires_grad_()
    view = (x * 1.0)[:, :-1]  # a view of a non-leaf nobody saved
    loss = opo_loss(view, d["labels"][:, :-1], None, d["rewards"], group_size=2,
                    inplace_backward=True)
    (grad,) = torch.autograd.grad(loss, view)
    y = d["raw"][:, :-1].clone().requires_grad_()
    (expected,) = torch.autograd.grad(opo_loss(y, d["labels"][:, :-1], None, d["rewards"],
                                               group_size=2, backend="torch"), y)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_inplace_write_into_logits_from_a_matmul_still_gives_the_gradient():
    """The common case (the LM head's output, which no node saved) is unaffected."""
    d = _data()
    w = torch.randn(V, H, requires_grad=True, device=d["raw"].device)
    h = torch.randn(B, T, H, device=w.device)
    grads = []
    for inplace in (False, True):
        w.grad = None
        opo_loss(h @ w.T, d["labels"], d["ref"], d["rewards"], group_size=2,
                 inplace_backward=inplace).backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("entry", ["opo_loss", "from_logprobs", "fused_linear"])
def test_create_graph_through_the_fused_backward_raises(entry):
    """A gradient penalty through the loss: the torch backend differentiates twice; the fused
    backward says it cannot, with backward and with autograd.grad (it returned gradients that
    a second differentiation took as constants: silently wrong)."""
    d = _data()
    h = torch.randn(B, T, H, device=d["raw"].device)

    def loss_of(w, backend="auto"):
        logits = torch.tanh(h @ w.T)
        if entry == "fused_linear":
            return fused_linear_opo_loss(torch.tanh(h), w, d["labels"], d["ref"],
                                         d["rewards"], group_size=2, backend=backend)
        if entry == "from_logprobs":
            lp = logits.log_softmax(-1).gather(-1, d["labels"][..., None])[..., 0]
            return opo_loss_from_logprobs(lp, d["ref"], d["rewards"], group_size=2,
                                          vocab_size=V, backend=backend)
        return opo_loss(logits, d["labels"], d["ref"], d["rewards"], group_size=2,
                        backend=backend)

    w = torch.randn(V, H, requires_grad=True, device=h.device)
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        torch.autograd.grad(loss_of(w), w, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        loss_of(w).backward(create_graph=True)
    (g,) = torch.autograd.grad(loss_of(w, backend="torch"), w, create_graph=True)
    torch.autograd.grad(g.square().sum(), w)  # the torch backend: twice differentiable


@pytest.mark.parametrize("how", ["no_grad", "requires_grad_false"])
def test_on_policy_without_a_gradient_writes_none(how):
    """ref_logprobs=None with inplace_backward: a call that cannot backward leaves the logits
    as passed (the one-pass mode would write its gradient over them during forward)."""
    d = _data()
    x = d["raw"].clone().requires_grad_(how == "no_grad")
    before = x.detach().clone()
    with torch.set_grad_enabled(how != "no_grad"):
        loss = opo_loss(x, d["labels"], None, d["rewards"], group_size=2,
                        inplace_backward=True)
    assert torch.equal(x.detach(), before)
    expected = opo_loss(before, d["labels"], None, d["rewards"], group_size=2, backend="torch")
    torch.testing.assert_close(loss, expected)


def test_fp16_on_policy_keeps_what_a_loss_scale_keeps():
    """fp16 logits, ref_logprobs=None, the loss scaled by 2^16 (GradScaler's default): entries
    of ~1e-8 at unit scale are ~1e-3 after the scale and must survive, as in the general mode
    (the one-pass mode stored them at unit scale, below fp16's range: exactly 0)."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(B, T, V, generator=g) * 6).to(torch.float16)
    d = _data()
    ref = logits.float().log_softmax(-1).gather(-1, d["labels"][..., None])[..., 0]
    grads = {}
    for name, ref_logprobs in (("on_policy", None), ("general", ref.detach())):
        x = on_device({"x": logits})["x"].clone().requires_grad_()
        loss = opo_loss(x, d["labels"], ref_logprobs, d["rewards"], group_size=2)
        (grads[name],) = torch.autograd.grad(loss * 65536.0, x)
    truth = grads["general"].float()
    small = (truth.abs() > 1e-3) & (truth.abs() < 1e-1)
    assert small.any()  # the case under test is present
    assert (grads["on_policy"].float()[small] != 0).all()
    torch.testing.assert_close(grads["on_policy"], grads["general"], rtol=2e-3, atol=1e-4)


def test_fp16_fused_linear_on_policy_keeps_what_a_loss_scale_keeps():
    """The same for fused_linear_opo_loss: a token of probability ~2e-9 on every row gives
    weight.grad a row of ~1e-6 under a 2^12 loss scale, which a unit-scale fp16 gradient
    rounds to 0."""
    g = torch.Generator().manual_seed(3)
    hidden = (1 + 0.1 * torch.randn(B, T, H, generator=g)).half()
    weight = 0.3 * torch.randn(V, H, generator=g)
    weight[0] = -2.5  # logit ~ -15 everywhere: p ~ 1e-7 .. 1e-9
    weight = weight.half()
    labels = torch.randint(1, V, (B, T), generator=g)
    d = on_device({"h": hidden, "w": weight, "labels": labels, "rewards": torch.rand(B)})
    ref = (d["h"].float() @ d["w"].float().T).log_softmax(-1)
    ref = ref.gather(-1, d["labels"][..., None])[..., 0]
    rows = {}
    for name, ref_logprobs in (("on_policy", None), ("general", ref)):
        w = d["w"].clone().requires_grad_()
        loss = fused_linear_opo_loss(d["h"], w, d["labels"], ref_logprobs, d["rewards"],
                                     group_size=2)
        (gw,) = torch.autograd.grad(loss * 4096.0, w)
        rows[name] = gw[0].float()
    assert (rows["general"].abs() > 1e-7).all()  # the case under test is present
    torch.testing.assert_close(rows["on_policy"], rows["general"], rtol=2e-3, atol=1e-9)


def test_inplace_refuses_logits_whose_elements_share_memory():
    d = _data()
    row = d["raw"][0, 0].clone().requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward=True writes the gradient over the "
                                         "logits, whose elements share memory"):
        opo_loss(row.expand(B, T, V), d["labels"], d["ref"], d["rewards"], group_size=2,
                 inplace_backward=True)
    # without the in-place write the same logits are fine
    opo_loss(row.expand(B, T, V), d["labels"], d["ref"], d["rewards"],
             group_size=2).backward()
    assert torch.isfinite(row.grad).all()
    # the torch backend never writes in place: it warns and computes
    with pytest.warns(UserWarning, match="inplace_backward=True has no effect"):
        opo_loss(row.expand(B, T, V), d["labels"], d["ref"], d["rewards"], group_size=2,
                 inplace_backward=True, backend="torch")
