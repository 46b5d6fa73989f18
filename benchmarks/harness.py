"""Benchmark harness: shapes, inputs, implementations, timers, byte counts, results file.

One measured row = forward + backward of ONE loss call (``torch.autograd.grad(loss, logits)``)
at one shape, for one implementation:

  opo_kernels          opo_kernels.opo_loss(backend="triton", validate=False)
  opo_kernels_inplace  the same with inplace_backward=True (gradient written into the logits)
  eager                opo_kernels.reference.opo_loss (plain PyTorch, autograd backward)
  compile              torch.compile(reference.opo_loss) (graph breaks at nonzero are recorded)
  liger_gspo           Liger-Kernel triton_grpo_loss(importance_sampling_level="sequence"),
                       its default inplace=True; padded layout only
  liger_ce             Liger-Kernel liger_cross_entropy (fused CE fwd+bwd): bandwidth anchor
  liger_gspo_noinplace (opt-in) liger_gspo with inplace=False

Fused-linear rows (issue 4): forward + backward from hidden states, gradients for hidden [B, T, H]
AND weight [V, H] (``torch.autograd.grad(loss, (hidden, weight))``), at their own shapes (Shape
with H, B, T set; padded only):

  opo_kernels_fused_linear  opo_kernels.fused_linear_opo_loss(backend="triton", validate=False)
  opo_kernels_materialized  logits = hidden @ weight.T ([B, T, V] materialized), then
                            opo_kernels.opo_loss(backend="triton", validate=False)
  liger_fused_linear_gspo   Liger-Kernel LigerFusedLinearGRPOLoss(importance_sampling_level=
                            "sequence"), its defaults otherwise (chunk_size=1, compiled=True)

These rows also get ``floor_ms`` = 4 matmuls of 2·N·H·V FLOPs at the bf16 matmul rate measured
once per run (``matmul_tflops``, top level), and ``x_floor`` = ms / floor_ms (NOTES.md).

Timing (benchmarks/NOTES.md): on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed
before each run, median and 20/80 % quantiles). Implementations that overwrite their input
(in-place gradient) get the same event loop with the input restored from a pristine copy
before each run, outside the timed region, so every run sees the same random logits. Without
CUDA (the tiny CPU mode for tests) a host clock is used.

Bytes: every row is credited with the same minimum byte count, 2 reads + 1 write of the
counted logits, 3·N·V·itemsize (+ the small per-token vectors), so "GB/s" is an *effective*
bandwidth, comparable across implementations (it is proportional to 1/time). Fused-linear rows
(compute-bound: read them by x_floor, not GB/s): one read of hidden and weight and one write of
their gradients, 2·(B·T + V)·H·itemsize (+ the small vectors).

Settings come from the environment (``python -m benchmarks.run`` sets them):
  OPO_BENCH_TINY=1         tiny shapes (N=64, V=128; fused-linear B=2, T=8, H=16, V=64), host
                           clock without CUDA, temp output dir
  OPO_BENCH_OUT=DIR        where the results JSON goes (never benchmarks/results/ when tiny)
  OPO_BENCH_IMPLS=a,b      implementations to run (default: all but the opt-in ones); each
                           runs at the shapes of its kind (logits or fused-linear)
  OPO_BENCH_BUDGET_S=S     stop starting new rows after S seconds (rows left are skipped)
  OPO_BENCH_RESUME=FILE    keep the rows of an earlier results file, measure only the others
  OPO_BENCH_COMPILE_BACKEND  torch.compile backend (default inductor; "eager" when tiny on CPU)
  OPO_BENCH_COMMIT=SHA     commit to record when git is not available (the GPU machine)
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"

GROUP_SIZE = 6            # rollouts per prompt (the paper's run)
COUNTED_FRACTION = 0.7    # padded layout: ~70 % of the B·T positions are counted
MIN_LEN_FRACTION = 0.4    # sequence lengths uniform in [0.4·T, T] (mean 0.7·T)
REF_NOISE = 0.05          # ref_logprobs = current log-probs + N(0, 0.05²): small log-ratios

IMPLS = ("opo_kernels", "opo_kernels_inplace", "eager", "compile", "liger_gspo", "liger_ce")
# from hidden states: loss and gradients for hidden and weight (run at the fused-linear shapes)
LINEAR_IMPLS = ("opo_kernels_fused_linear", "opo_kernels_materialized", "liger_fused_linear_gspo")
OPTIONAL_IMPLS = ("liger_gspo_noinplace",)
DEFAULT_IMPLS = IMPLS + LINEAR_IMPLS
ALL_IMPLS = IMPLS + LINEAR_IMPLS + OPTIONAL_IMPLS
INPLACE_IMPLS = ("opo_kernels_inplace", "liger_gspo", "liger_ce")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

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

# Peak extra memory of the eager reference per counted logit element, measured on CPU
# (peak RSS minus RSS before the call, B=6, T=400, V=32000, bf16 and fp32 alike: 20.2 bytes
# per counted element, the returned gradient included). Used only to skip rows that cannot
# fit; rows that fit by this estimate but run out of memory are skipped with the OOM message.
EAGER_BYTES_PER_COUNTED_ELEMENT = 20
MEMORY_MARGIN = 1.1       # estimates are multiplied by this
MEMORY_FRACTION = 0.92    # of the device memory that a row may plan to use

# The bf16 matmul rate, measured once per run: [M, K] @ [K, N] (do_bench median on CUDA; a
# small one on the host clock in tiny CPU mode, only so that the fields exist).
MATMUL_SHAPE = (8192, 8192, 8192)
MATMUL_SHAPE_TINY = (256, 256, 256)
FLOOR_MATMULS = 4         # fused-linear floor: logits, logits again in backward, dhidden, dweight


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
        if self.linear:
            return f"B{self.B}-T{self.T}-H{self.H}-V{self.V}-{short}-{self.layout}"
        return f"N{self.N}-V{self.V}-{short}-{self.layout}"


def linear_shape(b: int, t: int, h: int, v: int, dtype: str = "bfloat16") -> Shape:
    """A fused-linear shape: padded [B, T], ~COUNTED_FRACTION of the positions counted."""
    return Shape(max(1, round(COUNTED_FRACTION * b * t)), v, dtype, "padded", H=h, B=b, T=t)


def is_linear_impl(impl: str) -> bool:
    return impl in LINEAR_IMPLS


@dataclass(frozen=True)
class Case:
    impl: str
    shape: Shape

    @property
    def id(self) -> str:
        return f"{self.impl}-{self.shape.label}"


# The target shape comes first so that a time-limited run measures it before anything
# else; then the other shapes at the largest vocabulary, and so on.
TARGET = Shape(16384, 151936, "bfloat16", "padded")
# Issue 4 (fused linear): Llama-3-8B-like LM head, B=16 sequences of T=1024, ~70 % counted
# (N = 11469), measured right after TARGET.
LINEAR_TARGET = linear_shape(16, 1024, 4096, 128256)


def linear_shapes(tiny: bool) -> List[Shape]:
    return [linear_shape(2, 8, 16, 64)] if tiny else [LINEAR_TARGET]


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
            if is_linear_impl(impl) == s.linear]


def resolve_out_dir(settings: Settings) -> Path:
    """The results folder. Tiny (CPU) results never go to benchmarks/results/."""
    if settings.out_dir is None:
        if settings.tiny:
            import tempfile
            return Path(tempfile.mkdtemp(prefix="opo-bench-tiny-"))
        return RESULTS_DIR
    out = settings.out_dir.resolve()
    if settings.tiny and (out == RESULTS_DIR or RESULTS_DIR in out.parents):
        raise ValueError(f"tiny-mode results must not be written under {RESULTS_DIR}: "
                         "they are not measurements of a GPU")
    return out


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def batch_geometry(shape: Shape) -> Tuple[int, int]:
    """(B, T): B a multiple of GROUP_SIZE, T so that B·T·COUNTED_FRACTION ≈ N (fused-linear
    shapes: their own B, T)."""
    if shape.B is not None:
        return shape.B, shape.T
    b = GROUP_SIZE * max(1, shape.N // 4096)
    t = math.ceil(shape.N / (COUNTED_FRACTION * b))
    return b, t


def sequence_lengths(n: int, b: int, t: int, gen: torch.Generator) -> List[int]:
    """b lengths in [1, t], drawn uniform in [0.4·t, t], then adjusted to sum exactly to n."""
    if n > b * t:
        raise ValueError(f"N={n} tokens do not fit in B={b} sequences of T={t}")
    lo = max(1, math.ceil(MIN_LEN_FRACTION * t))
    lengths = torch.randint(lo, t + 1, (b,), generator=gen).tolist()
    order = torch.randperm(b, generator=gen).tolist()
    diff = n - sum(lengths)
    while diff:
        for s in order:
            if diff > 0:
                step = min(diff, t - lengths[s])
            else:
                step = -min(-diff, lengths[s] - 1)
            lengths[s] += step
            diff -= step
            if not diff:
                break
    return lengths


@dataclass
class Inputs:
    """One row's inputs. ``storage`` is the big allocation; ``logits`` what the loss reads."""

    shape: Shape
    B: int
    T: int
    rows: int                     # logits rows the loss sees: B·T (padded) or N (packed)
    storage: torch.Tensor         # [B, T+1, V] padded | [N, V] packed | [rows, V] for CE
    logits: torch.Tensor          # [B, T, V] view storage[:, :-1] | [N, V]
    labels: torch.Tensor          # [B, T] | [N] int64
    ref_logprobs: torch.Tensor    # [B, T] | [N] float32
    rewards: torch.Tensor         # [B] float32
    advantages: torch.Tensor      # [B] float32: rewards normalized in their group (Liger)
    mask: Optional[torch.Tensor] = None      # [B, T] int64 0/1 (padded)
    seq_ids: Optional[torch.Tensor] = None   # [N] int64 (packed)
    targets: Optional[torch.Tensor] = None   # [rows] int64, -100 = ignored (CE)

    @property
    def storage_bytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()


