"""How many device operations one loss call dispatches, forward + backward: at most 8 in the
general mode and 6 in the on-policy mode with validate=False (issue 10), input preparation
included; validate=True may add its one host read. Counted, so nobody silently adds an op:

- torch ops through a TorchDispatchMode, except views and bare allocations (``torch.empty``
  launches nothing) — this includes autograd's ``ones_like`` seed of ``torch.autograd.grad``;
- Triton launches, by wrapping the kernels' ``run``; the torch ops a launch makes inside
  itself (the CPU interpreter copies arguments) are not device operations and are not counted.

The counts are exact today (general: memset of the epilogue's ticket + forward, epilogue,
backward kernels + the autograd seed = 5; on-policy: memset + counts-only epilogue, one-pass
forward, epilogue, scale + seed = 6), and asserted as such as well as against the bounds.
The fused-linear op's operations and matmuls: test_fused_linear_counts.py.
"""

import contextlib

import pytest
import torch
from problems import make_problem
from torch.utils._python_dispatch import TorchDispatchMode

import opo_kernels
import opo_kernels.utils as ok_utils
from opo_kernels import epilogue, from_logprobs, row_kernels

ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_strided.default",
               "aten.empty_like.default", "aten.new_empty.default",
               "aten.new_empty_strided.default"}
KERNELS = (row_kernels._opo_fwd_kernel, row_kernels._opo_bwd_kernel, row_kernels._scale_kernel,
           epilogue.epilogue_kernel, from_logprobs._logprob_grad_kernel)


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.launches, self.in_launch = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_launch and not func.is_view and str(func) not in ALLOCATIONS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_operations():
    """Yields a counter whose .ops (torch ops) and .launches (kernel names) fill up."""
    counter = _Counter()
    # kernel[grid] is every launch: the interpreter of Triton 3.6 and 3.9 runs it through the
    # kernel's run method, 3.4's through a GridExecutor of its own; the class that defines
    # __getitem__ is patched (KernelInterface, or 3.4's InterpretedFunction)
    cls = next(c for c in type(KERNELS[0]).__mro__ if "__getitem__" in c.__dict__)
    original = cls.__getitem__

    def getitem(kernel, grid):
        launch = original(kernel, grid)

        def counted(*args, **kwargs):
            counter.launches.append(kernel.fn.__name__)
            counter.in_launch += 1
            try:
                return launch(*args, **kwargs)
            finally:
                counter.in_launch -= 1
        return counted

    cls.__getitem__ = getitem
    try:
        with counter:
            yield counter
    finally:
        cls.__getitem__ = original


@pytest.fixture(autouse=True)
def no_poison():
    """NaN-poisoned outputs are filled by a torch op of their own: off while counting."""
    ok_utils.POISON_OUTPUTS = False
    yield


def _count(problem, ref, **options):
    x = problem.logits.detach().clone().requires_grad_()

    def step():
        loss = opo_kernels.opo_loss(x, problem.labels, ref, problem.rewards, backend="triton",
                                    **problem.layout, **options)
        torch.autograd.grad(loss, x)

    step()  # warm-up: the hyperparameter tensor is made once per value set and cached
    with count_operations() as counter:
        step()
    return counter


# (B, T, layout, options): shapes; both layouts, each with group sizes AND group ids; options,
# the author's recipe, a caller-given weights tensor, 16-bit logits, rewards / weights in
# another float dtype than the compute dtype (the kernels cast them on load: no op)
CASES = [
    (12, 16, "padded", {}),
    (48, 5, "padded", {"level": "token", "entropy_coef": 0.05}),
    (9, 33, "packed", {"weights": "escort", "center_weights": True}),
    (66, 4, "packed", {"level": "sequence", "coordinates": "log", "compute_entropy": True}),
    (12, 16, "padded", {"inplace_backward": True}),
    (12, 8, "padded-group-ids", {"preset": "author_verl", "adaptive_tau": False}),
    (9, 6, "packed-group-size", {"weights": "tensor-fp64", "rewards": "fp64"}),
    (6, 8, "padded", {"logits": "bf16", "rewards": "bf16", "temperature": 0.7}),
]
IDS = [f"B{b}-T{t}-{lay}-{i}" for i, (b, t, lay, _) in enumerate(CASES)]


