"""The loss paths of the step benchmark (``grid.PATHS``): each is the model's forward, its head
and the loss of one micro-batch, returning the 0-dim loss that the step back-propagates.

Each path calls the model the way its users do: the logits paths ``model(...).logits``
([B, L, V]); the hidden-state paths the backbone (``model.base_model``) and the LM head's
weight; TRL its own patched forward (``add_fused_lm_head``, ``fused_lm_head=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict

import torch

from benchmarks import peers
from benchmarks.cases import interpreter_on
from benchmarks.step.batch import StepBatch


class Unavailable(Exception):
    """The path cannot run here (its package is missing, or it needs a GPU): a skipped row."""


@dataclass
class LossPath:
    name: str
    loss: Callable[[], torch.Tensor]     # forward + head + loss of the batch
    extra: Dict[str, object] = field(default_factory=dict)


def _logits(model, b: StepBatch) -> torch.Tensor:
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


def _hidden(model, b: StepBatch) -> torch.Tensor:
    """The backbone's last hidden states [B, L, H] (after the final norm)."""
    return model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask
                            ).last_hidden_state


def _head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def _from_logprobs(lp: torch.Tensor, b: StepBatch) -> torch.Tensor:
    from opo_kernels import opo_loss_from_logprobs
    return opo_loss_from_logprobs(lp, b.old_logprobs, b.rewards, mask=b.mask,
                                  group_size=b.group_size, vocab_size=b.vocab,
                                  backend="triton", validate=False)


def _need(peer: str) -> None:
    reason = peers.unavailable(peer)
    if reason:
        raise Unavailable(reason)


def _patch_trl_head(model) -> None:
    """TRL's fused LM head on the model, once (its forward is unchanged unless called with
    fused_lm_head=True, so the other paths are not affected)."""
    if getattr(model, "_opo_bench_trl_head", False):
        return
    from trl.trainer.utils import add_fused_lm_head
    add_fused_lm_head(model, outputs=("log_probs",))
    model._opo_bench_trl_head = True


