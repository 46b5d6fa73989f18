"""What the step benchmark measures: the models, the micro-batches, the loss paths, and the
run's settings.

Models are built from ``transformers`` configs with random weights (no download), bf16
parameters, AdamW, gradient checkpointing on (TRL's GRPOConfig default), as a GRPO/OPO run
loads them:

  qwen2.5-0.5b   Qwen2.5-0.5B's shape: V = 151936, H = 896, 24 layers, tied LM head
  llama-3.2-1b   Llama-3.2-1B's shape: V = 128256, H = 2048, 16 layers, tied LM head
  tiny           a 2-layer Qwen2 (V = 256, H = 32) for the CPU check

Micro-batches: sequences of SEQ_LEN = 512 positions (a prompt of 64 tokens, a completion of
random length, right padding), groups of GROUP_SIZE = 8, ~70 % of the B·L positions counted
(the completion tokens); 4096, 8192, 16384 tokens = 1, 2, 4 groups.

Paths (the head + loss part; the rest of the step is the same code for all):

  plain                      model logits -> fp32 log_softmax -> gather -> opo_loss_from_logprobs
  trl_head                   TRL's fused LM head (add_fused_lm_head, log-probs of the counted
                             positions only) -> opo_loss_from_logprobs
  cce                        cut-cross-entropy per-token NLL (exact mode) -> opo_loss_from_logprobs
  cce_filtered               the same in its default mode (filter_eps="high": gradient blocks
                             below the threshold skipped; CUDA only): its users' setting,
                             faster, an approximate gradient: shown, not in the targets
  torch_lce                  PyTorch's chunked linear_cross_entropy (torch >= 2.13; reduction
                             "none", its "auto" options) on the counted positions ->
                             opo_loss_from_logprobs
  liger_logits               model logits -> Liger triton_grpo_loss (GSPO; Liger has no OPO)
  liger_logits_token         the same at importance_sampling_level="token" (GRPO: one pass over
                             the logits less, Liger's fastest mode)
  liger_fused_linear         Liger LigerFusedLinearGRPOLoss (GSPO), its defaults: chunk_size=1,
                             fp32 matmuls as by default (TF32 off)
  liger_fused_linear_tf32    the same with TF32 on (float32 matmul precision "high")
  liger_fused_linear_tf32_chunkB  ... and chunk_size = B (the micro-batch in one chunk)
  torch_compiled             model logits -> the strong-torch OPO (benchmarks/peers_torch.py)
  opo_logits                 model logits -> opo_loss(logits[:, :-1], grad_to_base=True)
  opo_logits_inplace         the same with inplace_backward=True
  opo_fused_linear           fused_linear_opo_loss(hidden[:, :-1], lm_head.weight, ...)
  opo_fused_linear_on_policy the same with ref_logprobs=None (one update per batch)
  opo_fused_linear_budget    the same holding all logits (logits_budget=, when the installed
                             opo_kernels has it)

The OPO paths use the package's defaults (paper preset), group_size=8, validate=False,
backend="triton".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

SEQ_LEN = 512
PROMPT_LEN = 64
GROUP_SIZE = 8
COUNTED_FRACTION = 0.7
REF_NOISE = 0.05           # old log-probs = the model's own + N(0, 0.05²): small log-ratios
TOKENS = (8192, 4096, 16384)   # the headline micro-batch first (the outer loop of a run)

# transformers config class name and its arguments (the published models' shapes)
MODELS: Dict[str, Tuple[str, Dict[str, object]]] = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=32768)),
    "llama-3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072)),
    "tiny": ("Qwen2Config", dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=512)),
}
FULL_MODELS = ("qwen2.5-0.5b", "llama-3.2-1b")
TINY_SEQ_LEN, TINY_PROMPT_LEN, TINY_TOKENS = 16, 3, (128,)

PATHS = ("opo_fused_linear", "opo_fused_linear_on_policy", "opo_logits", "opo_logits_inplace",
         "plain", "trl_head", "cce", "torch_lce", "cce_filtered", "torch_compiled",
         "liger_logits",
         "liger_logits_token",
         "liger_fused_linear_tf32_chunkB", "liger_fused_linear_tf32", "liger_fused_linear",
         "opo_fused_linear_budget")
OURS = tuple(p for p in PATHS if p.startswith("opo_"))
PEERS = tuple(p for p in PATHS if not p.startswith("opo_"))
# every peer is given the old log-probs (the general mode's setting; Liger its off-policy ratio),
# so only our general-mode paths are compared with them as equals; the on-policy path
# (ref_logprobs=None: one update per batch) is another setting, reported beside them
OURS_ON_POLICY = tuple(p for p in OURS if p.endswith("_on_policy"))
OURS_GENERAL = tuple(p for p in OURS if p not in OURS_ON_POLICY)
# peer paths shown beside the others but kept out of the targets: not the same gradient
# (cce_filtered skips gradient blocks; torch_lce's per-token log-probs come in bf16 for a bf16
# model, so the log-ratios against fp32 old log-probs carry a bf16 rounding of each log-prob)
APPROXIMATE = ("cce_filtered", "torch_lce")
# the peers the targets compare with (those a "× best peer" ratio may name): plain is the naive
# baseline of "× plain", not a peer to beat at its strongest
TARGET_PEERS = tuple(p for p in PEERS if p not in APPROXIMATE)
RATED_PEERS = tuple(p for p in TARGET_PEERS if p != "plain")
# paths whose loss is the OPO loss; the Liger ones run GSPO. Checked against the reference but
# torch_lce, the OPO loss of bf16-rounded log-probs (tests/test_step_bench.py)
OPO_MATH = tuple(p for p in PATHS if not p.startswith("liger"))


@dataclass
class Settings:
    tiny: bool = False
    models: Tuple[str, ...] = FULL_MODELS
    tokens: Tuple[int, ...] = TOKENS
    paths: Tuple[str, ...] = PATHS
    seq_len: int = SEQ_LEN
    prompt_len: int = PROMPT_LEN
    steps: int = 10            # timed steps (median)
    warmup: int = 3            # untimed steps first (JIT, torch.compile, autotuning, allocator)
    grad_ckpt: bool = True
    budget_s: Optional[float] = None   # no new row starts after this many seconds
    resume: Optional[str] = None       # an earlier results file: its rows are kept
    compile_backend: str = "inductor"
    commit: Optional[str] = None       # None: results.recorded_commit() (OPO_BENCH_COMMIT or git)
    seed: int = 0
    extra: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def tiny_defaults(cls, **kw) -> Settings:
        base = dict(tiny=True, models=("tiny",), tokens=TINY_TOKENS, seq_len=TINY_SEQ_LEN,
                    prompt_len=TINY_PROMPT_LEN, steps=2, warmup=1, compile_backend="eager")
        base.update(kw)
        return cls(**base)

    def check(self) -> Settings:
        unknown = [p for p in self.paths if p not in PATHS]
        if unknown:
            raise ValueError(f"paths: unknown {unknown}; known: {list(PATHS)}")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ValueError(f"models: unknown {unknown}; known: {list(MODELS)}")
        if not 0 < self.prompt_len < self.seq_len:
            raise ValueError(f"prompt_len must be in (0, seq_len={self.seq_len}), got "
                             f"{self.prompt_len}")
        for t in self.tokens:
            if t % (self.seq_len * GROUP_SIZE):
                raise ValueError(f"tokens={t} is not a whole number of groups of {GROUP_SIZE} "
                                 f"sequences of seq_len={self.seq_len}")
        if self.steps < 1 or self.warmup < 1:
            raise ValueError(f"steps and warmup must be >= 1, got {self.steps}, {self.warmup}")
        return self
