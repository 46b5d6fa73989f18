"""grad_to_base=True: logits that are a slice of whole positions of a tensor that requires grad
(``logits[:, :-1]``, ``outputs.logits[:, -(C + 1):-1]``, ``flat[:-1]``) send the gradient
straight to that tensor (row_slice.RowSlice).

- the gradient of the base is bitwise the one autograd's slice backward builds (the kernels'
  gradient of the slice, zeros elsewhere), general and on-policy, copy and in place;
- the slice backward does not run, and the backward allocates no tensor of the base's size
  beyond the gradient itself (none in place); without the option both happen (so the test can
  tell);
- slices it does not cover (of the vocabulary, of a base that does not require grad) take the
  ordinary path, with the same values (a view of a view is a slice of the root base: covered);
- the documented cost: the slice itself is not in the graph, so torch.autograd.grad w.r.t. it
  fails (it works without the option);
- the options where it cannot apply name it.
"""

import contextlib
import gc
import weakref

import pytest
import torch
from problems import on_device
from torch.utils._python_dispatch import TorchDispatchMode

import opo_kernels


class _Ops(TorchDispatchMode):
    """Records (op name, numel of each tensor it returns)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [t.numel() for t in outs if isinstance(t, torch.Tensor)]))
        return out


def _allocations(ops, numel):
    """The ops that allocate a tensor of at least ``numel`` elements."""
    return [name for name, sizes in ops
            if name.startswith(("aten.empty", "aten.zeros", "aten.full", "aten.new_",
                                "aten.slice_backward")) and any(n >= numel for n in sizes)]


def _problem(layout, seed=0, dtype=torch.float32):
    """(base [B, T + 2, V] or [N + 3, V], slice function, labels, ref, rewards, layout).
    padded: rows outside at both ends of each sequence; padded_tail: ``[:, :-2]``, a slice
    from row 0 (the backward kernel is then handed the base itself); packed: ``[:-3]``;
    packed_middle: ``[2:-1]``."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = 4, 6, 11
    rewards = torch.rand(B, generator=g)
    if layout in ("padded", "padded_tail"):
        base = torch.randn(B, T + 2, V, generator=g).to(dtype)
        cut = ((lambda full: full[:, 1:-1]) if layout == "padded"  # noqa: E731
               else (lambda full: full[:, :-2]))
        labels = torch.randint(0, V, (B, T), generator=g)
        ref = -torch.rand(B, T, generator=g)
        lay = {"mask": torch.rand(B, T, generator=g) < 0.8, "group_size": 2}
    else:
        n = 20
        base = torch.randn(n + 3, V, generator=g).to(dtype)
        cut = ((lambda full: full[:-3]) if layout == "packed"  # noqa: E731
               else (lambda full: full[2:-1]))
        labels = torch.randint(0, V, (n,), generator=g)
        ref = -torch.rand(n, generator=g)
        seq = torch.randint(-1, B, (n,), generator=g)
        lay = {"seq_ids": seq, "group_ids": torch.tensor([0, 0, 1, 1])}
    return on_device((base, labels, ref, rewards, lay)) + (cut,)


def _grad(base0, cut, labels, ref, rewards, lay, record=False, **options):
    """(∂loss/∂base, ops recorded during backward) through a non-leaf base (a model output)."""
    leaf = base0.clone().requires_grad_()
    base = leaf * 1.0
    loss = opo_kernels.opo_loss(cut(base), labels, ref, rewards, backend="triton",
                                validate=False, **lay, **options)
    mode = _Ops()
    with mode if record else contextlib.nullcontext():
        (grad,) = torch.autograd.grad(loss * 0.8, leaf)
    return grad, mode.ops


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
@pytest.mark.parametrize("layout", ["padded", "padded_tail", "packed", "packed_middle"])
def test_same_gradient_without_the_slice_backward(layout, on_policy, inplace):
    base0, labels, ref, rewards, lay, cut = _problem(layout, seed=int(on_policy))
    ref = None if on_policy else ref
    want, ops_default = _grad(base0, cut, labels, ref, rewards, lay, record=True,
                              inplace_backward=inplace)
    got, ops = _grad(base0, cut, labels, ref, rewards, lay, record=True, grad_to_base=True,
                     inplace_backward=inplace)
    assert torch.equal(got, want)
    outside = torch.ones(base0.shape[:-1], dtype=torch.bool, device=base0.device)
    cut(outside).fill_(False)
    assert (got[outside] == 0).all()
    names = [name for name, _ in ops]
    assert "aten.slice_backward.default" in [name for name, _ in ops_default]
    assert "aten.slice_backward.default" not in names
    # the kernel that writes the gradient (the backward one; on-policy the forward one) writes
    # the zeros outside the slice too: no fill in backward
    fills = [name for name in names if name.startswith(("aten.zero_", "aten.fill_"))]
    assert not fills, names
    # logits-sized allocations during backward: the base's gradient only (none in place, and
    # none on-policy: the one-pass forward wrote it); by default at least one more, the slice
    # backward's zero-filled base (torch 2.8 makes one per slice of a two-sided cut)
    expected = 0 if inplace or on_policy else 1
    assert len(_allocations(ops, cut(base0).numel())) == expected, ops
    assert len(_allocations(ops_default, cut(base0).numel())) >= expected + 1, ops_default


