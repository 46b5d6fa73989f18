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

Timing (benchmarks/NOTES.md): on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed
before each run, median and 20/80 % quantiles). Implementations that overwrite their input
(in-place gradient) get the same event loop with the input restored from a pristine copy
before each run, outside the timed region, so every run sees the same random logits. Without
CUDA (the tiny CPU mode for tests) a host clock is used.

Bytes: every row is credited with the same minimum byte count, 2 reads + 1 write of the
counted logits, 3·N·V·itemsize (+ the small per-token vectors), so "GB/s" is an *effective*
bandwidth, comparable across implementations (it is proportional to 1/time).

Settings come from the environment (``python -m benchmarks.run`` sets them):
  OPO_BENCH_TINY=1         tiny shapes (N=64, V=128), host clock without CUDA, temp output dir
  OPO_BENCH_OUT=DIR        where the results JSON goes (never benchmarks/results/ when tiny)
  OPO_BENCH_IMPLS=a,b      implementations to run (default: all but the opt-in ones)
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
OPTIONAL_IMPLS = ("liger_gspo_noinplace",)
INPLACE_IMPLS = ("opo_kernels_inplace", "liger_gspo", "liger_ce")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# Liger's GSPO setting as TRL documents it for GSPO: sequence-level ratio, no KL term, tight
# clipping. Values only matter for which branch is taken; the kernels' memory traffic is
# the same for any.
LIGER_GSPO_KWARGS = dict(temperature=1.0, beta=0.0, eps_low=3e-4, eps_high=4e-4,
                         loss_type="grpo", importance_sampling_level="sequence", reduce=True)

# Peak extra memory of the eager reference per counted logit element, measured on CPU
# (peak RSS minus RSS before the call, B=6, T=400, V=32000, bf16 and fp32 alike: 20.2 bytes
# per counted element, the returned gradient included). Used only to skip rows that cannot
# fit; rows that fit by this estimate but run out of memory are skipped with the OOM message.
EAGER_BYTES_PER_COUNTED_ELEMENT = 20
MEMORY_MARGIN = 1.1       # estimates are multiplied by this
MEMORY_FRACTION = 0.92    # of the device memory that a row may plan to use


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

    @property
    def label(self) -> str:
        short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[self.dtype]
        return f"N{self.N}-V{self.V}-{short}-{self.layout}"


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
    impls: Tuple[str, ...] = IMPLS
    out_dir: Optional[Path] = None
    budget_s: Optional[float] = None
    resume: Optional[Path] = None
    compile_backend: str = "inductor"
    commit: Optional[str] = None

    @classmethod
    def from_env(cls) -> Settings:
        tiny = _env("OPO_BENCH_TINY", "0") not in ("", "0")
        impls = tuple(x for x in _env("OPO_BENCH_IMPLS").replace(" ", "").split(",") if x)
        unknown = [x for x in impls if x not in IMPLS + OPTIONAL_IMPLS]
        if unknown:
            raise ValueError(f"OPO_BENCH_IMPLS: unknown implementation(s) {unknown}; "
                             f"known: {list(IMPLS + OPTIONAL_IMPLS)}")
        out = _env("OPO_BENCH_OUT")
        budget = _env("OPO_BENCH_BUDGET_S")
        resume = _env("OPO_BENCH_RESUME")
        backend = _env("OPO_BENCH_COMPILE_BACKEND") or (
            "inductor" if (cuda_ok() or not tiny) else "eager")
        return cls(tiny=tiny, impls=impls or IMPLS, out_dir=Path(out) if out else None,
                   budget_s=float(budget) if budget else None,
                   resume=Path(resume) if resume else None, compile_backend=backend,
                   commit=_env("OPO_BENCH_COMMIT") or None)


def cases(settings: Optional[Settings] = None) -> List[Case]:
    settings = settings or Settings.from_env()
    return [Case(impl, s) for s in shapes(settings.tiny) for impl in settings.impls]


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
    """(B, T): B a multiple of GROUP_SIZE, T so that B·T·COUNTED_FRACTION ≈ N."""
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
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 2048):
    """log softmax(logits)[label] in float32, by row chunks (bounded extra memory, and a
    strided [B, T, V] view is read in place, never copied whole).

    logits: [B, T, V] or [R, V]; labels: [B, T] or [R] int64. Returns labels' shape, float32.
    """
    if logits.dim() == 3:
        return torch.stack([token_logprobs(logits[i], labels[i], chunk)
                            for i in range(logits.shape[0])])
    out = torch.empty(labels.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, labels.shape[0], chunk):
        rows = logits[start:start + chunk].float()
        lse = torch.logsumexp(rows, dim=-1)
        out[start:start + chunk] = rows.gather(-1, labels[start:start + chunk, None])[:, 0] - lse
    return out


