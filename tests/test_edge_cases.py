"""Edge cases a new user meets, each with the behaviour docs/spec.md states: an empty batch,
group_size given as a NumPy or 0-dim tensor integer, an out-of-range label with validate=False,
the same error text from both backends, inplace_backward on the torch backend, and the adaptive
τ when each bound of tau_range binds (checked against the reference's unclamped τ)."""

import warnings

import numpy as np
import pytest
import torch
from problems import on_device

from opo_kernels import fused_linear_opo_loss, opo_loss, opo_loss_from_logprobs

BACKENDS = ["torch", "triton"]
B, T, V, H = 4, 3, 7, 5


def _batch(seed=0, B=B):
    g = torch.Generator().manual_seed(seed)
    return on_device({
        "logits": torch.randn(B, T, V, generator=g),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "ref_logprobs": -torch.rand(B, T, generator=g) * 2,
        "rewards": torch.rand(B, generator=g),
    })


def _call(d, **options):
    return opo_loss(d["logits"], d["labels"], d["ref_logprobs"], d["rewards"], **options)


# --------------------------------------------------------------------------------------------
# B = 0: the loss is 0 and every gradient 0 (no counted token at all), on both backends
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    d = _batch(B=0)
    x = d["logits"].requires_grad_()
    loss, metrics = _call(d, group_size=2, backend=backend, return_metrics=True,
                          entropy_coef=0.1)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, T, V)
    # the same metrics as a batch whose sequences are all empty (the reference's values)
    full = _batch()
    _, empty_metrics = _call(full, mask=torch.zeros(B, T, dtype=torch.bool,
                                                    device=full["logits"].device),
                             group_size=2, backend="torch", return_metrics=True,
                             entropy_coef=0.1)
    for key, value in empty_metrics.items():
        assert metrics[key].item() == pytest.approx(value.item()), key

    lp = torch.zeros(0, T, device=x.device, requires_grad=True)
    loss = opo_loss_from_logprobs(lp, d["ref_logprobs"], d["rewards"], group_size=2,
                                  vocab_size=V, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and lp.grad.shape == (0, T)

    hidden = torch.zeros(0, T, H, device=x.device, requires_grad=True)
    weight = torch.randn(V, H, device=x.device, requires_grad=True)
    loss = fused_linear_opo_loss(hidden, weight, d["labels"], d["ref_logprobs"], d["rewards"],
                                 group_size=2, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, T, H)
    assert weight.grad is None or not weight.grad.any()


# --------------------------------------------------------------------------------------------
# group_size: any integer scalar
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [np.int64(2), np.int32(2), torch.tensor(2)],
                         ids=["np.int64", "np.int32", "0-dim-tensor"])
def test_group_size_integer_scalars(size, backend):
    d = _batch()
    assert _call(d, group_size=size, backend=backend).item() == \
        _call(d, group_size=2, backend=backend).item()


# --------------------------------------------------------------------------------------------
# labels outside [0, V): one message for both backends; NaN (not a finite guess) unchecked
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", [V, -100], ids=["V", "-100"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_out_of_range_label_message_is_the_same_on_both_backends(label, layout):
    messages = {}
    for backend in BACKENDS:
        d = _batch()
        d["labels"][1, 2] = label
        options = {"group_size": 2}
        if layout == "packed":
            d = {**d, "logits": d["logits"].reshape(B * T, V),
                 "labels": d["labels"].reshape(-1), "ref_logprobs": d["ref_logprobs"].reshape(-1)}
            options["seq_ids"] = torch.arange(B * T, device=d["logits"].device) // T
        with pytest.raises(ValueError) as exc:
            _call(d, backend=backend, **options)
        messages[backend] = str(exc.value)
    assert messages["torch"] == messages["triton"]
    assert messages["torch"] == f"labels: 1 counted label(s) outside [0, V) (the vocabulary " \
                                f"size V = {V})"


