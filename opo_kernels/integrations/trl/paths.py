"""Which loss path OPOTrainer runs (``OPOConfig.opo_loss_path``), decided once at construction.

The three paths compute the same loss and gradients (up to rounding); they differ in what the
trainer holds. Per micro-batch of N counted completion tokens, hidden size H, vocabulary V,
16-bit compute (b = 2 bytes):

- "fused_linear": ``fused_linear_opo_loss`` on the final hidden states and the LM head
  weight. Holds at most one chunk of logits (<= 256 MiB by default) plus O(N) statistics;
  gradient accumulators [V, H] (or [N, H]) in fp32. Matmuls of N×H×V: 3 on-policy (the
  logits and both gradients in one pass: TRL's default schedule), 4 off-policy (the backward
  recomputes the logits).
- "trl_fused_head": the fused LM head that TRL (>= 1.16) patches into the model, as
  GRPOTrainer uses it: per-token log-probs (and entropy) of the counted positions in tiles of
  4096 × 32768 logits (256 MiB in 16 bits), then ``opo_loss_from_logprobs``. Holds the tile,
  O(N) statistics and in its backward fp32 accumulators [V, H] and [N, H]. Matmuls: 4 (the
  backward always recomputes the logits). Applies the logit transforms TRL knows
  (``final_logit_softcapping``, ``logit_scale``...), and gathers a DeepSpeed ZeRO-3 head.
- "logits": the model's completion logits [B, C, V] and ``opo_loss``. Holds the logits —
  fp32 under accelerate's mixed precision (4·B·C·V bytes, plus their 16-bit original while
  the forward returns, plus the fp32 gradient in the backward): 5 GB of logits alone at 8192
  tokens and V = 151936. Matmuls: 3. Works with any head and any logit transform.

"auto" (the default) takes the first that applies, in this order: "fused_linear" (fewest
matmuls, smallest buffers), "trl_fused_head", "logits".
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

LOSS_PATHS = ("auto", "fused_linear", "trl_fused_head", "logits")

# (exception type, message) of a path that cannot run here; None when it can
Problem = Optional[Tuple[type, str]]


def trl_fused_head_available() -> bool:
    """TRL's GRPOTrainer patches its fused LM head into the policy (TRL >= 1.16)."""
    try:
        from trl.trainer import grpo_trainer
    except ImportError:  # pragma: no cover - trl is a requirement of this integration
        return False
    return hasattr(grpo_trainer, "add_fused_lm_head")


def problem_of(check: Callable[[], None]) -> Problem:
    """Runs a check that raises when a path cannot run; returns (type, message) or None."""
    try:
        check()
    except (ValueError, NotImplementedError, TypeError) as err:
        return type(err), str(err)
    return None


def choose_path(requested: str, problems: dict) -> Tuple[str, List[str]]:
    """(path, reasons): the path to run and, for "auto", why each path before it was passed
    over. problems: {path: Problem} for "fused_linear" and "trl_fused_head". A path named
    explicitly that cannot run raises its problem."""
    if requested not in LOSS_PATHS:
        raise ValueError(f"opo_loss_path must be one of {LOSS_PATHS}, got {requested!r}")
    if requested != "auto":
        problem = problems.get(requested)
        if problem is not None:
            kind, message = problem
            raise kind(message)
        return requested, []
    reasons = []
    for path in ("fused_linear", "trl_fused_head"):
        problem = problems.get(path)
        if problem is None:
            return path, reasons
        reasons.append(f"{path}: {_reason(problem[1])}")
    return "logits", reasons


def _reason(message: str) -> str:
    """A refusal's message as a reason in a list: without the "OPOTrainer: " prefix and the
    closing advice ("; set opo_loss_path=...")."""
    message = message.removeprefix("OPOTrainer: ")
    cut = message.rfind("; set opo_loss_path=")
    return message[:cut] if cut > 0 else message