@torch.no_grad()
def make_inputs(shape: Shape, device: torch.device, seed: int, for_ce: bool = False) -> Inputs:
    """Fresh random inputs (never zeros): logits ~ N(0, 1) in the shape's dtype, labels
    uniform in [0, V), ref_logprobs = the logits' own log-probs + small noise, rewards N(0,1).
    """
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
        ref = token_logprobs(logits.view(b, t, v) if for_ce else logits, labels.to(device))
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
    ref = token_logprobs(storage, labels.to(device)).cpu() + REF_NOISE * torch.randn(
        n, generator=cpu_gen)
    inp = Inputs(shape, b, t, n, storage, storage, labels.to(device), ref.to(device),
                 rewards.to(device), advantages.to(device), seq_ids=seq_ids.to(device))
    if for_ce:
        inp.targets = inp.labels
    return inp


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


def build_runner(case: Case, inp: Inputs, settings: Settings) -> Runner:
    impl = case.impl
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
    s = DTYPES[shape.dtype].itemsize
    n, v = shape.N, shape.V
    rows = b * t if shape.layout == "padded" else n
    small = n * (8 + 4 + 8) + b * 4
    return {"effective": 3 * n * v * s + small, "dense": 2 * n * v * s + rows * v * s + small}


def memory_estimate(case: Case) -> Tuple[int, int]:
    """(bytes of the inputs incl. a pristine copy for in-place impls, extra bytes of a call)."""
    shape = case.shape
    s = DTYPES[shape.dtype].itemsize
    b, t = batch_geometry(shape)
    n, v = shape.N, shape.V
    rows = b * t if shape.layout == "padded" else n
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
    "(inputs). See benchmarks/NOTES.md."
)


def write_json(path: Path, data: Dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


ROW_KEYS = ("impl", "N", "V", "dtype", "layout")


def row_key(row: Dict[str, object]) -> Tuple:
    return tuple(row[k] for k in ROW_KEYS)


def case_key(case: Case) -> Tuple:
    s = case.shape
    return (case.impl, s.N, s.V, s.dtype, s.layout)


REQUIRED = {"device": str, "torch": str, "triton": str, "commit": str, "copy_gbps": float,
            "rows": list}
ROW_REQUIRED = {"impl": str, "N": int, "V": int, "dtype": str, "layout": str, "ms": float,
                "gbps": float, "peak_mem_bytes": int}


def validate_results(data: Dict[str, object]) -> None:
    """Raises ValueError if `data` does not follow the results schema (NOTES.md)."""
    for key, typ in REQUIRED.items():
        if not isinstance(data.get(key), typ):
            raise ValueError(f"results: {key!r} must be {typ.__name__}, got {data.get(key)!r}")
    for i, row in enumerate(data["rows"]):
        for key, typ in ROW_REQUIRED.items():
            val = row.get(key)
            if typ is int and isinstance(val, bool) or not isinstance(val, typ):
                raise ValueError(f"results: rows[{i}][{key!r}] must be {typ.__name__}, "
                                 f"got {val!r}")
        if row["impl"] not in IMPLS + OPTIONAL_IMPLS:
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
                                     "copy_gbps": old.get("copy_gbps")}

    def write(self) -> None:
        write_json(self.path, self.data)

    # ---- one case ----

    def skip_reason(self, case: Case) -> Optional[str]:
        if case_key(case) in self.done:
            return "already measured (resumed results file)"
        budget = self.settings.budget_s
        if budget is not None and time.monotonic() - self.started > budget:
            return f"time budget of {budget:.0f} s spent"
        if case.impl.startswith("liger"):
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

    def _record_skip(self, case: Case, reason: str) -> None:
        s = case.shape
        self.data["skipped"].append({"impl": case.impl, "N": s.N, "V": s.V, "dtype": s.dtype,
                                     "layout": s.layout, "reason": reason})
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
            s = case.shape
            self.data["errors"].append({"impl": case.impl, "N": s.N, "V": s.V, "dtype": s.dtype,
                                        "layout": s.layout, "error": msg[:2000],
                                        "traceback": traceback.format_exc()[-4000:]})
            self.write()
            return Outcome(error=msg)
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _measure(self, case: Case, seed: int) -> Outcome:
        shape, dev = case.shape, self.device
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
        row.update(runner.extra)
        if case.impl == "compile":
            row["graph_breaks"] = _graph_break_count() - graph_breaks
            self.data["compile_graph_breaks"] = _graph_break_reasons()
        self.data["rows"].append(row)
        self.write()
        return Outcome(row=row)


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
