"""validate="deferred" (opo_kernels/validation.py): the value checks of a call are read without
a host stall — at the call's backward when they are ready (on the CPU always), else at the next
validating call, or at check_deferred() — and the error names the failing call. The values
computed are those of validate=True."""

import pytest
import torch
from problems import make_problem

import opo_kernels
from opo_kernels import validation


def _args(problem):
    return dict(problem.layout, backend="triton")


def _bad_labels(problem):
    labels = problem.labels.clone()
    labels[0, 0] = problem.logits.shape[-1] + 3  # position 0 of every sequence is counted
    return labels


@pytest.fixture(autouse=True)
def _nothing_pending():
    validation._PENDING.clear()
    yield
    validation._PENDING.clear()


def _problem(layout="padded"):
    return make_problem(3, 5, 11, torch.float32, layout, seed=2)


@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_same_values_as_validate_true(layout, on_policy):
    p = _problem(layout)
    ref = None if on_policy else p.ref_logprobs
    results = []
    for validate in (True, "deferred"):
        x = p.leaf()
        loss, metrics = opo_kernels.opo_loss(x, p.labels, ref, p.rewards, validate=validate,
                                             return_metrics=True, **_args(p))
        results.append((loss, metrics, torch.autograd.grad(loss, x)[0]))
    (loss_t, metrics_t, grad_t), (loss_d, metrics_d, grad_d) = results
    assert torch.equal(loss_t, loss_d) and torch.equal(grad_t, grad_d)
    assert all(torch.equal(metrics_t[k], metrics_d[k]) for k in metrics_t)
    assert not validation._PENDING  # read at backward


@pytest.mark.parametrize("on_policy", [False, True], ids=["general", "on_policy"])
def test_backward_of_the_failing_call_raises(on_policy):
    p = _problem()
    x = p.leaf()
    loss = opo_kernels.opo_loss(x, _bad_labels(p), None if on_policy else p.ref_logprobs,
                                p.rewards, validate="deferred", **_args(p))  # no raise here
    call = validation._PENDING[-1].call
    with pytest.raises(ValueError, match=rf"validate='deferred': the value checks of call "
                                         rf"{call} \(logits \[3, 5, 11\] float32\) found bad "
                                         rf"input: labels: 1 counted label"):
        loss.backward()
    assert not validation._PENDING


def test_the_next_call_raises_when_the_failing_call_had_no_backward():
    p = _problem()
    opo_kernels.opo_loss(p.logits, _bad_labels(p), p.ref_logprobs, p.rewards,
                         validate="deferred", **_args(p))
    call = validation._PENDING[-1].call
    with pytest.raises(ValueError, match=f"checks of call {call} .*labels: 1 counted"):
        opo_kernels.opo_loss(p.logits, p.labels, p.ref_logprobs, p.rewards,
                             validate="deferred", **_args(p))
    # raised once: the good call after it goes through
    opo_kernels.opo_loss(p.logits, p.labels, p.ref_logprobs, p.rewards, validate="deferred",
                         **_args(p))
    validation.check_deferred()


def test_backward_never_waits_when_the_copy_is_not_done(monkeypatch):
    # a CUDA copy still in flight: backward leaves it, the next call reads it (and waits)
    p = _problem()
    monkeypatch.setattr(validation.Deferred, "ready", lambda self: False)
    x = p.leaf()
    loss = opo_kernels.opo_loss(x, _bad_labels(p), p.ref_logprobs, p.rewards,
                                validate="deferred", **_args(p))
    loss.backward()
    assert len(validation._PENDING) == 1
    with pytest.raises(ValueError, match="labels: 1 counted"):
        opo_kernels.opo_loss(p.logits, p.labels, p.ref_logprobs, p.rewards, validate=True,
                             **_args(p))


def test_check_deferred_reads_what_is_left():
    p = _problem("packed")
    layout = dict(_args(p), seq_ids=p.layout["seq_ids"].clone())
    layout["seq_ids"][0] = 7  # outside [-1, B)
    opo_kernels.opo_loss(p.logits, p.labels, p.ref_logprobs, p.rewards, validate="deferred",
                         **layout)
    rows = p.logits.shape[0]
    with pytest.raises(ValueError, match=rf"\(logits \[{rows}, 11\] float32\).*seq_ids: 1"):
        opo_kernels.check_deferred()
    validation.check_deferred()  # nothing left


def test_from_logprobs_defers_too():
    p = _problem()
    logprobs = p.ref_logprobs.clone()  # log-probs of the right shape, finite where counted
    logprobs[0, 0] = float("nan")
    logprobs.requires_grad_()
    loss = opo_kernels.opo_loss_from_logprobs(logprobs, p.ref_logprobs, p.rewards,
                                              vocab_size=11, validate="deferred", **_args(p))
    with pytest.raises(ValueError, match=r"\(logprobs \[3, 5\] float32\).*logprobs: 1"):
        loss.backward()


@pytest.mark.parametrize("value", [1, "later", None])
def test_other_validate_values_are_refused(value):
    with pytest.raises(TypeError, match="validate must be True, False or 'deferred'"):
        opo_kernels.OPOLossConfig(validate=value)


def _bad_deferred_call_left_pending(p):
    """A deferred call whose bad input is not read at its backward (there is none)."""
    with torch.no_grad():
        opo_kernels.opo_loss(p.logits, _bad_labels(p), p.ref_logprobs, p.rewards,
                             validate="deferred", **_args(p))
    return validation._PENDING[-1].call


@pytest.mark.parametrize("path", ["torch_backend", "from_logprobs_torch", "fused_linear"])
def test_every_validating_path_reads_what_is_pending(path):
    """Not only the fused logits path: a validating call on the torch backend, the log-prob
    API or the fused-linear head raises an earlier deferred call's error first, unchanged."""
    p = _problem()
    call = _bad_deferred_call_left_pending(p)
    with pytest.raises(ValueError, match=rf"^validate='deferred': the value checks of call "
                                         rf"{call} .*labels: 1 counted label.*size V = 11\)$"):
        if path == "torch_backend":
            opo_kernels.opo_loss(p.logits, p.labels, p.ref_logprobs, p.rewards,
                                 **dict(p.layout, backend="torch"))
        elif path == "from_logprobs_torch":
            opo_kernels.opo_loss_from_logprobs(p.ref_logprobs, p.ref_logprobs, p.rewards,
                                               **dict(p.layout, backend="torch"))
        else:
            device = p.labels.device
            hidden, weight = torch.randn(3, 5, 4, device=device), torch.randn(11, 4, device=device)
            opo_kernels.fused_linear_opo_loss(hidden, weight, p.labels, p.ref_logprobs,
                                              p.rewards, **_args(p))
    assert not validation._PENDING
    # validate=False reads nothing
    _bad_deferred_call_left_pending(p)
    opo_kernels.opo_loss(p.logits, p.labels, p.ref_logprobs, p.rewards, validate=False,
                         **dict(p.layout, backend="torch"))
    assert len(validation._PENDING) == 1