@torch.no_grad()
@torch.no_grad()
def make_inputs(shape: Shape, device: torch.device, seed: int, for_ce: bool = False) -> Inputs:
    """Fresh random inputs (never zeros): logits ~ N(0, 1) in the shape's dtype, labels
    uniform in [0, V), ref_logprobs = the logits' own log-probs + small noise, rewards N(0,1).
    """
    from opo_kernels.reference import chunked_logprobs  # after the interpreter is set
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    n, v = shape.N, shape.V
    b, t = batch_geometry(shape)
    lengths = torch.tensor(sequence_lengths(n, b, t, cpu_gen))
    rewards = torch.randn(b, generator=cpu_gen)
    grouped = rewards.view(-1, GROUP_SIZE)
    advantages = ((grouped - grouped.mean(1, keepdim=True))
                  / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)

    def randn(*size):
        return torch.randn(*size, dtype=dtype, device=device, generator=dev_gen)

    if shape.layout == "padded":
        rows = b * t
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        labels = torch.randint(0, v, (b, t), generator=cpu_gen)
        if for_ce:  # Liger's cross entropy takes contiguous [rows, V]
            storage = randn(rows, v)
            logits = storage
        else:       # the model's [B, T+1, V]; the loss reads the view [:, :-1]
            storage = randn(b, t + 1, v)
            logits = storage[:, :-1]
        ref = chunked_logprobs(logits.view(b, t, v) if for_ce else logits, labels.to(device))
        ref = ref.cpu() + REF_NOISE * torch.randn(b, t, generator=cpu_gen)
        inp = Inputs(shape, b, t, rows, storage, logits, labels.to(device), ref.to(device),
                     rewards.to(device), advantages.to(device), mask=mask.to(device))
        if for_ce:
            inp.targets = torch.where(mask.reshape(-1) != 0, labels.reshape(-1), -100).to(device)
        return inp
    if shape.layout != "packed":
        raise ValueError(f"unknown layout {shape.layout!r}")
    storage = randn(n, v)
    labels = torch.randint(0, v, (n,), generator=cpu_gen)
    seq_ids = torch.repeat_interleave(torch.arange(b), lengths)
    ref = chunked_logprobs(storage, labels.to(device)).cpu() + REF_NOISE * torch.randn(
        n, generator=cpu_gen)
    inp = Inputs(shape, b, t, n, storage, storage, labels.to(device), ref.to(device),
                 rewards.to(device), advantages.to(device), seq_ids=seq_ids.to(device))
    if for_ce:
        inp.targets = inp.labels
    return inp