def test_bf16_in_place_writes_into_the_base():
    base0, labels, ref, rewards, lay, cut = _problem("padded", seed=3, dtype=torch.bfloat16)
    leaf = base0.clone().requires_grad_()
    base = leaf * 1.0
    loss = opo_kernels.opo_loss(cut(base), labels, ref, rewards, backend="triton",
                                grad_to_base=True, inplace_backward=True, **lay)
    (grad_base,) = torch.autograd.grad(loss * 0.8, base)
    assert grad_base.data_ptr() == base.data_ptr()  # the base's own buffer, overwritten
    want, _ = _grad(base0, cut, labels, ref, rewards, lay)
    assert torch.equal(grad_base, want)


@pytest.mark.parametrize("case", ["vocabulary-slice", "base-without-grad", "view-of-a-view"])
def test_other_views_take_the_ordinary_path(case):
    base0, labels, ref, rewards, lay, _ = _problem("padded", seed=5)
    if case == "vocabulary-slice":  # not whole positions: the ordinary path
        base0 = torch.cat([base0, base0[..., :2]], -1)
        cut = lambda full: full[:, 1:-1, :-2]  # noqa: E731
    elif case == "view-of-a-view":  # still a slice of positions of the root base: covered
        cut = lambda full: full.view(full.shape)[:, 1:-1]  # noqa: E731
    if case == "base-without-grad":
        view = base0.clone()[:, 1:-1].requires_grad_()  # a leaf view of a plain tensor
        loss = opo_kernels.opo_loss(view, labels, ref, rewards, backend="triton",
                                    grad_to_base=True, **lay)
        (grad,) = torch.autograd.grad(loss, view)
        loss2 = opo_kernels.opo_loss(view, labels, ref, rewards, backend="triton", **lay)
        assert torch.equal(grad, torch.autograd.grad(loss2, view)[0])
        return
    want, _ = _grad(base0, cut, labels, ref, rewards, lay)
    got, ops = _grad(base0, cut, labels, ref, rewards, lay, record=True, grad_to_base=True)
    assert torch.equal(got, want)
    if case == "vocabulary-slice":
        assert "aten.slice_backward.default" in [name for name, _ in ops]


@pytest.mark.parametrize("layout", ["padded", "packed_middle"])
def test_on_policy_forward_writes_the_zeros_without_a_fill(layout):
    """The one-pass forward allocates the base-shaped gradient and its kernel writes the
    zeros outside the slice: no fill op in the forward either."""
    base0, labels, _, rewards, lay, cut = _problem(layout, seed=4)
    base = base0.clone().requires_grad_() * 1.0
    mode = _Ops()
    with mode:
        opo_kernels.opo_loss(cut(base), labels, None, rewards, backend="triton",
                             validate=False, grad_to_base=True, **lay)
    fills = [name for name, _ in mode.ops if name.startswith(("aten.zero_", "aten.fill_"))]
    assert not fills, mode.ops