@pytest.mark.parametrize("bad", ["label", "nan_logit"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_bad_input_gives_nan_loss_and_metrics(backend, on_policy, bad):
    """validate=False skips the checks (no host sync): a counted label outside [0, V) has no
    log-prob, nor has a row with a NaN logit, and the loss and every metric are NaN on both
    backends rather than a finite wrong number (the entropy mean included, although a row's
    entropy does not need its label); on-policy too, where the loss's value does not
    depend on the log-probs otherwise (Δ ≡ 0), and where adaptive τ's clamp would turn a NaN
    into a bound."""
    d = _batch()
    if bad == "label":
        d["labels"][0, 1] = V + 3
    else:
        d["logits"][2, 0, 3] = float("nan")
    ref = None if on_policy else d["ref_logprobs"]
    x = d["logits"].clone().requires_grad_()
    loss, metrics = opo_loss(x, d["labels"], ref, d["rewards"], group_size=2, backend=backend,
                             validate=False, return_metrics=True, compute_entropy=True)
    assert torch.isnan(loss)
    assert {k for k, v in metrics.items() if not torch.isnan(v)} == set()
    (grad,) = torch.autograd.grad(loss, x)
    assert not torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------
# inplace_backward: the torch backend cannot write in place and says so
# --------------------------------------------------------------------------------------------


def test_inplace_backward_on_the_torch_backend_warns_and_leaves_logits_alone():
    d = _batch()
    x = d["logits"].clone().requires_grad_()
    with pytest.warns(UserWarning, match="inplace_backward=True has no effect on the torch"):
        loss = _call({**d, "logits": x}, group_size=2, backend="torch", inplace_backward=True)
    loss.backward()
    assert torch.equal(x.detach(), d["logits"]) and x.grad is not None


def test_inplace_backward_on_the_triton_backend_overwrites_what_was_passed():
    """The documented opt-in: backward writes the gradient over the logits passed, a leaf
    included; no warning."""
    d = _batch()
    x = d["logits"].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loss = _call({**d, "logits": x}, group_size=2, backend="triton", inplace_backward=True)
    # ours are UserWarnings (the torch backend's above); Triton 3.6's interpreter also emits a
    # NumPy DeprecationWarning of its own, which is not the caller's business here
    assert not [w for w in seen if issubclass(w.category, UserWarning)], seen
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.data_ptr() == x.data_ptr()  # the gradient is the logits' own memory
    y = d["logits"].clone().requires_grad_()
    (expected,) = torch.autograd.grad(_call({**d, "logits": y}, group_size=2, backend="torch"), y)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# adaptive τ: each bound of tau_range binds, on both backends, at the bound itself
# --------------------------------------------------------------------------------------------


def _unclamped_tau(d) -> float:
    """The reference's adaptive τ with a range wide enough not to bind."""
    _, metrics = _call(d, group_size=2, backend="torch", tau_range=(1e-4, 1e4),
                       return_metrics=True)
    return metrics["tau"].item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bound", ["low", "high"])
def test_adaptive_tau_clamped_at_each_bound(bound, backend):
    d = _batch(seed=3)
    free = _unclamped_tau(d)
    # a bound 10 % past the free τ: it must bind there exactly (a bound moved by 1 % fails)
    tau_range = (free * 1.1, free * 4) if bound == "low" else (free / 4, free * 0.9)
    at = tau_range[0] if bound == "low" else tau_range[1]
    loss, metrics = _call(d, group_size=2, backend=backend, tau_range=tau_range,
                          return_metrics=True)
    assert metrics["tau"].item() == pytest.approx(at, rel=1e-6)
    # and the loss is the loss at that fixed τ (the clamped τ is the one p̃ uses)
    fixed = _call(d, group_size=2, backend="torch", adaptive_tau=False, tau=at)
    assert loss.item() == pytest.approx(fixed.item(), rel=1e-5, abs=1e-7)
    # inside the range nothing binds: the free τ
    _, inside = _call(d, group_size=2, backend=backend, tau_range=(free / 2, free * 2),
                      return_metrics=True)
    assert inside["tau"].item() == pytest.approx(free, rel=1e-5)