def group_ids_for(b: int) -> torch.Tensor:
    """Consecutive groups of GROUP_SIZE sequences; the last one smaller when GROUP_SIZE does
    not divide B (fused-linear B=16: groups of 6, 6, 4)."""
    return torch.arange(b) // GROUP_SIZE


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Rewards normalized within their group, (r - mean) / (std + 1e-4) (Liger's input);
    0 for a group of one."""
    out = torch.zeros_like(rewards)
    for g in torch.unique(group_ids).tolist():
        sel = group_ids == g
        r = rewards[sel]
        if r.numel() > 1:
            out[sel] = (r - r.mean()) / (r.std() + 1e-4)
    return out


@dataclass
class LinearInputs:
    """One fused-linear row's inputs (padded): hidden [B, T, H], weight [V, H]."""

    shape: Shape
    B: int
    T: int
    rows: int                     # token rows the matmuls see: B·T
    hidden: torch.Tensor          # [B, T, H] contiguous, the shape's dtype
    weight: torch.Tensor          # [V, H]
    labels: torch.Tensor          # [B, T] int64
    ref_logprobs: torch.Tensor    # [B, T] float32
    rewards: torch.Tensor         # [B] float32
    advantages: torch.Tensor      # [B] float32, normalized within the groups (Liger)
    mask: torch.Tensor            # [B, T] int64 0/1
    group_ids: torch.Tensor       # [B] int64

    @property
    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))


