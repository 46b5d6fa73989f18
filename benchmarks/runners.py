"""The implementations: each builds a ``Runner`` whose step() is forward + backward of one
loss call (see ``benchmarks/harness.py`` for the list)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from benchmarks import peers
from benchmarks.cases import DTYPES, GROUP_SIZE, SLICE_IMPLS, Case, Settings, is_linear_impl
from benchmarks.inputs import Inputs, LinearInputs


@dataclass
class Runner:
    step: Callable[[], None]
    inplace: bool                 # step() overwrites the logits: restore before each run
    extra: Dict[str, object] = field(default_factory=dict)


_COMPILED: Dict[str, Callable] = {}


def compiled_reference(backend: str) -> Callable:
    """One torch.compile'd reference per process, so shapes after the first few reuse the
    dynamic-shape graphs instead of recompiling."""
    if backend not in _COMPILED:
        from benchmarks.peers_torch import raise_recompile_limit
        from opo_kernels import reference

        raise_recompile_limit()  # or dynamo silently falls back to eager after 8 shapes
        _COMPILED[backend] = torch.compile(reference.opo_loss, backend=backend)
    return _COMPILED[backend]


def _layout_kwargs(inp: Inputs) -> Dict[str, torch.Tensor]:
    if inp.shape.layout == "padded":
        return {"mask": inp.mask}
    return {"seq_ids": inp.seq_ids}


def liger_version() -> Optional[str]:
    return peers.version("liger-kernel")


def logits_budget_supported() -> bool:
    """Whether the installed fused_linear_opo_loss takes ``logits_budget=`` (bytes of logits
    held from forward to backward): a keyword of the function or a field of its config."""
    import dataclasses
    import inspect

    from opo_kernels import OPOLossConfig, fused_linear_opo_loss
    return ("logits_budget" in inspect.signature(fused_linear_opo_loss).parameters
            or "logits_budget" in {f.name for f in dataclasses.fields(OPOLossConfig)})


def build_linear_runner(case: Case, inp: LinearInputs) -> Runner:
    """Fused-linear rows: step() = loss from hidden states + grads of hidden AND weight."""
    impl = case.impl
    hidden = inp.hidden.detach().requires_grad_()
    weight = inp.weight.detach().requires_grad_()
    leaves = (hidden, weight)
    layout = inp.layout_kwargs()
    extra: Dict[str, object] = {}
    if impl.startswith("opo_kernels_fused_linear"):
        from opo_kernels import fused_linear_opo_loss
        from opo_kernels.linear_plan import plan_chunks

        ref = None if impl.endswith("_on_policy") else inp.ref_logprobs
        dtype = DTYPES[inp.shape.dtype]
        kw: Dict[str, object] = {}
        if impl.endswith("_budget"):
            # enough for every row's logits in the input dtype: all held, none recomputed
            kw["logits_budget"] = inp.rows * inp.shape.V * dtype.itemsize
        elif ref is not None:
            # the general mode as its 4-matmul floor counts it: no logits held (the default
            # budget would keep some rows' logits and make it a 4 - K/M matmul run)
            kw["logits_budget"] = 0
        counted = int(inp.counted.sum())
        plan = plan_chunks(counted, inp.shape.V, dtype, None, kw.get("logits_budget"),
                           ref is None, True)
        extra.update(chunk_size=plan.chunk_rows, held_rows=plan.held_rows,
                     logits_budget=kw.get("logits_budget", "default"))

        def loss_fn():
            return fused_linear_opo_loss(hidden, weight, inp.labels, ref, inp.rewards,
                                         group_ids=inp.group_ids, backend="triton",
                                         validate=False, **layout, **kw)
        extra["on_policy"] = ref is None
    elif impl == "opo_kernels_materialized":
        from opo_kernels import opo_loss

        def loss_fn():
            logits = torch.matmul(hidden, weight.t())  # [B, T, V] / [N, V], materialized
            return opo_loss(logits, inp.labels, inp.ref_logprobs, inp.rewards,
                            group_ids=inp.group_ids, backend="triton", validate=False,
                            **layout)
    elif impl in ("cce", "cce_filtered", "cce_torch_compile", "trl_head", "torch_lce"):
        from opo_kernels import opo_loss_from_logprobs

        counted = inp.counted
        if impl == "trl_head":
            def logprobs():
                return peers.trl_head_logprobs(hidden, weight, inp.labels, counted)
            extra = peers.trl_extra()
        elif impl == "torch_lce":
            def logprobs():
                return peers.torch_lce_logprobs(hidden, weight, inp.labels, counted)
            extra = peers.torch_lce_extra(hidden.device, hidden.dtype)
        else:  # cut-cross-entropy
            targets = torch.where(counted, inp.labels, peers.IGNORE_INDEX)
            eps = peers.CCE_DEFAULT_FILTER_EPS if impl == "cce_filtered" else peers.CCE_FILTER_EPS
            cce_impl = "torch_compile" if impl == "cce_torch_compile" else "cce"

            def logprobs():
                return peers.cce_logprobs(hidden, weight, targets, filter_eps=eps, impl=cce_impl)
            extra = peers.cce_extra(hidden.device, eps, cce_impl)

        def loss_fn():
            return opo_loss_from_logprobs(logprobs(), inp.ref_logprobs, inp.rewards,
                                          group_ids=inp.group_ids, vocab_size=inp.shape.V,
                                          backend="triton", validate=False, **layout)
    elif impl.startswith("liger_fused_linear_gspo"):
        # chunkB: chunk_size = the batch's B sequences, one chunk (padded only: harness.py)
        module = peers.liger_fused_linear_module(
            inp.shape.B if impl.endswith("_chunkB") else 1)
        tf32 = "_tf32" in impl
        if inp.mask is not None:
            args = (inp.labels, inp.mask, inp.advantages, inp.ref_logprobs)
            view = lambda x: x  # noqa: E731
        else:  # Liger takes [B, T, H] only: the packed rows as one sequence (same matmuls)
            args = (inp.labels[None], torch.ones_like(inp.labels)[None], inp.advantages[:1],
                    inp.ref_logprobs[None])
            view = lambda x: x[None]  # noqa: E731
            extra["liger_layout"] = "packed rows as one [1, N, H] sequence"

        def loss_fn():
            return peers.liger_fused_linear_gspo(module, view(hidden), weight, *args[:3],
                                                 args[3], tf32=tf32)
        extra.update(peers.liger_extra(module), tf32=tf32)
    else:
        raise ValueError(f"unknown fused-linear implementation {impl!r}")

    def step():
        torch.autograd.grad(loss_fn(), leaves)
    return Runner(step, False, extra)


def build_runner(case: Case, inp: Inputs, settings: Settings) -> Runner:
    impl = case.impl
    if is_linear_impl(impl):
        return build_linear_runner(case, inp)
    kw = _layout_kwargs(inp)
    if impl in ("opo_kernels", "opo_kernels_inplace", "eager", "compile", *SLICE_IMPLS):
        if impl in SLICE_IMPLS:  # the gradient w.r.t. the model's whole output [B, T+1, V]
            leaf = inp.storage.detach().requires_grad_()
            view = (lambda x: x[:, :-1]) if inp.logits.dim() == 3 else (lambda x: x)  # noqa: E731
        else:  # the gradient w.r.t. the logits read (a strided view for padded: not copied)
            leaf = inp.logits.detach().requires_grad_()
            view = lambda x: x  # noqa: E731
        if impl.startswith("opo_kernels"):
            from opo_kernels import opo_loss
            inplace = impl == "opo_kernels_inplace"
            to_base = impl == "opo_kernels_grad_to_base"

            def loss_fn():
                return opo_loss(view(leaf), inp.labels, inp.ref_logprobs, inp.rewards,
                                group_size=GROUP_SIZE, backend="triton", validate=False,
                                inplace_backward=inplace, grad_to_base=to_base, **kw)
            extra: Dict[str, object] = {}
        else:
            from opo_kernels import reference
            fn = reference.opo_loss if impl == "eager" else compiled_reference(
                settings.compile_backend)
            inplace = False

            def loss_fn():
                return fn(leaf, inp.labels, inp.ref_logprobs, inp.rewards,
                          group_size=GROUP_SIZE, validate=False, **kw)
            extra = {"compile_backend": settings.compile_backend} if impl == "compile" else {}

        def step():
            torch.autograd.grad(loss_fn(), leaf)
        return Runner(step, inplace, extra)

    if impl == "torch_compiled":
        from benchmarks.peers_torch import TorchOPO
        # static graphs per shape, as the step benchmark compiles it; the untimed first call
        # compiles, the timed ones may not (TorchOPO: no silent recompile or eager fallback)
        opo = TorchOPO(backend=settings.compile_backend, dynamic=False)
        leaf = inp.logits.detach().requires_grad_()  # the [:, :-1] view, read in place
        group_ids = torch.arange(inp.B, device=leaf.device) // GROUP_SIZE
        prepared = opo.prepare(inp.labels, inp.ref_logprobs, inp.rewards, vocab_size=inp.shape.V,
                               group_ids=group_ids, **kw)

        def step():
            torch.autograd.grad(opo(leaf, prepared), leaf)
        return Runner(step, False, opo.extra())

    if impl in ("liger_gspo", "liger_gspo_noinplace", "liger_grpo_token"):
        leaf = inp.storage.detach().requires_grad_()  # Liger takes the full [B, T+1, V]
        inplace = impl != "liger_gspo_noinplace"
        level = "token" if impl == "liger_grpo_token" else "sequence"

        def step():
            loss = peers.liger_grpo_logits(leaf, inp.ref_logprobs, inp.labels, inp.advantages,
                                           inp.mask, inplace=inplace, level=level)
            torch.autograd.grad(loss, leaf)
        return Runner(step, inplace, {"liger_kernel": liger_version(),
                                      "liger_importance_sampling_level": level})

    if impl == "liger_ce":
        from liger_kernel.transformers.functional import liger_cross_entropy
        leaf = inp.storage.detach().requires_grad_()  # [rows, V]; forward writes the grad

        def step():
            loss = liger_cross_entropy(leaf, inp.targets, ignore_index=-100, reduction="mean")
            torch.autograd.grad(loss, leaf)
        return Runner(step, True, {"liger_kernel": liger_version()})
    raise ValueError(f"unknown implementation {impl!r}")
