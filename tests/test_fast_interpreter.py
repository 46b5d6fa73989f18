"""tests/fast_interpreter.py changes the interpreter's bookkeeping, not what the kernels compute:
the same loss, metrics and gradient, bitwise, with Triton's own patching at every nested call."""

import pytest
import torch
from problems import make_problem

import opo_kernels
import opo_kernels.utils as ok_utils

pytestmark = pytest.mark.cpu_only


def _call(problem, labels, ref, rewards):
    x = problem.logits.detach().clone().requires_grad_()
    loss, metrics = opo_kernels.opo_loss(x, labels, ref, rewards, backend="triton",
                                         entropy_coef=0.05, return_metrics=True,
                                         **problem.layout)
    loss.backward()
    return loss, metrics, x.grad


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_same_results_as_triton_patching(layout, monkeypatch):
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_LangPatchScope"):
        pytest.skip("this Triton's interpreter has no _LangPatchScope (Triton 3.4): "
                    "fast_interpreter.install() leaves it as it is")
    assert ok_utils.interpreter_on()
    fast = interpreter._patch_lang
    assert getattr(fast, "opo_fast", False), "conftest.py did not install fast_interpreter"
    problem = make_problem(6, 5, 37, torch.float32, layout, seed=2)
    labels, ref, rewards = problem.args()
    calls = []
    monkeypatch.setattr(interpreter, "_patch_lang",
                        lambda fn: calls.append(fn) or fast.original(fn))
    slow = _call(problem, labels, ref, rewards)
    assert len(calls) > 10  # helpers were patched one by one: Triton's own path ran
    monkeypatch.setattr(interpreter, "_patch_lang", fast)
    loss, metrics, grad = _call(problem, labels, ref, rewards)
    assert torch.equal(loss, slow[0]) and torch.equal(grad, slow[2])
    assert metrics.keys() == slow[1].keys()
    for name, value in metrics.items():
        assert torch.equal(value, slow[1][name]), name
