"""What a loss call computes on the host once per option set or shape instead of on every call
(benchmarks/host_time.py measures the saving): the validated config, the launch config, the
integer helpers that replace Triton's constexpr functions on the host, the call plan (checks,
launches and workspace per call signature) and what the launchers pass (the remembered Triton
variant of a launch itself: test_launch_cache.py). Each must give exactly what computing it
afresh gives, and a different signature must miss."""

import gc
import inspect
import weakref

import pytest
import torch
import triton

import opo_kernels
from opo_kernels import config, fused_opo, launches, row_launch, utils
from opo_kernels.config import OPOLossConfig, config_from_options

# host-side code on CPU tensors (the remembered launches on CUDA: test_launch_cache_gpu.py)
pytestmark = pytest.mark.cpu_only


def test_equal_options_share_one_config():
    options = dict(alpha=0.5, level="token", entropy_coef=0.01)
    first = config_from_options(dict(options))
    assert config_from_options(dict(options)) is first
    assert first == OPOLossConfig(**options)
    # another order of the same options: another entry, an equal config
    assert config_from_options(dict(reversed(list(options.items())))) == first
    assert config_from_options(dict(options, alpha=0.4)) != first


def test_bad_options_raise_every_time_even_next_to_a_remembered_good_one():
    assert config_from_options(dict(compute_entropy=True)).compute_entropy is True
    for _ in range(2):  # True is remembered; 1 is a different key and still refused
        with pytest.raises(TypeError, match="compute_entropy must be a bool"):
            config_from_options(dict(compute_entropy=1))
        with pytest.raises(ValueError, match="alpha must be in"):
            config_from_options(dict(alpha=2.0))


def test_unhashable_option_values_are_validated_afresh():
    cfg = config_from_options(dict(tau_range=[0.3, 1.2]))
    assert cfg.tau_range == (0.3, 1.2)
    assert not any(isinstance(v, list) for key in config._FROM_OPTIONS for v in key[1])


def test_tensor_option_values_are_not_remembered():
    """A weights tensor changes every step: remembering it would only keep it alive."""
    before = len(config._FROM_OPTIONS)
    for _ in range(3):
        weights = torch.rand(4)
        cfg = config_from_options(dict(weights=weights))
        assert cfg.weights is weights
    assert len(config._FROM_OPTIONS) == before
    assert not any(isinstance(v, torch.Tensor) for key in config._FROM_OPTIONS for v in key[1])


def test_remembered_launch_config_is_the_table_and_override_still_wins(monkeypatch):
    for vocab in (7, 1000, 32003, 151936):
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for kind in ("fwd", "onepass", "bwd", "scale"):
                first = row_launch.launch_config(vocab, dtype, kind)
                assert first == row_launch._from_table(vocab, dtype, kind)
                assert row_launch.launch_config(vocab, dtype, kind) is first
    monkeypatch.setattr(row_launch, "LAUNCH_OVERRIDE", lambda kind, vocab, dtype: (64, 2))
    assert row_launch.launch_config(151936, torch.bfloat16, "fwd") == (64, 2, 1, 0, False)


def test_host_integer_helpers_match_triton():
    for a in range(0, 300):
        for b in (1, 2, 3, 16, 64, 128):
            assert utils.cdiv(a, b) == triton.cdiv(a, b)
    for n in list(range(1, 600)) + [32000, 32003, 128256, 151936, 2**20]:
        assert utils.next_power_of_2(n) == triton.next_power_of_2(n)


# --------------------------------------------------------------------------------------------
# The call plan (call_plan.py): one per call signature; a different signature misses
# --------------------------------------------------------------------------------------------

def _call(logits, labels, ref, rewards, **kw):
    layout = kw.pop("layout")
    return opo_kernels.opo_loss(logits, labels, ref, rewards, backend="triton", **layout, **kw)


