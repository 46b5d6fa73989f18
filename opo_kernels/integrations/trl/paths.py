"""Which loss path OPOTrainer runs (``OPOConfig.opo_loss_path``), decided once at construction.

The three paths compute the same loss and gradients (up to rounding). What they hold and
compute differs; per micro-batch of N counted completion tokens, hidden size H, vocabulary V,
16-bit compute (2 bytes), a "matmul" being one [N, H] × [H, V] product:

- "trl_fused_head": the fused LM head that TRL (>= 1.16) patches into the model, exactly as
  GRPOTrainer runs it, then ``opo_loss_from_logprobs`` (two small launches over [B, C]).
  TRL's head scores the counted positions in tiles of 4096 × 32768 logits (256 MiB) and
  holds, in its backward, fp32 accumulators for ∂W [V, H] (4·V·H bytes) and ∂hidden [N, H];
  4 matmuls (its backward recomputes the logits; its fp32 ∂W accumulator is read and written
  once per 4096 tokens). So this path holds and computes what GRPOTrainer's default holds
  and computes, plus O(N) for the OPO loss.
- "fused_linear": ``fused_linear_opo_loss`` on the final hidden states and the LM head's
  weight. Off-policy (the batch carries TRL's old log-probs) it keeps the logits of the
  first R_h of the R counted rows from forward to backward (``opo_logits_budget`` bytes) and
  recomputes the others in one chunk (<= 256 MiB) at a time; its backward writes ∂W once, in
  the weight's dtype, with an fp32 accumulator of [R, H] only: no [V, H] fp32 accumulator.
  With the default budget, min(the 256 MiB of TRL's tile, 4·V·H), it holds at most what TRL's
  head holds, and runs 4 − R_h/R matmuls instead of 4 and moves fewer bytes. On-policy (TRL's
  default schedule: no old log-probs) it runs one pass, 3 matmuls, but reads and writes an
  fp32 [V, H] accumulator once per chunk (8·V·H bytes on CUDA). With chunks no larger than
  TRL's tile, that traffic outweighs the saved matmul: at V = 151936, H = 896, a 256 MiB
  chunk holds 883 rows, whose accumulator pass moves 1.1 GB while their matmul is 0.24
  TFLOP, and an H100's data-sheet rates (3.35 TB/s, 989 dense bf16 TFLOP/s) make the pass the
  longer of the two (~0.33 against ~0.24 ms). Chunks of >= ~1200 rows (``opo_logits_budget``
  >= ~0.4 GB there) would make it faster than TRL's head while holding more than it;
  benchmarks/trainer_bench.py measures both settings.
- "logits": the model's completion logits [B, C, V] and ``opo_loss``. Holds the logits of
  every completion position, fp32 under accelerate's mixed precision (4·B·C·V bytes: 5 GB at
  8192 positions and V = 151936), and their gradient; 3 matmuls on all B·C positions. Works
  with any head and any logit transform.

"auto" (the default) takes, in order, the first that applies to the model and the setup:
off-policy schedules "fused_linear", "trl_fused_head", "logits"; on-policy schedules
"trl_fused_head", "fused_linear", "logits". So OPOTrainer holds and computes no more than
GRPOTrainer's default (TRL >= 1.16) on the same batch.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

LOSS_PATHS = ("auto", "fused_linear", "trl_fused_head", "logits")

# TRL 1.16's fused LM head (trl/kernels/chunked_logprob.py): tokens x vocabulary per tile
TRL_TILE = (4096, 32768)

# (exception type, message) of a path that cannot run here; None when it can
Problem = Optional[Tuple[type, str]]


def trl_fused_head_available() -> bool:
    """TRL's GRPOTrainer patches its fused LM head into the policy (TRL >= 1.16)."""
    try:
        from trl.trainer import grpo_trainer
    except ImportError:  # pragma: no cover - trl is a requirement of this integration
        return False
    return hasattr(grpo_trainer, "add_fused_lm_head")


def default_logits_budget(vocab: int, hidden: int, itemsize: int) -> int:
    """Bytes of logits the fused-linear loss may keep (off-policy) or put in one chunk
    (on-policy) by default in OPOTrainer: TRL's tile (256 MiB in 16 bits), and no more than
    the fp32 [V, H] weight-gradient accumulator TRL's head holds and the fused-linear
    backward does not (4·V·H bytes)."""
    return min(TRL_TILE[0] * TRL_TILE[1] * itemsize, 4 * vocab * hidden)


def off_policy_schedule(args, use_vllm: bool) -> bool:
    """Whether TRL computes old log-probs for the batches (GRPOTrainer's rule): a generation
    batch outlives one optimizer step, or vLLM's importance-sampling correction is on."""
    accumulation = args.gradient_accumulation_steps
    generate_every = getattr(args, "steps_per_generation", None) or accumulation
    generate_every *= getattr(args, "num_iterations", 1)
    correction = use_vllm and getattr(args, "vllm_importance_sampling_correction", False)
    return accumulation % generate_every != 0 or bool(correction)


def problem_of(check: Callable[[], None]) -> Problem:
    """Runs a check that raises when a path cannot run; returns (type, message) or None."""
    try:
        check()
    except (ValueError, NotImplementedError, TypeError) as err:
        return type(err), str(err)
    return None


def choose_path(requested: str, problems: dict, off_policy: bool = False
                ) -> Tuple[str, List[str]]:
    """(path, reasons): the path to run and, for "auto", why the paths before it in the order
    of its schedule (module docstring) were passed over: one "path: reason" per distinct
    reason, paths refused for the same reason named together ("trl_fused_head, fused_linear:
    ..."). problems: {path: Problem} for "fused_linear" and "trl_fused_head". A path named
    explicitly that cannot run raises its problem."""
    if requested not in LOSS_PATHS:
        raise ValueError(f"opo_loss_path must be one of {LOSS_PATHS}, got {requested!r}")
    if requested != "auto":
        problem = problems.get(requested)
        if problem is not None:
            kind, message = problem
            raise kind(message)
        return requested, []
    order = (("fused_linear", "trl_fused_head") if off_policy else
             ("trl_fused_head", "fused_linear"))
    passed_over = {}  # reason -> the paths refused for it, in order
    for path in order:
        problem = problems.get(path)
        if problem is None:
            break
        passed_over.setdefault(_reason(problem[1], path), []).append(path)
    else:
        path = "logits"
    return path, [f"{', '.join(paths)}: {reason}" for reason, paths in passed_over.items()]


def _reason(message: str, path: str) -> str:
    """A refusal's message as the reason of one path in a list: without the "OPOTrainer: "
    prefix, the path's own name ("opo_loss_path='<path>' is not supported here: ", which the
    list says) and the closing advice ("; set opo_loss_path=...")."""
    message = message.removeprefix("OPOTrainer: ")
    message = message.removeprefix(f"opo_loss_path={path!r} is not supported here: ")
    message = message.removeprefix(f"opo_loss_path={path!r} ")
    cut = message.rfind("; set opo_loss_path=")
    return message[:cut] if cut > 0 else message
