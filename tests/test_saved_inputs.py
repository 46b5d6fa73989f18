"""The data a loss's backward reads again (labels, mask, seq_ids, ref_logprobs), modified in
place between forward and backward: the fused backward would compute another call's gradient
from them, so it raises, naming the argument, as autograd does for the tensors it saves. The
reference backend saves its own copies through autograd and is unaffected."""

import pytest
import torch
from problems import on_device

import opo_kernels

B, T, V = 4, 3, 16


def _inputs(packed: bool):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    ref = torch.randn(B, T, generator=g) * 0.2 - 3
    rewards = torch.randn(B, generator=g)
    layout = {"mask": torch.ones(B, T, dtype=torch.bool)}
    if packed:
        logits, labels, ref = logits.reshape(B * T, V), labels.reshape(-1), ref.reshape(-1)
        layout = {"seq_ids": torch.arange(B).repeat_interleave(T)}
    return on_device((logits, labels, ref, rewards), None), on_device(layout, None)


def _change(name, labels, ref, layout):
    if name == "labels":
        labels.add_(1).remainder_(V)
    elif name == "ref_logprobs":
        ref.add_(0.5)
    elif name == "mask":
        layout["mask"][0, 1] = False
    else:  # seq_ids: a row leaves its sequence
        layout["seq_ids"][0] = -1


CASES = [("padded", m, n) for m in ("general", "on_policy")
         for n in ("labels", "ref_logprobs", "mask")
         if not (m == "on_policy" and n == "ref_logprobs")]
CASES += [("packed", m, n) for m in ("general", "on_policy") for n in ("labels", "seq_ids")]


@pytest.mark.parametrize("layout_name,mode,name", CASES,
                         ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opo_loss(layout_name, mode, name, backend):
    (logits, labels, ref, rewards), layout = _inputs(layout_name == "packed")
    ref = None if mode == "on_policy" else ref

    def forward(x):
        return opo_kernels.opo_loss(x, labels, ref, rewards, group_size=2, backend=backend,
                                    **layout)

    x = logits.clone().requires_grad_()
    (want,) = torch.autograd.grad(forward(x), x)
    loss = forward(x)
    _change(name, labels, ref, layout)
    if backend == "torch":  # autograd saved what it needs
        (got,) = torch.autograd.grad(loss, x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        with pytest.raises(RuntimeError, match=f"opo_loss: {name} was modified by an in-place"):
            torch.autograd.grad(loss, x)


@pytest.mark.parametrize("name", ["ref_logprobs", "mask"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opo_loss_from_logprobs(name, backend):
    (logits, labels, ref, rewards), layout = _inputs(False)
    lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    def forward(x):
        return opo_kernels.opo_loss_from_logprobs(x, ref, rewards, group_size=2, vocab_size=V,
                                                  backend=backend, **layout)

    x = lp.clone().requires_grad_()
    (want,) = torch.autograd.grad(forward(x), x)
    loss = forward(x)
    _change(name, labels, ref, layout)
    if backend == "torch":
        (got,) = torch.autograd.grad(loss, x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        with pytest.raises(RuntimeError, match=f"opo_loss_from_logprobs: {name} was modified"):
            torch.autograd.grad(loss, x)


def test_unchanged_inputs_and_a_second_backward():
    """No false alarm: reading the inputs (or changing other tensors) is fine, and a retained
    graph's second backward still works."""
    (logits, labels, ref, rewards), layout = _inputs(False)
    x = logits.clone().requires_grad_()
    loss = opo_kernels.opo_loss(x, labels, ref, rewards, group_size=2, backend="triton",
                                **layout)
    _ = labels.sum(), ref.clone().add_(1), layout["mask"].float()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_call(compile_backend):
    """Under torch.compile the backward reads copies taken in forward (Inductor may drop the
    copy of an input and save the input itself, which autograd's own check then guards): the
    unchanged gradient, or autograd's in-place error, never another call's gradient."""
    torch._dynamo.reset()
    (logits, labels, ref, rewards), layout = _inputs(False)

    def forward(x, labels):
        return opo_kernels.opo_loss(x, labels, ref, rewards, group_size=2, backend="triton",
                                    validate=False, **layout)

    step = torch.compile(forward, fullgraph=True, backend=compile_backend)
    x = logits.clone().requires_grad_()
    (want,) = torch.autograd.grad(step(x, labels), x)
    loss = step(x, labels)
    labels.add_(1).remainder_(V)
    try:
        (got,) = torch.autograd.grad(loss, x)
    except RuntimeError as err:
        assert "modified by an inplace operation" in str(err)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


LINEAR_CASES = [("padded", n) for n in ("labels", "ref_logprobs", "mask")]
LINEAR_CASES += [("packed", n) for n in ("labels", "ref_logprobs", "seq_ids")]


@pytest.mark.parametrize("layout_name,name", LINEAR_CASES, ids=["-".join(c) for c in LINEAR_CASES])
@pytest.mark.parametrize("dropped", [False, True], ids=["all-counted", "rows-dropped"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
def test_fused_linear(layout_name, name, dropped, on_policy):
    """fused_linear_opo_loss: with every row counted the general backward reads the caller's
    own labels / mask / seq_ids / ref_logprobs, so a change raises naming it; with rows dropped
    it reads copies of the counted rows, and on-policy it only scales gradients formed in
    forward: the forward's gradient either way."""
    if on_policy and name == "ref_logprobs":
        pytest.skip("on-policy calls take no ref_logprobs")
    (_, labels, ref, rewards), layout = _inputs(layout_name == "packed")
    if dropped:  # one row not counted
        if "mask" in layout:
            layout["mask"][1, 2] = False
        else:
            layout["seq_ids"][5] = -1
    g = torch.Generator().manual_seed(1)
    hidden, weight = on_device((torch.randn(*labels.shape, 6, generator=g),
                                torch.randn(V, 6, generator=g)), None)
    ref = None if on_policy else ref

    def forward(h):
        return opo_kernels.fused_linear_opo_loss(h, weight, labels, ref, rewards, group_size=2,
                                                 backend="triton", **layout)

    h = hidden.clone().requires_grad_()
    (want,) = torch.autograd.grad(forward(h), h)
    loss = forward(h)
    _change(name, labels, ref, layout)
    if dropped or on_policy:
        (got,) = torch.autograd.grad(loss, h)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        with pytest.raises(RuntimeError,
                           match=f"fused_linear_opo_loss: {name} was modified by an in-place"):
            torch.autograd.grad(loss, h)
