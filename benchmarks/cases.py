"""Benchmark grid: the implementations, shapes and cases, and the run's settings (read from
the environment; see ``benchmarks/harness.py`` for the variables)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"

GROUP_SIZE = 6            # rollouts per prompt (the paper's run)
COUNTED_FRACTION = 0.7    # padded layout: ~70 % of the B·T positions are counted
MIN_LEN_FRACTION = 0.4    # sequence lengths uniform in [0.4·T, T] (mean 0.7·T)
REF_NOISE = 0.05          # ref_logprobs = current log-probs + N(0, 0.05²): small log-ratios

# the loss fed a slice of the model's [B, T+1, V] output, as a training loop does, the gradient
# taken w.r.t. that output: autograd's slice backward runs, unless grad_to_base=True. At the
# first (target) shape only.
SLICE_IMPLS = ("opo_kernels_model_slice", "opo_kernels_grad_to_base")
# torch_compiled: the strong-torch OPO (benchmarks/peers_torch.py), the torch denominator of the
# headline; eager / compile: the package's reference, "reference (readable, slow)" in the tables
# liger_gspo: Liger's triton_grpo_loss at sequence level (GSPO, 3 reads + 1 write of the logits);
# liger_grpo_token: the same at token level (2 reads + 1 write, as ours), its fastest mode
IMPLS = ("opo_kernels", "opo_kernels_inplace", "torch_compiled", "eager", "compile",
         "liger_gspo", "liger_grpo_token", "liger_ce", *SLICE_IMPLS)
# from hidden states: loss and gradients for hidden and weight (run at the fused-linear shapes).
# budget: fused_linear_opo_loss holding every chunk's logits (logits_budget=, when it exists);
# cce / trl_head / torch_lce: the peer's per-token log-probs + opo_loss_from_logprobs
# (benchmarks/peers.py; torch_lce: PyTorch's own chunked linear_cross_entropy, torch >= 2.13);
# cce_torch_compile: cut-cross-entropy's torch.compile implementation (CUDA only; on the CPU cce
# is already that); liger_fused_linear_gspo_tf32_chunkB: Liger with TF32 on and chunk_size = B
# sequences (one chunk; padded only: packed rows go in as one sequence, so its default chunk
# is already the whole batch); cce_filtered: cut-cross-entropy at its default gradient filter
# (CUDA only), last: a setting whose gradient skips blocks, shown beside the exact comparison,
# not in the targets
LINEAR_IMPLS = ("opo_kernels_fused_linear", "opo_kernels_fused_linear_on_policy",
                "opo_kernels_fused_linear_budget", "opo_kernels_materialized", "cce",
                "cce_torch_compile", "trl_head", "torch_lce", "liger_fused_linear_gspo",
                "liger_fused_linear_gspo_tf32", "liger_fused_linear_gspo_tf32_chunkB",
                "cce_filtered")
# the matmuls of each fused-linear implementation's floor (2·N·H·V FLOPs each, N counted):
# logits, logits again in backward, ∂hidden, ∂weight; 3 when the backward need not recompute
# the logits (on-policy: the gradient is formed while a chunk's logits are in hand; logits
# held by the budget or materialized: cce_torch_compile keeps its logits for backward)
LINEAR_FLOOR_MATMULS = {"opo_kernels_fused_linear": 4, "opo_kernels_fused_linear_on_policy": 3,
                        "opo_kernels_fused_linear_budget": 3, "opo_kernels_materialized": 3,
                        "cce": 4, "cce_torch_compile": 3, "trl_head": 4, "torch_lce": 4,
                        "liger_fused_linear_gspo": 4, "liger_fused_linear_gspo_tf32": 4,
                        "liger_fused_linear_gspo_tf32_chunkB": 4, "cce_filtered": 4}
OPTIONAL_IMPLS = ("liger_gspo_noinplace",)
DEFAULT_IMPLS = IMPLS + LINEAR_IMPLS
ALL_IMPLS = IMPLS + LINEAR_IMPLS + OPTIONAL_IMPLS
INPLACE_IMPLS = ("opo_kernels_inplace", "liger_gspo", "liger_grpo_token", "liger_ce")
HOST_TIME_MAX_N = 4096   # rows that also get the host-time column (harness.py)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# Settings, shapes, cases
# --------------------------------------------------------------------------------------------


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def interpreter_on() -> bool:
    return _env("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_ok() -> bool:
    """Compiled kernels on a GPU (not the Triton interpreter)."""
    return torch.cuda.is_available() and not interpreter_on()


@dataclass(frozen=True)
class Shape:
    N: int          # counted tokens
    V: int
    dtype: str      # "bfloat16" | "float32"
    layout: str     # "padded" | "packed"
    # fused-linear shapes only (hidden [B, T, H], weight [V, H]): hidden size and the explicit
    # batch geometry; None for the logits shapes (B, T from batch_geometry)
    H: Optional[int] = None
    B: Optional[int] = None
    T: Optional[int] = None

    @property
    def linear(self) -> bool:
        return self.H is not None

    @property
    def label(self) -> str:
        short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[self.dtype]
        if self.linear and self.layout == "packed":
            return f"N{self.N}-H{self.H}-V{self.V}-{short}-{self.layout}"
        if self.linear:
            return f"B{self.B}-T{self.T}-H{self.H}-V{self.V}-{short}-{self.layout}"
        return f"N{self.N}-V{self.V}-{short}-{self.layout}"


def linear_shape(b: int, t: int, h: int, v: int, dtype: str = "bfloat16") -> Shape:
    """A fused-linear shape: padded [B, T], ~COUNTED_FRACTION of the positions counted."""
    return Shape(max(1, round(COUNTED_FRACTION * b * t)), v, dtype, "padded", H=h, B=b, T=t)


def linear_packed_shape(n: int, h: int, v: int, dtype: str = "bfloat16") -> Shape:
    """A packed fused-linear shape: hidden [N, H], every row counted, in GROUP_SIZE sequences
    (B) of lengths drawn as for the padded layout (T: the longest possible)."""
    b = GROUP_SIZE
    return Shape(n, v, dtype, "packed", H=h, B=b, T=math.ceil(n / (COUNTED_FRACTION * b)))


def is_linear_impl(impl: str) -> bool:
    return impl in LINEAR_IMPLS


@dataclass(frozen=True)
class Case:
    impl: str
    shape: Shape

    @property
    def id(self) -> str:
        return f"{self.impl}-{self.shape.label}"


# The headline shape comes first so that a time-limited run measures it before anything else;
# then the other shapes at the largest vocabulary, and so on.
TARGET = Shape(16384, 151936, "bfloat16", "padded")
# Fused linear: a Llama-3-8B-like LM head, B=16 sequences of T=1024, ~70 % counted
# (N = 11469), measured right after TARGET.
LINEAR_TARGET = linear_shape(16, 1024, 4096, 128256)
# Quack's linear cross-entropy shape: M = 4096 rows, all counted (packed)
LINEAR_PACKED = linear_packed_shape(4096, 4096, 128256)


def linear_shapes(tiny: bool) -> List[Shape]:
    if tiny:
        return [linear_shape(2, 8, 16, 64), linear_packed_shape(12, 16, 64)]
    return [LINEAR_TARGET, LINEAR_PACKED]


def shapes(tiny: bool) -> List[Shape]:
    if tiny:
        return [Shape(64, 128, "bfloat16", "padded"), Shape(64, 128, "bfloat16", "packed"),
                Shape(64, 128, "float32", "padded")]
    grid = [TARGET, Shape(16384, 151936, "bfloat16", "packed"),
            Shape(4096, 151936, "float32", "padded")]  # fp32 at one shape
    for v in (151936, 128256, 32000):
        for layout in ("padded", "packed"):
            for n in (4096, 16384, 32768):
                s = Shape(n, v, "bfloat16", layout)
                if s not in grid:
                    grid.append(s)
    # trainer micro-batch sizes (1k-4k tokens), where a call can be host-bound: with the
    # host-time column (eager − CUDA-graph replay, harness.py) for N <= HOST_TIME_MAX_N
    for v in (151936, 32000):
        for layout in ("padded", "packed"):
            for n in (1024, 2048):
                grid.append(Shape(n, v, "bfloat16", layout))
    return grid


@dataclass
class Settings:
    tiny: bool = False
    impls: Tuple[str, ...] = DEFAULT_IMPLS
    out_dir: Optional[Path] = None
    budget_s: Optional[float] = None
    resume: Optional[Path] = None
    compile_backend: str = "inductor"
    commit: Optional[str] = None

    @classmethod
    def from_env(cls) -> Settings:
        tiny = _env("OPO_BENCH_TINY", "0") not in ("", "0")
        impls = tuple(x for x in _env("OPO_BENCH_IMPLS").replace(" ", "").split(",") if x)
        unknown = [x for x in impls if x not in ALL_IMPLS]
        if unknown:
            raise ValueError(f"OPO_BENCH_IMPLS: unknown implementation(s) {unknown}; "
                             f"known: {list(ALL_IMPLS)}")
        out = _env("OPO_BENCH_OUT")
        budget = _env("OPO_BENCH_BUDGET_S")
        resume = _env("OPO_BENCH_RESUME")
        backend = _env("OPO_BENCH_COMPILE_BACKEND") or (
            "inductor" if (cuda_ok() or not tiny) else "eager")
        return cls(tiny=tiny, impls=impls or DEFAULT_IMPLS, out_dir=Path(out) if out else None,
                   budget_s=float(budget) if budget else None,
                   resume=Path(resume) if resume else None, compile_backend=backend,
                   commit=_env("OPO_BENCH_COMMIT") or None)


def cases(settings: Optional[Settings] = None) -> List[Case]:
    """The target shape first, then the fused-linear shape(s), then the other logits shapes;
    each implementation at the shapes of its kind."""
    settings = settings or Settings.from_env()
    grid = shapes(settings.tiny)
    ordered = grid[:1] + linear_shapes(settings.tiny) + grid[1:]
    return [Case(impl, s) for s in ordered for impl in settings.impls
            if is_linear_impl(impl) == s.linear and (impl not in SLICE_IMPLS or s == grid[0])]


def resolve_out_dir(settings: Settings) -> Path:
    """The results folder of a run's settings (``out_dir_for``)."""
    return out_dir_for(settings.out_dir, settings.tiny)


def out_dir_for(out_dir: Optional[Path], tiny: bool, prefix: str = "opo-bench-tiny-") -> Path:
    """The results folder: out_dir, else benchmarks/results/ (tiny: a new temp dir named
    prefix...). Tiny (CPU) results never go to benchmarks/results/: ValueError."""
    if out_dir is None:
        if tiny:
            import tempfile
            return Path(tempfile.mkdtemp(prefix=prefix))
        return RESULTS_DIR
    out = Path(out_dir).resolve()
    if tiny and (out == RESULTS_DIR or RESULTS_DIR in out.parents):
        raise ValueError(f"tiny-mode results must not be written under {RESULTS_DIR}: "
                         "they are not measurements of a GPU")
    return out
