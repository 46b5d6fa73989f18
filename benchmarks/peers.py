"""Adapters for the peers the benchmarks compare with, each called through its own public
entry point at its strongest documented setting (the kernel-level suite, ``runners.py``, and
the RL-step benchmark, ``benchmarks/step``, share them). The strong-torch OPO is in
``peers_torch.py``.

  cce          Apple's cut-cross-entropy (``cut_cross_entropy.linear_cross_entropy``):
               per-token NLL from hidden states and the LM head, reduction="none",
               filter_eps=None: its EXACT mode (the default "high" skips gradient blocks whose
               softmax is below bf16 eps/32; exact keeps every one, as our losses do).
               log-prob = −NLL, then ``opo_loss_from_logprobs``. ``cce_filtered``: the same
               at its default filter_eps="high" (what its users run: faster, the skipped
               blocks' gradient left out; CUDA only). On a GPU its Triton kernels
               (impl="cce"); without one its documented torch implementation
               (impl="torch_compile": the same math; the Triton kernels cannot run in
               Triton's interpreter). Version: the PyPI wheel 25.1.1 (impl "cce" and
               "torch_compile" only). Its impl="cce", filter_eps=None accumulates the gradients
               in their dtype; the main branch's impl="cce_exact" (25.6.4) adds fp32
               accumulation, which this wheel lacks (docs/benchmarks.md, "Peer versions").
  cce_torch_compile   the same call at impl="torch_compile" on a GPU: CCE's own
               ``torch.compile`` implementation (logits materialized for the counted rows,
               fp32 cross-entropy), which its README calls "typically the fastest but uses the
               most amount of memory"; exact (no filter). CUDA only (on the CPU ``cce`` is
               already this implementation).
  trl_head     TRL's chunked log-prob LM head (``trl.kernels.ChunkedLogProbFunction``, what
               ``trl.trainer.utils.add_fused_lm_head`` patches into GRPOTrainer's model):
               only the counted rows of hidden are projected (its "compact" mode on CUDA),
               vocabulary tiles of TRL's own chunk size, log-probs only (no entropy: the
               OPO loss here does not use it), then ``opo_loss_from_logprobs``.
  torch_lce    PyTorch's own chunked linear cross-entropy (torch >= 2.13:
               ``torch.nn.functional.linear_cross_entropy(..., reduction="none",
               options=torch.nn.LinearCrossEntropyOptions())``, its chunked path at its "auto"
               defaults, which pick the accumulation policy and chunk size per device and
               dtype) on the counted rows of hidden only, log-prob = −NLL, then
               ``opo_loss_from_logprobs``. Its per-token output comes in the inputs' dtype
               (bf16 log-probs for bf16 hidden states, whatever its accumulation dtype); its
               backward recomputes the logits (reduction="none"): 4 matmuls.
  liger_gspo   Liger-Kernel ``triton_grpo_loss`` on the logits [B, T+1, V] (in place, its
               default), sequence-level importance sampling (GSPO): 3 reads + 1 write of the
               logits (a log-prob pass for the sequence ratio, its forward, its backward).
               Liger has no OPO: these rows run GRPO/GSPO, whose memory traffic is the same
               kind of work.
  liger_grpo_token   the same call at importance_sampling_level="token" (its default, plain
               GRPO), the other kwargs unchanged: 2 reads + 1 write (forward, backward), the
               traffic of our own loss; Liger's fastest mode on the logits.
  liger_fused_linear   Liger-Kernel ``LigerFusedLinearGRPOLoss`` (``compiled=True``) with the
               same GSPO setting, at its default chunk_size=1 (sequences per chunk) or at
               chunk_size=B (its documented constructor argument: the whole batch in one
               chunk; in liger-kernel 0.8.5 a chunk's logits are still made 2048 rows × 4096
               vocabulary entries at a time, so memory stays bounded). Its ∂hidden/∂weight
               matmuls run in fp32: at fp32 matmul precision "highest" (PyTorch's default,
               TF32 off) or "high" (TF32 on, as most training runs set it):
               ``matmul_precision``.

Every function raises ImportError when its package is missing; ``unavailable`` says why a
peer cannot run here (the suites record that as a skipped row).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch

PACKAGES = {"cce": "cut-cross-entropy", "trl_head": "trl", "liger": "liger-kernel",
            "torch_lce": "torch >= 2.13"}

# Liger's GSPO setting as TRL documents it for GSPO: sequence-level ratio, no KL term, tight
# clipping. Values only matter for which branch is taken; the kernels' traffic is the same.
LIGER_GSPO_KWARGS = dict(temperature=1.0, beta=0.0, eps_low=3e-4, eps_high=4e-4,
                         loss_type="grpo", importance_sampling_level="sequence", reduce=True)
# importance_sampling_level: "sequence" (GSPO: liger_gspo) or "token" (GRPO: liger_grpo_token);
# Liger's token-level backward reads every counted row whatever is clipped, so the clip values
# above do not change its traffic
LIGER_LEVELS = ("sequence", "token")
# The same setting for Liger's chunked fused-linear GRPO loss (liger-kernel 0.8.5,
# liger_kernel/chunked_loss/grpo_loss.py). beta=0 -> no reference model (use_ref_model=False);
# compiled (torch.compile of the loss math, default True) is left at Liger's default; chunk_size
# (sequences per chunk, default 1) is an argument of liger_fused_linear_module.
LIGER_FUSED_LINEAR_GSPO_KWARGS = dict(beta=0.0, use_ref_model=False, epsilon_low=3e-4,
                                      epsilon_high=4e-4, loss_type="grpo",
                                      importance_sampling_level="sequence", temperature=1.0)
# cut-cross-entropy's gradient filter: None = exact (no block skipped); CCE_DEFAULT_FILTER_EPS
# is its default ("high": blocks whose softmax gradient is below bf16 eps/32 are skipped), the
# setting its users run; only its Triton kernels (CUDA) filter
CCE_FILTER_EPS = None
CCE_DEFAULT_FILTER_EPS = "high"
IGNORE_INDEX = -100


def version(package: str) -> Optional[str]:
    try:
        from importlib.metadata import version as _version
        return _version(package)
    except Exception:  # noqa: BLE001 - not installed, or metadata missing
        return None


def versions() -> Dict[str, Optional[str]]:
    """The installed version of each peer package (None: not installed)."""
    return {name: version(name) for name in ("cut-cross-entropy", "trl", "liger-kernel",
                                             "transformers")}


def unavailable(peer: str) -> Optional[str]:
    """Why ``peer`` (cce, trl_head, liger, torch_lce) cannot run here, or None."""
    if peer not in PACKAGES:
        raise ValueError(f"unknown peer {peer!r}; known: {sorted(PACKAGES)}")
    if peer == "torch_lce":
        if not (hasattr(torch.nn.functional, "linear_cross_entropy")
                and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            return (f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy "
                    "with LinearCrossEntropyOptions (new in torch 2.13)")
        return None
    try:
        if peer == "cce":
            import cut_cross_entropy  # noqa: F401
        elif peer == "trl_head":  # its head and the trainer helpers (they import datasets)
            from trl.kernels import ChunkedLogProbFunction  # noqa: F401
            from trl.trainer.utils import add_fused_lm_head  # noqa: F401
        elif peer == "liger":
            import liger_kernel.chunked_loss  # noqa: F401
            import liger_kernel.transformers.grpo_loss  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure (a dependency's version check
        # raising ValueError too) means: not available here
        return f"{PACKAGES[peer]} not importable: {type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def matmul_precision(tf32: bool) -> Iterator[None]:
    """fp32 matmuls in TF32 ("high") or full fp32 ("highest", PyTorch's default) inside the
    block; the previous setting is restored after it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def eager_without_gpu(device: torch.device) -> Iterator[None]:
    """Without CUDA, the peers' internal ``torch.compile`` calls run eagerly (compiling C++ for
    the host would take minutes in CI and checks nothing of the GPU path); on CUDA nothing
    changes."""
    if device.type == "cuda":
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


# --------------------------------------------------------------------------------------------
# log-prob providers: hidden states + LM head -> per-token log-probs (then our O(N) loss)
# --------------------------------------------------------------------------------------------


def cce_kwargs(device: torch.device, filter_eps=CCE_FILTER_EPS,
               impl: str = "cce") -> Dict[str, object]:
    """cut-cross-entropy's ``impl`` (and ``filter_eps``: its Triton kernels only) on device.
    impl: "cce" (its Triton kernels on CUDA, its torch implementation elsewhere) or
    "torch_compile" (its torch implementation everywhere)."""
    if impl not in ("cce", "torch_compile"):
        raise ValueError(f"cut-cross-entropy impl {impl!r}: 'cce' or 'torch_compile'")
    if device.type == "cuda" and impl == "cce":
        return {"impl": "cce", "filter_eps": filter_eps}
    return {"impl": "torch_compile"}


def cce_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                 shift: bool = False, filter_eps=CCE_FILTER_EPS, impl: str = "cce"
                 ) -> torch.Tensor:
    """log p(target) from cut-cross-entropy's per-token linear cross-entropy (exact mode, or
    its gradient filter with ``filter_eps``, e.g. CCE_DEFAULT_FILTER_EPS; CUDA only).

    hidden: [..., H]; weight: [V, H]; targets: hidden's leading shape, IGNORE_INDEX (−100) where
    not counted. shift=True: position t predicts targets[..., t+1] (CCE's own shift, no copy),
    the result then has one position less. impl: ``cce_kwargs``. Returns float32 log-probs, 0
    where ignored.
    """
    from cut_cross_entropy import linear_cross_entropy

    kw = cce_kwargs(hidden.device, filter_eps, impl)
    with eager_without_gpu(hidden.device):
        nll = linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                   reduction="none", shift=shift, **kw)
    return -nll


