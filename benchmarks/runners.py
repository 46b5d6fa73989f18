"""The implementations: each builds a ``Runner`` whose step() is forward + backward of one
loss call (see ``benchmarks/harness.py`` for the list)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from benchmarks.cases import DTYPES, GROUP_SIZE, SLICE_IMPLS, Case, Settings, is_linear_impl
from benchmarks.inputs import Inputs, LinearInputs

# Liger's GSPO setting as TRL documents it for GSPO: sequence-level ratio, no KL term, tight
# clipping. Values only matter for which branch is taken; the kernels' memory traffic is
# the same for any.
LIGER_GSPO_KWARGS = dict(temperature=1.0, beta=0.0, eps_low=3e-4, eps_high=4e-4,
                         loss_type="grpo", importance_sampling_level="sequence", reduce=True)
# The same setting for Liger's chunked fused-linear GRPO loss (liger-kernel 0.8.5,
# liger_kernel/chunked_loss/grpo_loss.py). beta=0 -> no reference model (use_ref_model=False);
# chunk_size (sequences per chunk, default 1) and compiled (torch.compile of the loss math,
# default True) are left at Liger's defaults.
LIGER_FUSED_LINEAR_GSPO_KWARGS = dict(beta=0.0, use_ref_model=False, epsilon_low=3e-4,
                                      epsilon_high=4e-4, loss_type="grpo",
                                      importance_sampling_level="sequence", temperature=1.0)



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
        import torch._dynamo.config as dcfg

        from opo_kernels import reference

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):  # or dynamo silently falls back to eager after 8 shapes
                setattr(dcfg, name, max(getattr(dcfg, name), 64))
        _COMPILED[backend] = torch.compile(reference.opo_loss, backend=backend)
    return _COMPILED[backend]


def _layout_kwargs(inp: Inputs) -> Dict[str, torch.Tensor]:
    if inp.shape.layout == "padded":
        return {"mask": inp.mask}
    return {"seq_ids": inp.seq_ids}


def liger_version() -> Optional[str]:
    try:
        from importlib.metadata import version
        return version("liger-kernel")
    except Exception:  # noqa: BLE001 - not installed, or metadata missing
        return None


def build_linear_runner(case: Case, inp: LinearInputs) -> Runner:
    """Fused-linear rows: step() = loss from hidden states + grads of hidden AND weight."""
    impl = case.impl
    hidden = inp.hidden.detach().requires_grad_()
    weight = inp.weight.detach().requires_grad_()
    leaves = (hidden, weight)
    if impl == "opo_kernels_fused_linear":
        from opo_kernels import fused_linear_opo_loss
        from opo_kernels.fused_linear_opo import default_chunk_size

        def loss_fn():
            return fused_linear_opo_loss(hidden, weight, inp.labels, inp.ref_logprobs,
                                         inp.rewards, mask=inp.mask, group_ids=inp.group_ids,
                                         backend="triton", validate=False)
        from opo_kernels.linear_chunks import blocks_over_vocab, vocab_block_size

        chunk = default_chunk_size(inp.rows, inp.shape.V, inp.shape.H, DTYPES[inp.shape.dtype])
        # which dimension the backward cuts, and the columns per block when it is the vocabulary
        extra: Dict[str, object] = {"chunk_size": chunk, "backward_cuts": "rows"}
        if blocks_over_vocab(inp.rows, inp.shape.V):
            extra.update(backward_cuts="vocabulary",
                         vocab_block=vocab_block_size(inp.rows, inp.shape.V, chunk))
    elif impl == "opo_kernels_materialized":
        from opo_kernels import opo_loss

        def loss_fn():
            logits = torch.matmul(hidden, weight.t())  # [B, T, V], materialized
            return opo_loss(logits, inp.labels, inp.ref_logprobs, inp.rewards, mask=inp.mask,
                            group_ids=inp.group_ids, backend="triton", validate=False)
        extra = {}
    elif impl == "liger_fused_linear_gspo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        module = LigerFusedLinearGRPOLoss(**LIGER_FUSED_LINEAR_GSPO_KWARGS)

        def loss_fn():
            # its forward computes the loss AND the gradients, chunk by chunk (backward only
            # returns them); returns (loss, metrics)
            loss, _metrics = module(hidden, weight, inp.labels, inp.mask, inp.advantages,
                                    bias=None, old_per_token_logps=inp.ref_logprobs)
            return loss
        extra = {"liger_kernel": liger_version(), "liger_chunk_size": module.chunk_size,
                 "liger_compiled": module.compiled}
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

    if impl in ("liger_gspo", "liger_gspo_noinplace"):
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        leaf = inp.storage.detach().requires_grad_()  # Liger takes the full [B, T+1, V]
        inplace = impl == "liger_gspo"

        def step():
            loss, _metrics = triton_grpo_loss(leaf, inp.ref_logprobs, None, inp.labels,
                                              inp.advantages, inp.mask, inplace=inplace,
                                              **LIGER_GSPO_KWARGS)
            torch.autograd.grad(loss, leaf)
        return Runner(step, inplace, {"liger_kernel": liger_version()})

    if impl == "liger_ce":
        from liger_kernel.transformers.functional import liger_cross_entropy
        leaf = inp.storage.detach().requires_grad_()  # [rows, V]; forward writes the grad

        def step():
            loss = liger_cross_entropy(leaf, inp.targets, ignore_index=-100, reduction="mean")
            torch.autograd.grad(loss, leaf)
        return Runner(step, True, {"liger_kernel": liger_version()})
    raise ValueError(f"unknown implementation {impl!r}")