@torch.no_grad()
def make_linear_inputs(shape: Shape, device: torch.device, seed: int) -> LinearInputs:
    """Fresh random inputs: hidden ~ N(0, 1), weight ~ N(0, 1/H) (so the logits are ~ N(0, 1)
    like the logits rows'), labels uniform in [0, V), ref_logprobs = the logits' own log-probs
    + small noise (computed a sequence at a time, never [B, T, V] at once), rewards N(0, 1)."""
    from opo_kernels.reference import chunked_logprobs  # after the interpreter is set
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    b, t, h, v = shape.B, shape.T, shape.H, shape.V
    lengths = torch.tensor(sequence_lengths(shape.N, b, t, cpu_gen))
    rewards = torch.randn(b, generator=cpu_gen)
    group_ids = group_ids_for(b)
    advantages = group_advantages(rewards, group_ids)
    hidden = torch.randn(b, t, h, dtype=dtype, device=device, generator=dev_gen)
    weight = torch.randn(v, h, dtype=dtype, device=device, generator=dev_gen).mul_(h ** -0.5)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, v, (b, t), generator=cpu_gen).to(device)
    ref = torch.stack([chunked_logprobs(hidden[i] @ weight.t(), labels[i]) for i in range(b)])
    ref = ref.cpu() + REF_NOISE * torch.randn(b, t, generator=cpu_gen)
    return LinearInputs(shape, b, t, b * t, hidden, weight, labels, ref.to(device),
                        rewards.to(device), advantages.to(device), mask.to(device),
                        group_ids.to(device))


# --------------------------------------------------------------------------------------------
# Implementations: each gives step() = forward + backward of one call
# --------------------------------------------------------------------------------------------


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
        extra: Dict[str, object] = {"chunk_size": default_chunk_size(
            inp.rows, inp.shape.V, inp.shape.H, DTYPES[inp.shape.dtype])}
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
    if impl in ("opo_kernels", "opo_kernels_inplace", "eager", "compile"):
        leaf = inp.logits.detach().requires_grad_()  # a strided view for padded: not copied
        if impl.startswith("opo_kernels"):
            from opo_kernels import opo_loss
            inplace = impl == "opo_kernels_inplace"

            def loss_fn():
                return opo_loss(leaf, inp.labels, inp.ref_logprobs, inp.rewards,
                                group_size=GROUP_SIZE, backend="triton", validate=False,
                                inplace_backward=inplace, **kw)
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


# --------------------------------------------------------------------------------------------
# Byte counts and memory estimates
# --------------------------------------------------------------------------------------------


def byte_counts(shape: Shape, b: int, t: int) -> Dict[str, int]:
    """Minimum bytes of one forward+backward call (benchmarks/NOTES.md).

    effective: 2 reads + 1 write of the N counted logits rows, 3·N·V·itemsize, plus the small
               vectors (labels int64, ref_logprobs fp32, mask/seq_ids int64 per counted token,
               rewards fp32 per sequence). Every implementation is credited with this count.
    dense:     the padded layout's gradient is a dense [B, T, V] tensor, so its B·T rows are
               all written (zeros where not counted): 2·N·V·s + B·T·V·s (+ small vectors).
    """
    if shape.linear:
        return linear_byte_counts(shape)
    s = DTYPES[shape.dtype].itemsize
    n, v = shape.N, shape.V
    rows = b * t if shape.layout == "padded" else n
    small = n * (8 + 4 + 8) + b * 4
    return {"effective": 3 * n * v * s + small, "dense": 2 * n * v * s + rows * v * s + small}


def linear_byte_counts(shape: Shape) -> Dict[str, int]:
    """Fused-linear rows: hidden [B, T, H] and weight [V, H] read once, their gradients written
    once, in the input dtype: 2·(B·T + V)·H·itemsize, plus the small vectors (labels int64,
    ref_logprobs fp32, mask int64 per counted token; rewards fp32 and group ids int64 per
    sequence). No [N, V] term: a fused implementation need not move any logits through memory.
    The op is compute-bound (x_floor is its figure of merit); "dense" = "effective"."""
    s = DTYPES[shape.dtype].itemsize
    b, t, h, v, n = shape.B, shape.T, shape.H, shape.V, shape.N
    total = 2 * (b * t + v) * h * s + n * (8 + 4 + 8) + b * (4 + 8)
    return {"effective": total, "dense": total}