def build_path(name: str, model, b: StepBatch, compile_backend: str) -> LossPath:
    """The path ``name`` on this model and batch; raises Unavailable when it cannot run."""
    import opo_kernels

    device = b.input_ids.device
    common = dict(mask=b.mask, group_size=b.group_size, backend="triton", validate=False)

    if name == "plain":
        def loss():
            logits = _logits(model, b)
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            return _from_logprobs(lp.gather(-1, b.labels.unsqueeze(-1)).squeeze(-1), b)
        return LossPath(name, loss)

    if name == "trl_head":
        _need("trl_head")
        _patch_trl_head(model)

        def loss():
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                        labels=b.labels_full, fused_lm_head=True)
            return _from_logprobs(out.log_probs, b)
        return LossPath(name, loss, peers.trl_extra())

    if name in ("cce", "cce_filtered"):
        _need("cce")
        # exact: the same gradient as ours; filtered: its default, which skips the gradient
        # blocks below a threshold (its users' setting: its strongest, not the same math)
        eps = peers.CCE_DEFAULT_FILTER_EPS if name == "cce_filtered" else peers.CCE_FILTER_EPS

        def loss():
            lp = peers.cce_logprobs(_hidden(model, b), _head_weight(model), b.labels_full,
                                    shift=True, filter_eps=eps)
            return _from_logprobs(lp, b)
        return LossPath(name, loss, peers.cce_extra(device, eps))

    if name == "torch_lce":
        _need("torch_lce")

        def loss():
            lp = peers.torch_lce_logprobs(_hidden(model, b)[:, :-1], _head_weight(model),
                                          b.labels, b.mask != 0)
            return _from_logprobs(lp, b)
        return LossPath(name, loss, peers.torch_lce_extra(device, _head_weight(model).dtype))

    if name in ("liger_logits", "liger_logits_token"):
        _need("liger")
        if device.type != "cuda" and not interpreter_on():
            raise Unavailable("Liger's Triton kernels need CUDA or TRITON_INTERPRET=1")
        level = "token" if name.endswith("_token") else "sequence"

        def loss():
            return peers.liger_grpo_logits(_logits(model, b), b.old_logprobs, b.labels,
                                           b.advantages, b.mask, inplace=True, level=level)
        return LossPath(name, loss, dict(
            peers.liger_extra(), liger_inplace=True, liger_importance_sampling_level=level,
            loss_math=("GSPO" if level == "sequence" else "GRPO") + " (Liger has no OPO)"))

    if name.startswith("liger_fused_linear"):
        _need("liger")
        # chunkB: chunk_size = the micro-batch's B sequences, one chunk (Liger's documented
        # constructor argument; its logits are still made 2048 rows at a time in 0.8.5)
        module = peers.liger_fused_linear_module(b.B if name.endswith("_chunkB") else 1)
        tf32 = "_tf32" in name

        def loss():
            return peers.liger_fused_linear_gspo(
                module, _hidden(model, b)[:, :-1], _head_weight(model), b.labels, b.mask,
                b.advantages, b.old_logprobs, tf32=tf32)
        return LossPath(name, loss, dict(peers.liger_extra(module), tf32=tf32,
                                         loss_math="GSPO (Liger has no OPO)"))

    if name == "torch_compiled":
        # static shapes, as the kernel-level suite compiles it: a graph specialized to each
        # micro-batch size and vocabulary (its compile falls in the first warm-up step; the
        # later steps run under "fail_on_recompile", benchmarks/peers_torch.py)
        opo = _torch_opo(compile_backend)
        prepared = opo.prepare(b.labels, b.old_logprobs, b.rewards, vocab_size=b.vocab,
                               mask=b.mask, group_size=b.group_size)

        def loss():
            return opo(_logits(model, b), prepared, shift=True)
        return LossPath(name, loss, opo.extra())

    if name in ("opo_logits", "opo_logits_inplace"):
        inplace = name.endswith("_inplace")

        def loss():
            return opo_kernels.opo_loss(_logits(model, b)[:, :-1], b.labels, b.old_logprobs,
                                        b.rewards, grad_to_base=True, inplace_backward=inplace,
                                        **common)
        return LossPath(name, loss, {"grad_to_base": True, "inplace_backward": inplace})

    if name in ("opo_fused_linear", "opo_fused_linear_on_policy", "opo_fused_linear_budget"):
        from benchmarks.runners import logits_budget_supported
        ref = None if name.endswith("_on_policy") else b.old_logprobs
        kw: Dict[str, object] = {}
        extra: Dict[str, object] = {"on_policy": ref is None}
        w, budget_ok = _head_weight(model), logits_budget_supported()
        if name.endswith("_budget"):
            if not budget_ok:
                raise Unavailable("fused_linear_opo_loss has no logits_budget= yet")
            # enough for every counted row's logits in the weight's dtype: all held
            kw["logits_budget"] = b.B * (b.L - 1) * b.vocab * w.element_size()
        if budget_ok:
            # the plan the call makes (the default budget keeps some rows' logits in the
            # general mode: a 4 - K/M matmul run), recorded so that the row can be read
            from opo_kernels.linear_plan import plan_chunks
            plan = plan_chunks(b.counted, b.vocab, w.dtype, None, kw.get("logits_budget"),
                               ref is None, True)
            extra.update(chunk_size=plan.chunk_rows, held_rows=plan.held_rows,
                         logits_budget=kw.get("logits_budget", "default"))

        def loss():
            return opo_kernels.fused_linear_opo_loss(
                _hidden(model, b)[:, :-1], _head_weight(model), b.labels, ref, b.rewards,
                **common, **kw)
        return LossPath(name, loss, extra)

    raise ValueError(f"unknown path {name!r}")


_TORCH_OPO = {}


def _torch_opo(backend: str):
    """One strong-torch OPO per backend and process (its compiled graph is reused)."""
    from benchmarks.peers_torch import TorchOPO
    if backend not in _TORCH_OPO:
        _TORCH_OPO[backend] = TorchOPO(backend=backend, dynamic=False)
    return _TORCH_OPO[backend]
