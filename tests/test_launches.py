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
"""

import contextlib

import pytest
import torch
from problems import make_problem, on_device
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
    cls = type(KERNELS[0])
    original = cls.run

    def run(kernel, *args, **kwargs):
        counter.launches.append(kernel.fn.__name__)
        counter.in_launch += 1
        try:
            return original(kernel, *args, **kwargs)
        finally:
            counter.in_launch -= 1

    cls.run = run
    try:
        with counter:
            yield counter
    finally:
        cls.run = original


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


# fused-linear, one chunk, validate=False: the same epilogue (1 memset + 1 launch general,
# 2 launches on-policy) around the matmuls. The exact lists, so that an added op shows here.
# N = B·T = 30 rows; V = 50 > N: the backward cuts the vocabulary (one block here), V = 20 < N:
# the rows (linear_chunks.backward_chunks).
# general, V = 50: ticket memset, logits (addmm / mm), autograd seed, logits recomputed, ∂W and
# ∂hidden each ONE matmul written into its output (mm.out), ∂b = Σ rows into its fp32 buffer
# (sum.out; cast to bf16 for bf16); no accumulator.
# general, V = 20: ... the fp32 ∂W (and ∂b) accumulators, logits recomputed, ∂hidden into its
# buffer (mm.out), ∂W += (addmm_; bf16: mm + add_), ∂b += Σ rows, the casts to bf16.
# on-policy (one phase, rows): the same in one loop, then ∂hidden, ∂W, ∂b scaled by the
# upstream gradient (one mul each).
FP32, BF16 = torch.float32, torch.bfloat16
# keyed (on_policy, bias, dtype, V). bf16 on-policy with bias: the accumulation is mm + add_
# (fp32 accumulator, bf16 product); ∂hidden (bf16) is scaled through fp32 (_to_copy, mul,
# _to_copy), while ∂W and ∂b go from their fp32 accumulators to bf16 scaled in ONE op each
# (mul.out), not a mul then a cast
FUSED_LINEAR_OPS = {
    (False, True, FP32, 50): ["zeros", "addmm", "ones_like", "addmm", "mm.out", "mm.out",
                              "sum.IntList_out"],
    (False, False, FP32, 50): ["zeros", "mm", "ones_like", "mm", "mm.out", "mm.out"],
    (False, True, BF16, 50): ["zeros", "addmm", "ones_like", "addmm", "mm.out", "mm.out",
                              "sum.IntList_out", "_to_copy"],
    (False, True, FP32, 20): ["zeros", "addmm", "ones_like", "zeros", "zeros", "addmm",
                              "mm.out", "addmm_", "sum.dim_IntList", "add_.Tensor"],
    (False, False, FP32, 20): ["zeros", "mm", "ones_like", "zeros", "mm", "mm.out", "addmm_"],
    (False, True, BF16, 20): ["zeros", "addmm", "ones_like", "zeros", "zeros", "addmm",
                              "mm.out", "mm", "add_.Tensor", "sum.dim_IntList", "add_.Tensor",
                              "_to_copy", "_to_copy"],
    (True, True, FP32, 50): ["zeros", "zeros", "zeros", "addmm", "mm.out", "addmm_",
                             "sum.dim_IntList", "add_.Tensor", "ones_like", "mul.Tensor",
                             "mul.Tensor", "mul.Tensor"],
    (True, False, FP32, 50): ["zeros", "zeros", "mm", "mm.out", "addmm_", "ones_like",
                              "mul.Tensor", "mul.Tensor"],
    (True, True, BF16, 50): ["zeros", "zeros", "zeros", "addmm", "mm.out", "mm", "add_.Tensor",
                             "sum.dim_IntList", "add_.Tensor", "ones_like", "_to_copy",
                             "mul.Tensor", "_to_copy", "mul.out", "mul.out"],
}


def _fused_linear_id(key):
    on_policy, bias, dtype, vocab = key
    return (f"{'on_policy' if on_policy else 'general'}-{'bias' if bias else 'no-bias'}"
            f"{'-bf16' if dtype == BF16 else ''}-V{vocab}")


@pytest.mark.parametrize("on_policy,bias,dtype,V", list(FUSED_LINEAR_OPS),
                         ids=[_fused_linear_id(k) for k in FUSED_LINEAR_OPS])
def test_fused_linear_one_chunk(on_policy, bias, dtype, V):
    g = torch.Generator().manual_seed(0)
    B, T, H = 6, 5, 8
    tensors = [torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g),
               torch.randn(V, generator=g), torch.randint(0, V, (B, T), generator=g),
               torch.rand(B, T, generator=g) < 0.8, torch.rand(B, generator=g),
               -3 * torch.rand(B, T, generator=g)]
    tensors[:3] = [t.to(dtype) for t in tensors[:3]]
    hidden, weight, b, labels, mask, rewards, ref = on_device(tensors)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)][:3 if bias else 2]

    def step():
        loss = opo_kernels.fused_linear_opo_loss(
            leaves[0], leaves[1], labels, None if on_policy else ref, rewards,
            bias=leaves[2] if bias else None, mask=mask, group_size=3, backend="triton",
            validate=False)
        torch.autograd.grad(loss, leaves)

    step()
    with count_operations() as counter:
        step()
    expected_launches = (["epilogue_kernel", "_opo_fwd_kernel", "epilogue_kernel"] if on_policy
                         else ["_opo_fwd_kernel", "epilogue_kernel", "_opo_bwd_kernel"])
    assert counter.launches == expected_launches
    ops = [op.removeprefix("aten.").removesuffix(".default") for op in counter.ops]
    assert ops == FUSED_LINEAR_OPS[(on_policy, bias, dtype, V)], ops