def cce_extra(device: torch.device, filter_eps=CCE_FILTER_EPS,
              impl: str = "cce") -> Dict[str, object]:
    kw = cce_kwargs(device, filter_eps, impl)
    exact = "filter_eps" not in kw or kw["filter_eps"] is None  # torch_compile never filters
    return {"cce_impl": kw["impl"],
            "cce_filter_eps": "exact (None)" if exact else
            f"{filter_eps!r} (its default: gradient blocks below the threshold skipped)",
            "cut_cross_entropy": version("cut-cross-entropy")}


def trl_chunk_size() -> int:
    """The vocabulary tile GRPOTrainer's fused head uses (TRL's own constant)."""
    from trl.trainer import utils
    return int(utils._CHUNKED_LOGPROB_CHUNK_SIZE)


def trl_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      counted: torch.Tensor) -> torch.Tensor:
    """log p(label) from TRL's chunked log-prob head, counted rows only.

    hidden: [..., H] aligned with labels [...] (position t's label is labels[t]); counted: bool,
    labels' shape. Returns float32 log-probs of labels' shape, 0 where not counted (TRL fills
    them the same way).
    """
    from trl.kernels import ChunkedLogProbFunction

    logprobs, *_ = ChunkedLogProbFunction.apply(hidden[counted], weight, None, labels[counted],
                                                1.0, trl_chunk_size(), None, 1.0,
                                                ("log_probs",))
    return logprobs.new_zeros(counted.shape).masked_scatter(counted, logprobs)


