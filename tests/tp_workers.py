"""The ranks of the vocabulary-parallel tests (tests/test_tensor_parallel.py): each spawned
process joins a gloo group, slices the vocabulary, and checks its loss, metrics and gradient
slice against the single-process result on the whole vocabulary, computed in the same process.
An AssertionError in a rank fails the test (torch.multiprocessing re-raises it)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

os.environ.setdefault("TRITON_INTERPRET", "1")

import fast_interpreter  # noqa: E402

fast_interpreter.install()  # (a spawned rank skips conftest.py)


def bounds(world: int, V: int, uneven: bool):
    """Slice boundaries [0, ..., V] by rank: equal slices, or uneven ones."""
    if not uneven:
        assert V % world == 0
        return [r * V // world for r in range(world + 1)]
    cuts = sorted({(r * V) // world + (r % 2) for r in range(1, world)})
    return [0, *cuts, V]


def _close(actual, expected, rtol, atol, what):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    assert torch.isfinite(actual).all(), f"{what}: non-finite"
    assert (err <= bound).all(), f"{what}: max err {err.max().item():.3e}"


def _compare(rank, world, problem, uneven, **options):
    import opo_kernels

    V = problem.logits.shape[-1]
    edges = bounds(world, V, uneven)
    lo, hi = edges[rank], edges[rank + 1]
    full = problem.leaf()
    loss, metrics = opo_kernels.opo_loss(full, *problem.args(), backend="triton",
                                         return_metrics=True, **problem.layout, **options)
    (grad,) = torch.autograd.grad(loss * 1.3, full)
    x = problem.leaf()
    local = x[..., lo:hi]
    loss2, metrics2 = opo_kernels.opo_loss(
        local, *problem.args(), backend="triton", return_metrics=True,
        process_group=dist.group.WORLD, vocab_start=lo if uneven else None,
        **problem.layout, **options)
    (grad2,) = torch.autograd.grad(loss2 * 1.3, local)
    # validate=False: the layout checked above is reused, no gather; the second call spells
    # rank 0's vocab_start out (0), the same layout: no rank may gather alone
    for spelled in (False, True):
        loss3 = opo_kernels.opo_loss(  # (a fresh leaf: in place, x now holds a gradient)
            problem.leaf()[..., lo:hi], *problem.args(), backend="triton", validate=False,
            process_group=dist.group.WORLD,
            vocab_start=lo if uneven or (spelled and rank == 0) else None,
            **problem.layout, **options)
        assert torch.equal(loss3, loss2.detach()), (rank, loss3, loss2)
    _close(loss2, loss, 2e-6, 2e-7, f"rank {rank} loss {options}")
    assert set(metrics2) == set(metrics)
    for k in metrics:
        _close(metrics2[k], metrics[k], 2e-6, 2e-7, f"rank {rank} metric {k}")
    expected = grad[..., lo:hi]
    counted = (problem.layout["mask"] != 0 if "mask" in problem.layout
               else problem.layout["seq_ids"] >= 0)
    _close(grad2[counted], expected[counted], 1e-5, 1e-7 * expected.abs().max().item(),
           f"rank {rank} grad {options}")
    assert (grad2[~counted] == 0).all()


def logits_cases(rank, world, port, cases, backend="gloo"):
    """cases: list of (layout, uneven, options); backend "nccl": rank r on GPU r."""
    from problems import make_problem

    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        for i, (layout, uneven, options) in enumerate(cases):
            options = dict(options)
            temperature = options.get("temperature", 1.0)
            V = 12 if not uneven else 13
            problem = make_problem(9, 5, V, torch.float32, layout, seed=10 + i,
                                   temperature=temperature, device=device)
            shift = options.pop("masked_last_slice", None)
            if shift is not None:
                problem = _mask_last_slice(problem, bounds(world, V, uneven)[-2], shift,
                                           temperature)
            if options.pop("uncounted_differ", False) and rank == 1:
                # what the loss never reads may differ between ranks (validate=True agrees)
                counted = problem.labels >= 0
                problem.labels = problem.labels.masked_fill(~counted, 0)
                problem.ref_logprobs = problem.ref_logprobs.masked_fill(~counted, 123.0)
            mask_dtypes = options.pop("mask_dtypes", None)
            if mask_dtypes:  # each rank its own mask dtype, the same 0/1 values
                problem.layout["mask"] = problem.layout["mask"].to(mask_dtypes[rank])
            if options.pop("on_policy", False):
                problem.ref_logprobs = None
            chunk_bytes = options.pop("chunk_bytes", None)
            if options.get("vocab_parallel_one_pass"):
                _compare_one_pass(rank, world, problem, uneven, chunk_bytes, **options)
            else:
                _compare(rank, world, problem, uneven, **options)
    finally:
        dist.destroy_process_group()


def _mask_last_slice(problem, last_start: int, shift: float, temperature: float):
    """The problem with its logits moved by ``shift`` and the last rank's whole slice at −inf
    (a masked vocabulary: valid input), the labels in the other slices and the reference
    log-probs recomputed for them."""
    from problems import Problem, true_logprobs

    logits = problem.logits + shift
    logits[..., last_start:] = float("-inf")
    counted = problem.labels >= 0
    labels = torch.where(counted, problem.labels % last_start, problem.labels)
    V = logits.shape[-1]
    lp = true_logprobs(logits.reshape(-1, V).nan_to_num(nan=0.0), labels.reshape(-1),
                       temperature).view(labels.shape)
    ref = torch.where(counted, lp + 0.1, float("nan")).float()
    return Problem(logits, labels, ref, problem.rewards, problem.layout)


def _compare_one_pass(rank, world, problem, uneven, chunk_bytes, **options):
    """``_compare`` in the on-policy one-pass mode, with the chunk budget set to
    ``chunk_bytes`` (tiny slices: a few rows per chunk, so that the chunks split sequences or
    hold several), checking that the mode ran, chunk by chunk: one combine per piece of
    ``vocab_parallel.row_pieces``, and more than one piece."""
    from opo_kernels import tp_combine, vocab_parallel

    saved = vocab_parallel._ONE_PASS_CHUNK_BYTES, tp_combine.combine_partials
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("row_start", 0))
        return saved[1](*args, **kwargs)

    vocab_parallel._ONE_PASS_CHUNK_BYTES, tp_combine.combine_partials = chunk_bytes, counting
    try:
        _compare(rank, world, problem, uneven, **options)
        V = problem.logits.shape[-1]
        rows = vocab_parallel.one_pass_chunk_rows(V, world, problem.logits.element_size())
    finally:
        vocab_parallel._ONE_PASS_CHUNK_BYTES, tp_combine.combine_partials = saved
    starts = [start for _, start in vocab_parallel.row_pieces(problem.logits, rows)]
    assert len(starts) > 1, (rows, starts)
    assert calls == starts * 3, (calls, starts)  # _compare's three calls


def fused_linear_case(rank, world, port, layout, options=None):
    """One ``_fused_linear_compare`` case in its own process group."""
    fused_linear_cases(rank, world, port, [(layout, options)])


def fused_linear_cases(rank, world, port, cases):
    """``_fused_linear_compare`` for each (layout, options) of cases, on one process group
    (a rank's start-up is most of a case's time)."""
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        for layout, options in cases:
            _fused_linear_compare(rank, world, layout, options)
    finally:
        dist.destroy_process_group()


def _fused_linear_compare(rank, world, layout, options=None):
    """fused_linear_opo_loss with a [V_local, H] weight slice (uneven slices, bias), the hidden
    gradient all-reduced by the op (default) or left to the caller (reduce_hidden_grad=False:
    the ranks' parts sum to the single-process gradient). The hidden states of the rows not
    counted are NaN (never read: every result stays finite, their gradient is 0). options:
    extra loss options (logits_budget among them), and on_policy=True for
    ref_logprobs=None, chunk_bytes=K for the default chunk size with linear_plan's budget
    set to K bytes (and no minimum), so that the tiny uneven slices round to different row
    counts when a rank sizes its chunks from its own slice, vocab=V for another vocabulary
    than 19 (< the 24 counted rows: the backward cuts the rows; a V whose slices exceed them
    makes it cut each slice's vocabulary into blocks). The matmul work of the rank's call is
    counted: 4 − K/M (3 on-policy) products of the M counted rows by its slice."""
    options = dict(options or {})
    on_policy = options.pop("on_policy", False)
    chunk_bytes = options.pop("chunk_bytes", None)
    V = options.pop("vocab", 19)
    from opo_kernels import linear_plan

    saved = linear_plan._CHUNK_BYTES, linear_plan._MIN_CHUNK
    if chunk_bytes is not None:
        linear_plan._CHUNK_BYTES, linear_plan._MIN_CHUNK = chunk_bytes, 1
        options["chunk_size"] = None
    try:
        _fused_linear_compare_body(rank, world, layout, on_policy, V, options)
    finally:
        linear_plan._CHUNK_BYTES, linear_plan._MIN_CHUNK = saved


def _fused_linear_compare_body(rank, world, layout, on_policy, V, options):
    from test_fused_linear_counts import MatmulCounter

    import opo_kernels
    from opo_kernels.linear_plan import plan_chunks

    g = torch.Generator().manual_seed(7)
    B, T, H = 6, 5, 8
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).float()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).float()
    bias = torch.randn(V, generator=g, dtype=torch.float64).float() * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    rewards = torch.rand(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, labels[..., None])
    ref = lp[..., 0] + 0.05 * torch.randn(B, T, generator=g)
    hidden[~mask] = float("nan")  # rows not counted: never read
    kwargs = dict(mask=mask, group_size=3, chunk_size=7, entropy_coef=0.02,
                  return_metrics=True, backend="triton")
    kwargs.update(options)
    if layout == "packed":
        kwargs.pop("mask")
        hidden, labels, ref = hidden.view(-1, H), labels.view(-1), ref.view(-1)
        kwargs["seq_ids"] = torch.where(mask.view(-1), torch.arange(B * T) // T, -1)
    if on_policy:
        ref = None
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = opo_kernels.fused_linear_opo_loss(params[0], params[1], labels, ref,
                                                      rewards, bias=params[2], **kwargs)
    grads = torch.autograd.grad(loss, params)
    edges = bounds(world, V, uneven=True)
    lo, hi = edges[rank], edges[rank + 1]
    widest = max(b - a for a, b in zip(edges, edges[1:]))  # the plan's V, on every rank
    counted = int(mask.sum())
    plan = plan_chunks(counted, widest, torch.float32, kwargs.get("chunk_size"),
                       kwargs.get("logits_budget"), on_policy, True)
    # no rank's logits above the budget plus one chunk (on-policy: the larger of the two)
    budget = kwargs.get("logits_budget")
    if budget is not None:
        chunk_bytes = plan.chunk_rows * (hi - lo) * 4
        bound = max(budget, chunk_bytes) if on_policy else budget + chunk_bytes
    for reduce in (True, False):
        h = hidden.clone().requires_grad_()
        w = weight[lo:hi].clone().requires_grad_()
        b = bias[lo:hi].clone().requires_grad_()
        with MatmulCounter() as counter:
            loss2, metrics2 = opo_kernels.fused_linear_opo_loss(
                h, w, labels, ref, rewards, bias=b, process_group=dist.group.WORLD,
                vocab_start=lo, reduce_hidden_grad=reduce, **kwargs)
            gh, gw, gb = torch.autograd.grad(loss2, (h, w, b))
        expected = 3.0 if on_policy else 4.0 - plan.held_rows / counted
        units = counter.units(counted, H, hi - lo)
        assert abs(units - expected) < 1e-12, (rank, units, expected, counter.products)
        if budget is not None:
            # the products' left operands of V_local columns are the logits (or their gradient)
            largest = max((m * n * 4 for m, _, n in counter.products if n == hi - lo),
                          default=0)
            held = plan.held_rows * (hi - lo) * 4
            assert held <= budget and largest <= bound, (rank, held, largest, budget, bound)
        _close(loss2, loss, 2e-6, 2e-7, "fused-linear loss")
        for k in metrics:
            _close(metrics2[k], metrics[k], 2e-6, 2e-7, f"fused-linear metric {k}")
        scale = grads[0].abs().max().item()
        if not reduce:
            dist.all_reduce(gh)  # what the caller's column-parallel layer does
        _close(gh, grads[0], 1e-5, 1e-7 * scale, f"hidden grad (reduce={reduce})")
        assert (gh[~mask.view(gh.shape[:-1])] == 0).all(), "rows not counted: zero gradient"
        _close(gw, grads[1][lo:hi], 1e-5, 1e-7 * grads[1].abs().max().item(), "weight grad")
        _close(gb, grads[2][lo:hi], 1e-5, 1e-7 * grads[2].abs().max().item(), "bias grad")


def operation_counts(rank, world, port, layout):
    """The device operations of one vocabulary-parallel call, forward + backward, with
    validate=False (counted as tests/test_launches.py counts the single-process modes):
    general mode, the collective once per call; on-policy one-pass mode, once per chunk."""
    import test_launches
    from problems import make_problem

    import opo_kernels
    from opo_kernels import utils, vocab_parallel

    utils.POISON_OUTPUTS = False  # (a poisoned output is a torch op of its own)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        problem = make_problem(6, 4, 8, torch.float32, layout, seed=2)
        V = problem.logits.shape[-1]
        lo, hi = rank * V // world, (rank + 1) * V // world
        vocab_parallel._ONE_PASS_CHUNK_BYTES = 4 * (V // world) * 5  # 5 rows per chunk
        for ref, one_pass in ((problem.ref_logprobs, False), (None, True)):
            x = problem.leaf()[..., lo:hi].detach().requires_grad_()  # the rank's slice

            def step(validate, x=x, ref=ref, one_pass=one_pass):
                loss = opo_kernels.opo_loss(
                    x, problem.labels, ref, problem.rewards, backend="triton",
                    process_group=dist.group.WORLD, validate=validate,
                    vocab_parallel_one_pass=one_pass, **problem.layout)
                torch.autograd.grad(loss, x)

            step(True)  # the layout's first call gathers the checks
            with test_launches.count_operations() as counter:
                step(False)
            collectives = [op for op in counter.ops if op.startswith("c10d.")]
            others = [op for op in counter.ops if not op.startswith("c10d.")]
            if not one_pass:
                assert counter.launches == ["_opo_fwd_kernel", "_combine_kernel",
                                            "epilogue_kernel", "_opo_bwd_kernel"], counter.launches
                assert len(collectives) == 1, collectives
                assert others == ["aten.zeros.default", "aten.ones_like.default"], others
            else:
                # packed: ⌈N / 5⌉ chunks; padded (T = 4): one whole sequence per chunk
                pieces = -(-problem.labels.numel() // 5) if layout == "packed" else 6
                chunk = ["_opo_fwd_kernel", "_combine_kernel", "_opo_bwd_kernel"]
                assert counter.launches == ["epilogue_kernel", *chunk * pieces,
                                            "epilogue_kernel", "_scale_kernel"], counter.launches
                assert len(collectives) == pieces, collectives
                assert others == ["aten.zeros.default", "aten.ones.default",
                                  "aten.ones_like.default"], others
    finally:
        dist.destroy_process_group()


def not_a_member(rank, world, port):
    """A group of ranks [0, 1] of 3: rank 2 calls with it and gets a ValueError saying it is
    not a member (locally: it has no collective to share it with), from the functions and the
    module forms; an object that is no ProcessGroup is a TypeError on both forms."""
    import pytest
    from problems import make_problem

    import opo_kernels

    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        group = dist.new_group([0, 1])  # (collective: every rank creates it)
        if rank != 2:
            return
        problem = make_problem(2, 3, 8, torch.float32, "padded", seed=1)
        labels, ref, rewards = problem.args()
        hidden, weight = torch.randn(2, 3, 4), torch.randn(4, 4)
        calls = {
            "opo_loss": lambda g: opo_kernels.opo_loss(
                problem.logits[..., :4], labels, ref, rewards, process_group=g,
                **problem.layout),
            "OPOLoss": lambda g: opo_kernels.OPOLoss()(
                problem.logits[..., :4], labels, ref, rewards, process_group=g,
                **problem.layout),
            "fused_linear_opo_loss": lambda g: opo_kernels.fused_linear_opo_loss(
                hidden, weight, labels, ref, rewards, process_group=g, **problem.layout),
            "FusedLinearOPOLoss": lambda g: opo_kernels.FusedLinearOPOLoss()(
                hidden, weight, labels, ref, rewards, process_group=g, **problem.layout),
        }
        for call in calls.values():
            with pytest.raises(ValueError, match="is not a member"):
                call(group)
            with pytest.raises(TypeError, match="process_group must be a torch.distributed"):
                call(3)
    finally:
        dist.destroy_process_group()