def linear_flops(shape: Shape, rows: Optional[int] = None) -> float:
    """FLOPs of the FLOOR_MATMULS matmuls of 2·rows·H·V each (rows: N counted tokens unless
    given, e.g. B·T for all rows of the padded layout)."""
    rows = shape.N if rows is None else rows
    return float(FLOOR_MATMULS * 2 * rows * shape.H * shape.V)


def memory_estimate(case: Case) -> Tuple[int, int]:
    """(bytes of the inputs incl. a pristine copy for in-place impls, extra bytes of a call)."""
    shape = case.shape
    s = DTYPES[shape.dtype].itemsize
    b, t = batch_geometry(shape)
    n, v = shape.N, shape.V
    rows = b * t if shape.layout == "padded" else n
    if shape.linear:
        h = shape.H
        inputs = (rows + v) * h * s
        extra = {
            # dhidden, fp32 dweight accumulator, one [V, H] product per chunk, the cast to
            # the dtype, one chunk of logits (<= 256 MiB)
            "opo_kernels_fused_linear": rows * h * s + v * h * (4 + 2 * s) + (256 << 20),
            # logits and their gradient [B, T, V], dhidden, dweight
            "opo_kernels_materialized": 2 * rows * v * s + rows * h * s + 2 * v * h * s,
            # per chunk fp32 dweight + its cast, the dtype accumulator, dhidden twice (list +
            # cat), fp32 [2048, 4096] vocab-chunk temporaries
            "liger_fused_linear_gspo": v * h * (4 + 2 * s) + 2 * rows * h * s + (256 << 20),
        }[case.impl]
        return inputs, extra
    if case.impl == "liger_ce":
        inputs = rows * v * s
    elif shape.layout == "padded":
        inputs = b * (t + 1) * v * s
    else:
        inputs = n * v * s
    if case.impl in INPLACE_IMPLS:
        inputs *= 2  # the pristine copy the timer restores from
    grad = rows * v * s
    extra = {
        "opo_kernels": grad, "opo_kernels_inplace": 0, "liger_gspo": 0, "liger_ce": 0,
        "liger_gspo_noinplace": b * (t + 1) * v * s,
        "eager": EAGER_BYTES_PER_COUNTED_ELEMENT * n * v,
        "compile": EAGER_BYTES_PER_COUNTED_ELEMENT * n * v,  # assumed like eager
    }[case.impl]
    return inputs, extra


# --------------------------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    ms: float       # median
    p20: float
    p80: float
    reps: int
    timer: str