def trl_extra() -> Dict[str, object]:
    return {"trl": version("trl"), "trl_chunk_size": trl_chunk_size(),
            "trl_outputs": "log_probs"}


def torch_lce_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       counted: torch.Tensor) -> torch.Tensor:
    """log p(label) from PyTorch's chunked ``linear_cross_entropy`` (torch >= 2.13), counted
    rows only (it takes [N, H] rows; gathering the counted ones first spares it the others).

    hidden: [..., H] aligned with labels [...] (position t's label is labels[t]); counted: bool,
    labels' shape. Returns log-probs of labels' shape in hidden's dtype (its output dtype), 0
    where not counted.
    """
    nll = torch.nn.functional.linear_cross_entropy(
        hidden[counted], weight, labels[counted], reduction="none",
        options=torch.nn.LinearCrossEntropyOptions())
    return nll.new_zeros(counted.shape).masked_scatter(counted, -nll)


def torch_lce_extra(device: torch.device, dtype: torch.dtype) -> Dict[str, object]:
    """What the "auto" options resolve to on device and dtype (torch 2.13's table of
    per-(device, dtype) picks, or 2.14's rule), and the output dtype."""
    from torch.nn.modules import linear_cross_entropy_options as lce

    auto = None
    if hasattr(lce, "_AUTO_DEFAULTS"):  # torch 2.13: a table per (device, dtype)
        pick = lce._AUTO_DEFAULTS.get((device.type, dtype))
        if pick is not None:
            auto = f"acc_policy={pick.acc_policy}, chunking_method={pick.chunking_method}"
    elif hasattr(lce, "_auto_acc_policy"):  # torch 2.14: the policy by rule, "aspect_ratio"
        auto = (f"acc_policy={lce._auto_acc_policy(device.type, dtype)}, "
                "chunking_method=aspect_ratio (auto)")
    return {"torch_lce_options": "LinearCrossEntropyOptions() (auto)",
            "torch_lce_auto": auto,
            "torch_lce_logprob_dtype": str(dtype).replace("torch.", "")}