def _case(B, T, layout, options):
    """The problem and the options of one CASES row."""
    options = dict(options)
    base, _, groups = layout.partition("-group-")
    dtype = torch.bfloat16 if options.pop("logits", None) == "bf16" else torch.float32
    problem = make_problem(B, T, 50, dtype, base, seed=B + T)
    if groups == "ids":
        problem.layout.pop("group_size")
        problem.layout["group_ids"] = torch.arange(B, device=problem.rewards.device) // 3
    elif groups == "size":
        problem.layout.pop("group_ids")
        problem.layout["group_size"] = 3
    rewards_dtype = {"fp64": torch.float64, "bf16": torch.bfloat16}.get(options.pop("rewards",
                                                                                    None))
    if rewards_dtype is not None:
        problem.rewards = problem.rewards.to(rewards_dtype)
    if options.get("weights") == "tensor-fp64":
        options["weights"] = torch.linspace(-1, 1, B, dtype=torch.float64,
                                            device=problem.rewards.device)
    return problem, options


def _expected_ops(problem, validate):
    """The memset of the epilogue's ticket and autograd's seed; with validate=True on a GPU,
    also the one host read of the error counts (``.tolist()`` of a CUDA tensor is a device to
    host ``_to_copy``; of a CPU tensor it dispatches nothing)."""
    host_read = validate and problem.logits.device.type != "cpu"
    return (["aten.zeros.default"] + (["aten._to_copy.default"] if host_read else [])
            + ["aten.ones_like.default"])


@pytest.mark.parametrize("validate", [False, True], ids=["novalidate", "validate"])
@pytest.mark.parametrize("B,T,layout,options", CASES, ids=IDS)
def test_general_mode(B, T, layout, options, validate):
    problem, options = _case(B, T, layout, options)
    counter = _count(problem, problem.ref_logprobs, validate=validate, **options)
    assert counter.launches == ["_opo_fwd_kernel", "epilogue_kernel", "_opo_bwd_kernel"]
    assert counter.ops == _expected_ops(problem, validate), counter.ops
    total = len(counter.ops) + len(counter.launches)
    assert total <= 8 + (3 if validate else 0), (total, counter.ops, counter.launches)


@pytest.mark.parametrize("validate", [False, True], ids=["novalidate", "validate"])
@pytest.mark.parametrize("B,T,layout,options", CASES, ids=IDS)
def test_on_policy_mode(B, T, layout, options, validate):
    problem, options = _case(B, T, layout, options)  # (author_verl with a fixed τ: one pass)
    counter = _count(problem, None, validate=validate, **options)
    assert counter.launches == ["epilogue_kernel", "_opo_fwd_kernel", "epilogue_kernel",
                                "_scale_kernel"]
    assert counter.ops == _expected_ops(problem, validate), counter.ops
    total = len(counter.ops) + len(counter.launches)
    assert total <= 6 + (3 if validate else 0), (total, counter.ops, counter.launches)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_logprob_api(layout):
    """opo_loss_from_logprobs: the epilogue forward, one gradient kernel backward."""
    problem = make_problem(9, 7, 20, torch.float32, layout, seed=4)
    V = problem.logits.shape[-1]
    lp = torch.log_softmax(problem.logits.nan_to_num().float(), -1).gather(
        -1, problem.labels.clamp(min=0)[..., None])[..., 0].detach().requires_grad_()

    def step():
        loss = opo_kernels.opo_loss_from_logprobs(lp, problem.ref_logprobs, problem.rewards,
                                                  vocab_size=V, backend="triton",
                                                  validate=False, **problem.layout)
        torch.autograd.grad(loss, lp)

    step()
    with count_operations() as counter:
        step()
    assert counter.launches == ["epilogue_kernel", "_logprob_grad_kernel"]
    assert counter.ops == ["aten.zeros.default", "aten.ones_like.default"], counter.ops