def _padded(B=2, T=3, V=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    return logits, labels, torch.randn(B, T, generator=g), torch.randn(B, generator=g), dict(
        mask=torch.ones(B, T, dtype=torch.bool), group_size=2)


def _plans():
    return dict(fused_opo._CALL_PLANS.plans)


def _new_plans(before):
    return [p for k, p in fused_opo._CALL_PLANS.plans.items() if k not in before]


def test_same_signature_reuses_its_plan_and_computes_the_same():
    logits, labels, ref, rewards, layout = _padded()
    before = _plans()
    first = _call(logits, labels, ref, rewards, layout=layout)
    made = _new_plans(before)
    assert len(made) == 1
    before = _plans()
    # new tensors, same metadata: the plan is reused, the values follow the new tensors
    logits2, labels2, ref2, rewards2, layout2 = _padded(seed=1)
    second = _call(logits2, labels2, ref2, rewards2, layout=layout2)
    assert not _new_plans(before)
    fused_opo._CALL_PLANS.plans.clear()  # computed afresh (checks, plan) gives the same
    assert torch.equal(second, _call(logits2, labels2, ref2, rewards2, layout=layout2))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("change", [
    "dtype", "vocab", "rows", "stride", "labels_dtype", "mask_absent", "group_size",
    "options", "ref_absent", "rewards_dtype"])
def test_a_different_signature_misses(change):
    logits, labels, ref, rewards, layout = _padded()
    _call(logits, labels, ref, rewards, layout=layout)
    kw = {}
    if change == "dtype":
        logits = logits.to(torch.bfloat16)
    elif change == "vocab":
        logits = torch.randn(2, 3, 9)
    elif change == "rows":
        logits, labels, ref, rewards, layout = _padded(T=4)
    elif change == "stride":  # the same shape, read through another stride
        logits = torch.randn(2, 4, 8)[:, :3]
    elif change == "labels_dtype":
        labels = labels.to(torch.int32)
    elif change == "mask_absent":
        layout = dict(group_size=2)
    elif change == "group_size":
        rewards = torch.randn(2)
        layout = dict(layout, group_size=1)
    elif change == "options":
        kw = dict(alpha=0.5)
    elif change == "ref_absent":
        ref = None
    elif change == "rewards_dtype":
        rewards = rewards.double()
    before = _plans()
    loss = _call(logits, labels, ref, rewards, layout=layout, **kw)
    assert len(_new_plans(before)) == 1
    fused_opo._CALL_PLANS.plans.clear()
    assert torch.equal(loss, _call(logits, labels, ref, rewards, layout=layout, **kw))


def test_equal_configs_share_a_plan_and_unequal_ones_do_not():
    """Plans are keyed by the config's value: configs made afresh with the same values (as a
    loop that calls ``cfg.replace(...)`` or passes a new weights tensor every step makes them)
    share one; a config that differs in any option, the weights mode included (a field that
    does not enter the config's ==), gets its own."""
    logits, labels, ref, rewards, layout = _padded(B=4)
    base = OPOLossConfig(backend="triton")

    def run(cfg):
        before = _plans()
        loss = fused_opo.opo_loss_with_config(logits, labels, ref, rewards, cfg, **layout)
        return loss, len(_new_plans(before))

    run(base)
    assert run(base.replace(alpha=base.alpha))[1] == 0  # equal value, new object
    for other in (base.replace(weights="escort"), base.replace(alpha=0.5),
                  base.replace(validate="deferred")):
        assert run(other)[1] == 1
    # weights tensors: a new config and tensor every step, one plan; values read per call
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.rand(4, generator=g), torch.rand(4, generator=g)
    first, made = run(base.replace(weights=w1))
    assert made == 1
    second, made = run(base.replace(weights=w2))
    assert made == 0 and not torch.equal(first, second)
    fused_opo._CALL_PLANS.plans.clear()
    assert torch.equal(second, run(base.replace(weights=w2))[0])
    # another weights shape or dtype is another signature
    assert run(base.replace(weights=w2.double()))[1] == 1


def test_a_plan_keeps_no_weights_tensor():
    logits, labels, ref, rewards, layout = _padded(B=4)
    weights = torch.rand(4)
    alive = weakref.ref(weights)
    fused_opo._CALL_PLANS.plans.clear()
    before = _plans()
    fused_opo.opo_loss_with_config(logits, labels, ref, rewards,
                                   OPOLossConfig(backend="triton", weights=weights), **layout)
    assert len(_new_plans(before)) == 1
    del weights
    gc.collect()
    assert alive() is None


def test_a_plan_keeps_no_tensor_of_its_call():
    logits, labels, ref, rewards, layout = _padded()
    before = _plans()
    _call(logits, labels, ref, rewards, layout=layout)
    (plan,) = _new_plans(before)
    alive = [weakref.ref(t) for t in (logits, labels, ref, rewards, *layout.values())
             if isinstance(t, torch.Tensor)]
    del logits, labels, ref, rewards, layout
    gc.collect()
    assert all(r() is None for r in alive)
    assert plan.params is not None  # (its own parameter tensor is kept)


def test_checks_still_run_on_a_reused_plan():
    logits, labels, ref, rewards, layout = _padded()
    _call(logits, labels, ref, rewards, layout=layout)
    bad = labels.clone()
    bad[0, 0] = 99  # value check (device counts): read on every call
    with pytest.raises(ValueError, match="labels: 1 counted label"):
        _call(logits, bad, ref, rewards, layout=layout)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        _call(logits, labels.tolist(), ref, rewards, layout=layout)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        _call(logits, labels, ref, rewards, layout=dict(layout, group_size=True))


@pytest.mark.parametrize("validate", [True, False])
def test_workspace_pieces_are_aligned_and_disjoint(validate):
    """The kernels get one float and one int allocation and where each piece starts in them
    (``at``, units of 4 elements): the pieces they write must not overlap, and every piece
    the launches name is one the layout has (or the stand-in the kernel never touches)."""
    logits, labels, ref, rewards, layout = _padded(B=4, T=5, V=8)
    logits.requires_grad_()  # on-policy: the one-pass layout (a gradient is wanted)
    for ref_ in (ref, None):
        before = _plans()
        _call(logits, torch.randint(0, 8, (4, 5)), ref_, torch.randn(4), compute_entropy=True,
              validate=validate, layout=layout)
        (plan,) = _new_plans(before)
        n, b = 20, 4
        floats, ints = plan._floats, plan._ints
        sizes = [n, 2 * n, n, plan.epilogue.ws_size, plan.epilogue.sums_size or None, 8, 2 * b, 2]
        spans = sorted((start, start + size) for start, size in zip(floats.start, sizes)
                       if start is not None)
        assert all(start % 4 == 0 for start, _ in spans)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        assert spans[-1][1] <= floats.total
        assert floats.at == [0 if s is None else s // 4 for s in floats.start]
        lp, stats, ent, ws, sums, metrics, coef, scal = floats.at
        assert plan.rows_at == (lp, stats, ent, coef, scal)
        # with one chunk, phase 1 sums into the workspace itself
        sums = sums if plan.epilogue.sums_size else ws
        assert plan.epilogue.at[:8] == (lp, ent, stats, ws, sums, metrics, coef, scal)
        errs, ticket, part_errs, pre_ticket = ints.at
        # the check counts come first (the call reads them from the start of the int
        # workspace); without validation they are never written: the ticket stands in
        assert (errs, ints.start[0]) == ((0, 0) if validate else (0, None))
        if validate:
            assert ticket * 4 >= 16 and part_errs * 4 >= ticket * 4 + 1
            assert plan.epilogue.at[8:] == (part_errs, ticket, errs)
        else:
            assert plan.epilogue.at[8:] == (ticket, ticket, ticket)
        s = plan.scratch()
        assert s.ints.numel() == ints.total and not s.ints.any()  # every ticket starts at 0
        assert s.floats.numel() == floats.total and s.floats._base is None
        assert s.loss.dim() == 0 and s.loss.data_ptr() != s.floats.data_ptr()
        if ref_ is None:
            # the pre-pass runs in the main epilogue's pieces, with a zeroed ticket of its own
            assert plan.pre.at[:8] == plan.epilogue.at[:8]
            assert plan.pre.at[8:] == (pre_ticket,) * 3 and pre_ticket not in (
                ticket, part_errs) and pre_ticket * 4 < ints.total
            if validate:
                assert pre_ticket * 4 >= part_errs * 4 + plan.epilogue.part_errs_size
        else:
            assert plan.pre is None and ints.start[3] is None


def test_workspace_layout_aligns_each_piece_and_skips_absent_ones():
    from opo_kernels.call_plan import _Layout

    layout = _Layout([5, None, 3, 0, 8])  # a piece of 0 (B = 0) is still a piece
    assert layout.start == [0, None, 8, 12, 12] and layout.at == [0, 0, 2, 3, 3]
    assert layout.total == 20
    assert _Layout([None, 1, None]).start == [None, 0, None] and _Layout([None]).total == 1


@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("validate", [False, "deferred"])
def test_a_call_makes_three_allocations_and_no_workspace_view(on_policy, validate):
    """Each piece of a tensor object of its own costs host time on every call (~1 µs): the
    forward allocates the float and int workspaces and the loss, and makes no view of them
    (the metrics are a view only when asked for)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    from benchmarks.host_time import stubbed_launches

    logits, labels, ref, rewards, layout = _padded(B=4)
    for _ in range(2):  # the second call reuses the plan
        x = logits.clone().requires_grad_()
        with stubbed_launches() as launched, Ops() as ops:  # (the interpreter's ops: not ours)
            loss = _call(x, labels, None if on_policy else ref, rewards, layout=layout,
                         validate=validate)
        assert len(launched) == (3 if on_policy else 2)
        loss.backward()  # (reads a deferred check here, outside the ops counted)
    views = [n for n in ops.names if n.split(".")[1] in (
        "split_with_sizes", "narrow", "slice", "view", "as_strided", "select", "unbind")]
    allocs = [n for n in ops.names if n.split(".")[1] in ("empty", "zeros", "empty_like",
                                                          "full", "new_empty")]
    assert not views, views
    # floats, ints, loss (+ the on-policy gradient, written by the forward)
    assert len(allocs) == 3 + on_policy, allocs
    assert loss.requires_grad


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_cpp_apply_computes_what_the_public_apply_does(monkeypatch, layout):
    """Eager calls enter the autograd Function through its C++ apply (the public one's Python
    prologue is ~3 µs); the loss, the metrics and the gradient are the public path's, bit for
    bit, and a torch without that method takes the public one."""
    assert fused_opo._APPLY is not None  # this torch has it
    g = torch.Generator().manual_seed(4)
    if layout == "padded":
        base = torch.randn(4, 6, 8, generator=g)
        labels, ref = torch.randint(0, 8, (4, 5), generator=g), torch.randn(4, 5, generator=g)
        lay = dict(mask=torch.rand(4, 5, generator=g) < 0.7, group_size=2)
        cut = lambda x: x[:, :-1]  # noqa: E731
    else:
        base = torch.randn(12, 8, generator=g)
        labels, ref = torch.randint(0, 8, (12,), generator=g), torch.randn(12, generator=g)
        lay = dict(seq_ids=torch.arange(4).repeat_interleave(3), group_size=2)
        cut = lambda x: x  # noqa: E731
    rewards = torch.randn(4, generator=g)

    def run():
        x = base.clone().requires_grad_()
        loss, metrics = _call(cut(x), labels, ref, rewards, layout=lay, return_metrics=True,
                              grad_to_base=layout == "padded")
        (grad,) = torch.autograd.grad(loss, x)
        return loss, metrics, grad

    calls = []
    public = fused_opo.FusedOPOFunction.apply
    monkeypatch.setattr(fused_opo.FusedOPOFunction, "apply",
                        lambda *a: calls.append(1) or public(*a))
    fast = run()
    assert not calls
    monkeypatch.setattr(fused_opo, "_APPLY", None)
    slow = run()
    assert len(calls) == 1
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[2], slow[2])
    assert fast[1].keys() == slow[1].keys()
    assert all(torch.equal(fast[1][k], slow[1][k]) and not fast[1][k].requires_grad
               for k in fast[1])


# --------------------------------------------------------------------------------------------
# The launchers (launches.py: the remembered variant itself, test_launch_cache.py)
# --------------------------------------------------------------------------------------------


def test_every_launch_passes_every_parameter_positionally(monkeypatch):
    """What the remembered variant relies on: the launchers pass each kernel all of its
    parameters, in order, constexprs included (so Triton's bound arguments are the ones
    passed); checked on the real launches of each mode."""
    seen = []
    original = launches.Launch.__call__

    def spy(self, *args):
        seen.append((self.kernel, len(args)))
        return original(self, *args)
    monkeypatch.setattr(launches.Launch, "__call__", spy)
    logits, labels, ref, rewards, layout = _padded()
    for ref_ in (ref, None):
        x = logits.clone().requires_grad_()
        _call(x, labels, ref_, rewards, layout=layout, compute_entropy=True).backward()
    names = {k.fn.__name__ for k, _ in seen}
    assert names == {"_opo_fwd_kernel", "epilogue_kernel", "_opo_bwd_kernel", "_scale_kernel"}
    for kernel, n in seen:
        assert n == len(inspect.signature(kernel.fn).parameters), kernel.fn.__name__


def test_a_launch_config_override_is_read_at_every_call(monkeypatch):
    """Tests and the sweep set row_launch.LAUNCH_OVERRIDE between calls of one signature:
    no plan is kept while it is set, so each call launches with the override in force."""
    warps = []
    original = launches.Launch.__call__

    def spy(self, *args):
        if self.kernel.fn.__name__ == "_opo_fwd_kernel":
            warps.append(self.options["num_warps"])
        return original(self, *args)
    monkeypatch.setattr(launches.Launch, "__call__", spy)
    logits, labels, ref, rewards, layout = _padded()
    before = _plans()
    for num_warps in (1, 2):
        monkeypatch.setattr(row_launch, "LAUNCH_OVERRIDE",
                            lambda kind, vocab, dtype, w=num_warps: (8, w))
        _call(logits, labels, ref, rewards, layout=layout)
    assert warps == [1, 2]
    assert not _new_plans(before)


def test_a_pickled_config_does_not_carry_its_plan_number():
    """config_id numbers configs per process; a config pickled in one process (torch.save, a
    spawned worker) must not bring its number into another, where it names another config's
    plan. Here the other process's numbering is stood in for by giving cfg the number of a
    different config of this process: unpickled, cfg must get its own plan (its own α)."""
    import copy
    import pickle

    from opo_kernels import call_plan

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 3, 8, generator=g), torch.randint(0, 8, (2, 3), generator=g)
    ref, rewards = torch.randn(2, 3, generator=g), torch.randn(2, generator=g)
    other = OPOLossConfig(alpha=0.9, backend="triton")
    fused_opo.opo_loss_with_config(logits, labels, ref, rewards, other, group_size=2)
    cfg = OPOLossConfig(alpha=0.3, mu=0.5, backend="triton")
    object.__setattr__(cfg, "_plan_id", call_plan.config_id(other))  # "the other process's"
    for restored in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert "_plan_id" not in restored.__dict__ and restored == cfg
        got = fused_opo.opo_loss_with_config(logits, labels, ref, rewards, restored,
                                             group_size=2)
        expected = opo_kernels.opo_loss(logits, labels, ref, rewards, group_size=2, alpha=0.3,
                                        mu=0.5, backend="torch")
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_a_pending_deferred_error_is_raised_before_a_cached_call_writes():
    """A validating call whose signature has a plan reads an earlier deferred call's error
    before its kernels run, as a first call does in its input checks: an on-policy in-place
    call (its forward writes the gradient over the logits) leaves the logits as they were."""
    from opo_kernels import validation

    g = torch.Generator().manual_seed(0)

    def data():
        return (torch.randn(2, 3, 8, generator=g), torch.randint(0, 8, (2, 3), generator=g),
                torch.randn(2, generator=g))

    options = dict(backend="triton", inplace_backward=True, group_size=2)
    x, y, r = data()
    opo_kernels.opo_loss(x.requires_grad_(), y, None, r, **options).backward()  # the plan
    x, y, r = data()
    r[0] = float("nan")
    with torch.no_grad():  # no backward reads it: left pending
        opo_kernels.opo_loss(x, y, None, r, backend="triton", group_size=2, validate="deferred")
    assert validation._PENDING
    x, y, r = data()
    before = x.clone()
    with pytest.raises(ValueError, match="validate='deferred'.*rewards"):
        opo_kernels.opo_loss(x.requires_grad_(), y, None, r, **options)
    assert torch.equal(x.detach(), before)