# --------------------------------------------------------------------------------------------
# Liger-Kernel (GRPO/GSPO: Liger has no OPO)
# --------------------------------------------------------------------------------------------


def liger_grpo_logits(logits: torch.Tensor, old_logprobs: torch.Tensor, labels: torch.Tensor,
                      advantages: torch.Tensor, mask: torch.Tensor, inplace: bool = True,
                      level: str = "sequence") -> torch.Tensor:
    """Liger's ``triton_grpo_loss``: GSPO (level="sequence") or token-level GRPO
    (level="token"), ``LIGER_GSPO_KWARGS`` otherwise. logits: the model's whole [B, T+1, V]
    output (Liger drops the last position itself); old_logprobs, labels, mask: [B, T];
    advantages: [B]."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    if level not in LIGER_LEVELS:
        raise ValueError(f"importance_sampling_level {level!r}: one of {LIGER_LEVELS}")
    kw = dict(LIGER_GSPO_KWARGS, importance_sampling_level=level)
    loss, _metrics = triton_grpo_loss(logits, old_logprobs, None, labels, advantages, mask,
                                      inplace=inplace, **kw)
    return loss


def liger_fused_linear_module(chunk_size: int = 1):
    """Liger's ``LigerFusedLinearGRPOLoss`` with the GSPO setting; chunk_size: sequences per
    chunk (Liger's default 1; B: the whole batch in one chunk)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    return LigerFusedLinearGRPOLoss(chunk_size=chunk_size, **LIGER_FUSED_LINEAR_GSPO_KWARGS)


def liger_fused_linear_gspo(module, hidden: torch.Tensor, weight: torch.Tensor,
                            labels: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                            old_logprobs: torch.Tensor, tf32: bool) -> torch.Tensor:
    """The loss of ``module`` (``liger_fused_linear_module()``): hidden [B, T, H] aligned with
    labels/mask/old_logprobs [B, T]; its forward computes the gradients too (chunk by chunk),
    backward only returns them. tf32: the fp32 matmul precision of the call."""
    with matmul_precision(tf32), eager_without_gpu(hidden.device):
        loss, _metrics = module(hidden, weight, labels, mask, advantages, bias=None,
                                old_per_token_logps=old_logprobs)
    return loss


def liger_extra(module=None) -> Dict[str, object]:
    extra: Dict[str, object] = {"liger_kernel": version("liger-kernel")}
    if module is not None:
        extra.update(liger_chunk_size=module.chunk_size, liger_compiled=module.compiled)
    return extra


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO advantages (Liger's input): rewards normalized in consecutive groups,
    (r − mean) / (std + 1e-4), std unbiased. rewards: [B] with B a multiple of group_size."""
    grouped = rewards.float().view(-1, group_size)
    adv = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1)