def _quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_host(fn, setup=None, warmup: int = 1, reps: int = 3) -> Timing:
    """Host-clock fallback (no CUDA): median of `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(reps):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  reps, "host-clock")


def _events_once(fn, setup, flush: torch.Tensor) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if setup:
        setup()
    flush.zero_()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_cuda(fn, setup=None, warmup_ms: float = 25, rep_ms: float = 200,
              max_rep_ms: float = 4000, min_reps: int = 10) -> Timing:
    """CUDA-event median. Without setup: triton.testing.do_bench. With setup (restore the
    input of an in-place implementation): the same loop (L2 flushed, events around fn only)
    with setup() run before each timed call, outside the events.

    The repeat time is scaled to the call's duration: at least `min_reps` runs or `rep_ms`.
    """
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    est = statistics.median(_events_once(fn, setup, flush) for _ in range(3))
    warmup = max(warmup_ms, 3 * est)
    rep = min(max(rep_ms, min_reps * est), max(max_rep_ms, 3 * est))
    if setup is None:
        from triton.testing import do_bench
        del flush
        med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8],
                                 return_mode="median")
        return Timing(float(med), float(p20), float(p80), max(1, int(rep / est)), "do_bench")
    for _ in range(max(1, int(warmup / est))):
        setup()
        fn()
    times = [_events_once(fn, setup, flush) for _ in range(max(3, int(rep / est)))]
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  len(times), "cuda-events+restore")


def copy_bandwidth(device: torch.device) -> Dict[str, float]:
    """Device-to-device copy, bytes read + bytes written over the median time."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info()
        nbytes = int(min(2 << 30, free // 4))
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t = time_cuda(lambda: dst.copy_(src))
        del src, dst
        torch.cuda.empty_cache()
    else:
        nbytes = 64 << 20
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        t = time_host(lambda: dst.copy_(src), warmup=2, reps=5)
    return {"copy_gbps": 2 * nbytes / (t.ms * 1e-3) / 1e9, "copy_bytes": 2 * nbytes,
            "copy_ms": t.ms, "copy_timer": t.timer}


def matmul_rate(device: torch.device) -> Dict[str, object]:
    """The bf16 matmul rate of this device: 2·M·N·K FLOPs over the median time of one
    torch.matmul([M, K], [K, N]) (do_bench on CUDA; host clock, small shape, without CUDA)."""
    m, n, k = MATMUL_SHAPE if device.type == "cuda" else MATMUL_SHAPE_TINY
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, dtype=torch.bfloat16, device=device, generator=gen)
    b = torch.randn(k, n, dtype=torch.bfloat16, device=device, generator=gen)
    if device.type == "cuda":
        t = time_cuda(lambda: torch.matmul(a, b))
    else:
        t = time_host(lambda: torch.matmul(a, b), warmup=1, reps=5)
    return {"matmul_tflops": 2 * m * n * k / (t.ms * 1e-3) / 1e12, "matmul_shape": [m, n, k],
            "matmul_dtype": "bfloat16", "matmul_ms": t.ms, "matmul_timer": t.timer}


def measure_peak(runner: Runner, setup, device: torch.device) -> int:
    """Peak allocated bytes during one call, above what was allocated before it (inputs,
    pristine copy). -1 without CUDA (not measured)."""
    if device.type != "cuda":
        return -1
    if setup:
        setup()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


# --------------------------------------------------------------------------------------------
# Environment and results file
# --------------------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            sha = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=ROOT, capture_output=True, text=True, timeout=10)
            return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def device_name(device: torch.device, tiny: bool) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-tiny" if tiny else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def environment(device: torch.device, settings: Settings) -> Dict[str, object]:
    import triton
    env: Dict[str, object] = {
        "device": device_name(device, settings.tiny),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": settings.commit or git_commit(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "liger_kernel": liger_version(),
        "tiny": settings.tiny,
        "triton_interpret": interpreter_on(),
        "compile_backend": settings.compile_backend,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["sm_count"] = int(props.multi_processor_count)
    return env


METHOD_NOTE = (
    "ms: median of CUDA-event timings of forward+backward of one loss call "
    "(torch.autograd.grad(loss, logits)); L2 flushed before each run; in-place impls restored "
    "from a pristine copy outside the timed region. gbps: effective, bytes = 3*N*V*itemsize "
    "(2 reads + 1 write of the counted logits) + small vectors, the same count for every impl. "
    "pct_copy: gbps / copy_gbps (device-to-device copy, read+write bytes, same run). "
    "peak_mem_bytes: max_memory_allocated during one call minus memory allocated before it "
    "(inputs). Fused-linear rows (H set): forward+backward incl. grads of hidden and weight; "
    "bytes = 2*(B*T+V)*H*itemsize + small vectors; floor_ms = 4 matmuls of 2*N*H*V FLOPs "
    "(N counted tokens) at matmul_tflops (bf16 torch.matmul measured in the same run), "
    "x_floor = ms/floor_ms; floor_ms_rows/x_floor_rows the same with B*T rows. "
    "See benchmarks/NOTES.md."
)


def write_json(path: Path, data: Dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


ROW_KEYS = ("impl", "N", "V", "dtype", "layout")


def row_key(row: Dict[str, object]) -> Tuple:
    return tuple(row[k] for k in ROW_KEYS) + (row.get("H"),)


def case_key(case: Case) -> Tuple:
    s = case.shape
    return (case.impl, s.N, s.V, s.dtype, s.layout, s.H)


REQUIRED = {"device": str, "torch": str, "triton": str, "commit": str, "copy_gbps": float,
            "rows": list}
ROW_REQUIRED = {"impl": str, "N": int, "V": int, "dtype": str, "layout": str, "ms": float,
                "gbps": float, "peak_mem_bytes": int}
LINEAR_ROW_REQUIRED = {"H": int, "B": int, "T": int, "floor_ms": float, "x_floor": float}


def validate_results(data: Dict[str, object]) -> None:
    """Raises ValueError if `data` does not follow the results schema (NOTES.md)."""
    for key, typ in REQUIRED.items():
        if not isinstance(data.get(key), typ):
            raise ValueError(f"results: {key!r} must be {typ.__name__}, got {data.get(key)!r}")
    for i, row in enumerate(data["rows"]):
        required = dict(ROW_REQUIRED)
        if row.get("impl") in LINEAR_IMPLS:
            required.update(LINEAR_ROW_REQUIRED)
            if not isinstance(data.get("matmul_tflops"), float):
                raise ValueError("results: fused-linear rows need the top-level "
                                 f"'matmul_tflops' (float), got {data.get('matmul_tflops')!r}")
        for key, typ in required.items():
            val = row.get(key)
            if typ is int and isinstance(val, bool) or not isinstance(val, typ):
                raise ValueError(f"results: rows[{i}][{key!r}] must be {typ.__name__}, "
                                 f"got {val!r}")
        if row["impl"] not in ALL_IMPLS:
            raise ValueError(f"results: rows[{i}] has unknown impl {row['impl']!r}")
        if row["dtype"] not in DTYPES or row["layout"] not in ("padded", "packed"):
            raise ValueError(f"results: rows[{i}] has bad dtype/layout")


@dataclass
class Outcome:
    row: Optional[Dict[str, object]] = None
    skip: Optional[str] = None
    error: Optional[str] = None


class Session:
    """One benchmark run: measures cases and keeps the results file up to date after each."""

    def __init__(self, settings: Optional[Settings] = None):
        self.settings = settings or Settings.from_env()
        self.device = torch.device("cuda") if cuda_ok() else torch.device("cpu")
        if self.device.type != "cuda" and not self.settings.tiny:
            raise RuntimeError("the full benchmark grid needs a CUDA GPU (TRITON_INTERPRET "
                               "unset); use tiny mode (OPO_BENCH_TINY=1 / --tiny) on a CPU")
        self.out_dir = resolve_out_dir(self.settings)
        self.started = time.monotonic()
        env = environment(self.device, self.settings)
        self.path = self.out_dir / f"{slug(str(env['device']))}.json"
        self.data: Dict[str, object] = dict(env)
        self.data.update(copy_bandwidth(self.device))
        self.data.update(matmul_rate(self.device))
        self.data.update({"method": METHOD_NOTE, "group_size": GROUP_SIZE,
                          "counted_fraction": COUNTED_FRACTION, "rows": [], "skipped": [],
                          "errors": [], "compile_graph_breaks": []})
        self.done = set()
        if self.settings.resume:
            self._resume(self.settings.resume)
        self.write()

    def _resume(self, path: Path) -> None:
        old = json.loads(Path(path).read_text(encoding="utf-8"))
        if old.get("device") != self.data["device"]:
            raise ValueError(f"cannot resume {path}: it was measured on {old.get('device')!r}, "
                             f"this is {self.data['device']!r}")
        for row in old.get("rows", []):
            row.setdefault("run", "resumed")
            self.data["rows"].append(row)
            self.done.add(row_key(row))
        self.data["resumed_from"] = {"commit": old.get("commit"),
                                     "created_utc": old.get("created_utc"),
                                     "copy_gbps": old.get("copy_gbps"),
                                     "matmul_tflops": old.get("matmul_tflops")}

    def write(self) -> None:
        write_json(self.path, self.data)

    # ---- one case ----

    def skip_reason(self, case: Case) -> Optional[str]:
        if case_key(case) in self.done:
            return "already measured (resumed results file)"
        budget = self.settings.budget_s
        if budget is not None and time.monotonic() - self.started > budget:
            return f"time budget of {budget:.0f} s spent"
        if case.impl == "liger_fused_linear_gspo":
            if self.device.type != "cuda":
                return "Liger-Kernel fused-linear rows need CUDA"
            try:
                from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - any import failure means: not available
                return f"liger-kernel not importable: {type(exc).__name__}: {exc}"
        elif case.impl.startswith("liger"):
            if self.device.type != "cuda" and not (self.settings.tiny and interpreter_on()):
                return "Liger-Kernel rows need CUDA (or tiny mode under TRITON_INTERPRET=1)"
            if case.impl.startswith("liger_gspo") and case.shape.layout != "padded":
                return "Liger triton_grpo_loss takes the padded layout [B, T+1, V] only"
            try:
                if case.impl == "liger_ce":
                    import liger_kernel.transformers.functional  # noqa: F401
                else:
                    import liger_kernel.transformers.grpo_loss  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - any import failure means: not available
                return f"liger-kernel not importable: {type(exc).__name__}: {exc}"
        if self.device.type == "cuda":
            inputs, extra = memory_estimate(case)
            total = torch.cuda.get_device_properties(self.device).total_memory
            need = (inputs + extra) * MEMORY_MARGIN
            if need > MEMORY_FRACTION * total:
                return (f"estimated {need / 2**30:.1f} GiB (inputs {inputs / 2**30:.1f} + "
                        f"extra {extra / 2**30:.1f}, x{MEMORY_MARGIN}) > {MEMORY_FRACTION:.0%} "
                        f"of {total / 2**30:.1f} GiB")
        return None

    @staticmethod
    def _case_fields(case: Case) -> Dict[str, object]:
        s = case.shape
        fields: Dict[str, object] = {"impl": case.impl, "N": s.N, "V": s.V, "dtype": s.dtype,
                                     "layout": s.layout}
        if s.linear:
            fields.update(H=s.H, B=s.B, T=s.T)
        return fields

    def _record_skip(self, case: Case, reason: str) -> None:
        self.data["skipped"].append(dict(self._case_fields(case), reason=reason))
        self.write()

    def measure(self, case: Case, seed: int = 0) -> Outcome:
        reason = self.skip_reason(case)
        if reason:
            if not reason.startswith("already measured"):
                self._record_skip(case, reason)
            return Outcome(skip=reason)
        try:
            return self._measure(case, seed)
        except Exception as exc:  # noqa: BLE001 - OOM: skipped; else recorded, test fails
            msg = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower():
                # also when torch.compile / Triton wrap the allocator's error in their own
                reason = "out of memory: " + msg.strip().splitlines()[0][:300]
                self._record_skip(case, reason)
                return Outcome(skip=reason)
            self.data["errors"].append(dict(self._case_fields(case), error=msg[:2000],
                                            traceback=traceback.format_exc()[-4000:]))
            self.write()
            return Outcome(error=msg)
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _measure(self, case: Case, seed: int) -> Outcome:
        shape, dev = case.shape, self.device
        if shape.linear:
            inp = make_linear_inputs(shape, dev, seed)
        else:
            inp = make_inputs(shape, dev, seed, for_ce=case.impl == "liger_ce")
        runner = build_runner(case, inp, self.settings)
        pristine = inp.storage.clone() if runner.inplace else None

        def restore():
            with torch.no_grad():
                inp.storage.copy_(pristine)
        setup = restore if runner.inplace else None

        graph_breaks = _graph_break_count() if case.impl == "compile" else 0
        t0 = time.perf_counter()
        if setup:
            setup()
        runner.step()  # first call: JIT / torch.compile, outside the timings
        if dev.type == "cuda":
            torch.cuda.synchronize()
        first_call_s = time.perf_counter() - t0
        if dev.type == "cuda":
            timing = time_cuda(runner.step, setup)
        else:
            timing = time_host(runner.step, setup, warmup=0, reps=2)
        peak = measure_peak(runner, setup, dev)

        counts = byte_counts(shape, inp.B, inp.T)
        gbps = counts["effective"] / (timing.ms * 1e-3) / 1e9
        row: Dict[str, object] = {
            "impl": case.impl, "N": shape.N, "V": shape.V, "dtype": shape.dtype,
            "layout": shape.layout, "ms": float(timing.ms), "gbps": float(gbps),
            "peak_mem_bytes": int(peak),
            "pct_copy": float(100 * gbps / self.data["copy_gbps"]),
            "ms_p20": float(timing.p20), "ms_p80": float(timing.p80), "reps": timing.reps,
            "timer": timing.timer, "bytes": counts["effective"], "bytes_dense": counts["dense"],
            "gbps_dense": float(counts["dense"] / (timing.ms * 1e-3) / 1e9),
            "B": inp.B, "T": inp.T, "rows": inp.rows, "inplace": runner.inplace,
            "input_bytes": inp.storage_bytes, "first_call_s": round(first_call_s, 3),
        }
        if shape.linear:
            row.update(self._linear_fields(shape, timing.ms, inp.rows))
        row.update(runner.extra)
        if case.impl == "compile":
            row["graph_breaks"] = _graph_break_count() - graph_breaks
            self.data["compile_graph_breaks"] = _graph_break_reasons()
        self.data["rows"].append(row)
        self.write()
        return Outcome(row=row)

    def _linear_fields(self, shape: Shape, ms: float, rows: int) -> Dict[str, object]:
        """H, the matmul floor (NOTES.md) and the achieved matmul rate of a fused-linear row."""
        rate = float(self.data["matmul_tflops"]) * 1e12  # FLOP/s, this run
        floor_ms = linear_flops(shape) / rate * 1e3
        floor_rows_ms = linear_flops(shape, rows) / rate * 1e3
        return {"H": shape.H, "matmul_tflops": float(self.data["matmul_tflops"]),
                "floor_ms": float(floor_ms), "x_floor": float(ms / floor_ms),
                "floor_ms_rows": float(floor_rows_ms), "x_floor_rows": float(ms / floor_rows_ms),
                "tflops": float(linear_flops(shape) / (ms * 1e-3) / 1e12),
                "tflops_rows": float(linear_flops(shape, rows) / (ms * 1e-3) / 1e12)}


def _graph_break_count() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(sum(counters["graph_break"].values()))


def _graph_break_reasons() -> List[str]:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return []
    return sorted({str(k).strip().splitlines()[0][:200] for k in counters["graph_break"]})