@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
def test_a_slice_without_rows_gets_a_zero_base_gradient(on_policy):
    """No row, no kernel launch to write the zeros outside the slice: they are filled instead
    (the gradient starts NaN-filled in the tests, so a missed row shows)."""
    base0, labels, ref, rewards, mask = on_device((
        torch.randn(2, 3, 5), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0),
        torch.randn(2), torch.zeros(2, 0, dtype=torch.bool)))
    leaf = base0.clone().requires_grad_()
    base = leaf * 1.0
    loss = opo_kernels.opo_loss(base[:, :0], labels, None if on_policy else ref, rewards,
                                mask=mask, group_size=2, backend="triton", grad_to_base=True)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(grad, torch.zeros_like(base0))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_logits_do_not_outlive_the_backward(layout):
    """The eager backward reads the forward's slice from ctx; it lets go of it there, as
    autograd lets go of the base it saved, so that a loss kept after backward (for logging)
    does not keep the logits (a model's output) alive. A second backward (retain_graph=True)
    gives the same gradient."""
    base0, labels, ref, rewards, lay, cut = _problem(layout, seed=3)
    leaf = base0.clone().requires_grad_()
    base = leaf * 1.0  # a model's output: the graph itself does not hold it
    loss = opo_kernels.opo_loss(cut(base), labels, ref, rewards, backend="triton",
                                validate=False, grad_to_base=True, **lay)
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (second,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(first, second)
    alive = weakref.ref(base)
    del base
    gc.collect()
    assert alive() is None and loss.grad_fn is not None


def test_the_slice_is_not_in_the_graph():
    """The documented cost of the option: differentiate the base (or the model), not the
    slice."""
    base0, labels, ref, rewards, lay, cut = _problem("padded")
    base = base0.clone().requires_grad_()
    view = cut(base)
    loss = opo_kernels.opo_loss(view, labels, ref, rewards, backend="triton", **lay)
    torch.autograd.grad(loss, view)  # the default keeps autograd's view semantics
    loss = opo_kernels.opo_loss(view, labels, ref, rewards, backend="triton", grad_to_base=True,
                                **lay)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, view)


def test_under_torch_compile_the_ordinary_path():
    base0, labels, ref, rewards, lay, cut = _problem("padded", seed=2)
    want, _ = _grad(base0, cut, labels, ref, rewards, lay)
    leaf = base0.clone().requires_grad_()

    @torch.compile(backend="eager", fullgraph=False)
    def fn(x):
        return opo_kernels.opo_loss(cut(x * 1.0), labels, ref, rewards, backend="triton",
                                    validate=False, grad_to_base=True, **lay)
    (got,) = torch.autograd.grad(fn(leaf) * 0.8, leaf)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_where_it_cannot_apply_it_is_named():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="grad_to_base"):
        opo_kernels.opo_loss_from_logprobs(lp, lp, torch.zeros(2), group_size=2, vocab_size=5,
                                           grad_to_base=True)
    with pytest.raises(ValueError, match="grad_to_base"):
        opo_kernels.fused_linear_opo_loss(torch.zeros(2, 3, 4), torch.zeros(5, 4),
                                          torch.zeros(2, 3, dtype=torch.long), lp, torch.zeros(2),
                                          group_size=2, grad_to_base=True)
    with pytest.raises(TypeError, match="grad_to_base"):
        opo_kernels.opo_loss(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), lp,
                             torch.zeros(2), group_size=2, grad_to_base=1)


@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
def test_inplace_writes_the_whole_base(on_policy):
    """docs/spec.md: with inplace_backward=True the gradient, the base's, is written over the
    whole base: the slice gets its gradient, the last position (outside ``out[:, :-1]``) zeros;
    in the one-pass on-policy mode already in forward."""
    g = torch.Generator().manual_seed(5)
    B, T, V = 2, 4, 8
    w = torch.randn(B, T + 1, V, generator=g)
    labels, rewards = torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g)
    ref = None if on_policy else torch.randn(B, T, generator=g) * 0.2 - 2
    w, labels, rewards, ref = on_device((w, labels, rewards, ref), None)
    leaf = w.clone().requires_grad_()
    exp_loss = opo_kernels.opo_loss(leaf[:, :-1], labels, ref, rewards, group_size=2,
                                    backend="triton")
    (want,) = torch.autograd.grad(exp_loss, leaf)
    src = w.clone().requires_grad_()
    out = src * 1  # a tensor the model made: in place is allowed on it
    loss = opo_kernels.opo_loss(out[:, :-1], labels, ref, rewards, group_size=2,
                                backend="triton", inplace_backward=True, grad_to_base=True)
    last_after_forward = out[:, -1].detach().clone()
    (grad,) = torch.autograd.grad(loss, src)
    assert torch.equal(last_after_forward == 0, torch.full_like(last_after_forward, on_policy,
                                                                dtype=torch.bool))
    assert torch.equal(out[:, -1].detach(), torch.zeros_like(out[:, -1]))
    torch.testing.assert_close(out.detach(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-7)
