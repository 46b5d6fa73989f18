"""Benchmark harness: a Session measures the cases and keeps the results file up to date.

Its parts, one concern per module: ``cases`` (implementations, shapes, settings), ``inputs``
(random inputs of a row), ``runners`` (one step() per implementation), ``counts`` (bytes, FLOP
floor, memory estimates), ``timers`` (CUDA events, copy bandwidth, matmul rate, peak memory),
``results`` (environment, schema, writer). This module re-exports their names, so the suite
reads ``harness.Shape``, ``harness.byte_counts``, ... from one place.

One measured row = forward + backward of ONE loss call (``torch.autograd.grad(loss, logits)``)
at one shape, for one implementation:

  opo_kernels          opo_kernels.opo_loss(backend="triton", validate=False)
  opo_kernels_inplace  the same with inplace_backward=True (gradient written into the logits)
  torch_compiled       the strong-torch OPO under torch.compile (benchmarks/peers_torch.py): the
                       headline's torch denominator
  eager                opo_kernels.reference.opo_loss, "reference (readable, slow)": plain
                       PyTorch written to be read (fp32 log-softmax of the counted rows)
  compile              torch.compile(reference.opo_loss) (graph breaks at nonzero are recorded)
  liger_gspo           Liger-Kernel triton_grpo_loss(importance_sampling_level="sequence"),
                       its default inplace=True; padded layout only (GSPO: Liger has no OPO);
                       3 reads + 1 write of the logits
  liger_grpo_token     the same at importance_sampling_level="token" (GRPO), 2 reads + 1 write:
                       Liger's fastest mode on the logits
  liger_ce             Liger-Kernel liger_cross_entropy (fused CE fwd+bwd): bandwidth anchor
  liger_gspo_noinplace (opt-in) liger_gspo with inplace=False
  opo_kernels_model_slice   opo_kernels at the target shape with the gradient taken w.r.t. the
                       model's whole [B, T+1, V] output, the loss fed its [:, :-1] slice, as a
                       training loop does (autograd's slice backward runs)
  opo_kernels_grad_to_base  the same with grad_to_base=True (no slice backward)

Fused-linear rows: forward + backward from hidden states, gradients for hidden AND weight
(``torch.autograd.grad(loss, (hidden, weight))``), at their own shapes (Shape with H set):
padded B=16, T=1024, H=4096, V=128256 (11,469 of 16,384 positions counted) and packed
N=4096, H=4096, V=128256 (every row counted):

  opo_kernels_fused_linear            fused_linear_opo_loss(backend="triton", validate=False,
                                      logits_budget=0): the general mode with every logit
                                      recomputed, as its 4-matmul floor counts it
  opo_kernels_fused_linear_on_policy  the same with ref_logprobs=None (one-phase mode, the
                                      default budget)
  opo_kernels_fused_linear_budget     the same with logits_budget= every row's logits (held
                                      from forward to backward; skipped without the keyword)
  opo_kernels_materialized  logits = hidden @ weight.T materialized, then opo_loss
  cce                       cut-cross-entropy's per-token NLL (exact mode) -> log-probs ->
                            opo_loss_from_logprobs (benchmarks/peers.py)
  cce_torch_compile         the same at its impl="torch_compile" (CUDA only)
  trl_head                  TRL's chunked log-prob head (counted rows only) ->
                            opo_loss_from_logprobs
  torch_lce                 PyTorch's chunked linear_cross_entropy (torch >= 2.13, reduction
                            "none", "auto" options; counted rows only) -> log-probs ->
                            opo_loss_from_logprobs
  liger_fused_linear_gspo   Liger-Kernel LigerFusedLinearGRPOLoss (GSPO), its defaults
                            (chunk_size=1, compiled=True), fp32 matmuls at PyTorch's default
                            precision (TF32 off); packed rows go in as one sequence
  liger_fused_linear_gspo_tf32  the same with TF32 on (float32 matmul precision "high")
  liger_fused_linear_gspo_tf32_chunkB  ... and chunk_size = B (one chunk; padded only)
  cce_filtered              cce at its default filter_eps="high" (CUDA only)

These rows also get ``floor_ms``: the matmuls of the implementation's own mode
(``cases.LINEAR_FLOOR_MATMULS``: 4 = logits, logits again in backward, ∂hidden, ∂weight; 3
on-policy or with the logits held / materialized) of 2·N·H·V FLOPs each, N the COUNTED tokens,
at the bf16 matmul rate measured once per run (``matmul_tflops``, top level, quoted as used);
``x_floor`` = ms / floor_ms.

Timing (benchmarks/NOTES.md): on CUDA ONE loop for every implementation (``timers.time_cuda``):
CUDA events around one call, L2 flushed and the device synchronized before it, so the host
time of the call counts for every implementation alike; implementations that overwrite their
input (in-place gradient) get it restored from a pristine copy before the flush, outside the
events. Without CUDA (the tiny CPU mode for tests) a host clock is used.

Bytes: every row is credited with the same minimum byte count, 2 reads + 1 write of the
counted logits, 3·N·V·itemsize (+ the small per-token vectors), so "GB/s" is an *effective*
bandwidth, comparable across implementations (it is proportional to 1/time). Fused-linear rows
(compute-bound: read them by x_floor, not GB/s): one read of hidden and weight and one write of
their gradients, 2·(rows + V)·H·itemsize (+ the small vectors).

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

import gc
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks import peers

# re-exported (see the docstring); the explicit imports are what Session itself uses
from benchmarks.cases import *  # noqa: F401,F403
from benchmarks.cases import (
    COUNTED_FRACTION,
    GROUP_SIZE,
    HOST_TIME_MAX_N,
    LINEAR_FLOOR_MATMULS,
    Case,
    Settings,
    Shape,
    cuda_ok,
    interpreter_on,
    resolve_out_dir,
)
from benchmarks.counts import *  # noqa: F401,F403
from benchmarks.counts import (
    MEMORY_FRACTION,
    MEMORY_MARGIN,
    byte_counts,
    linear_flops,
    memory_estimate,
)
from benchmarks.host_overhead import CAPTURABLE, replay_ms
from benchmarks.inputs import *  # noqa: F401,F403
from benchmarks.inputs import make_inputs, make_linear_inputs
from benchmarks.results import *  # noqa: F401,F403
from benchmarks.results import (
    METHOD_NOTE,
    case_key,
    environment,
    load_resumable,
    row_key,
    slug,
    write_json,
)
from benchmarks.runners import *  # noqa: F401,F403
from benchmarks.runners import build_runner
from benchmarks.timers import *  # noqa: F401,F403
from benchmarks.timers import copy_bandwidth, matmul_rate, measure_peak, time_cuda, time_host


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
        old = load_resumable(path, self.data["device"])
        for row in old.get("rows", []):
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
        reason = self._peer_reason(case)
        if reason:
            return reason
        if self.device.type == "cuda":
            inputs, extra = memory_estimate(case)
            total = torch.cuda.get_device_properties(self.device).total_memory
            need = (inputs + extra) * MEMORY_MARGIN
            if need > MEMORY_FRACTION * total:
                return (f"estimated {need / 2**30:.1f} GiB (inputs {inputs / 2**30:.1f} + "
                        f"extra {extra / 2**30:.1f}, x{MEMORY_MARGIN}) > {MEMORY_FRACTION:.0%} "
                        f"of {total / 2**30:.1f} GiB")
        return None

    def _peer_reason(self, case: Case) -> Optional[str]:
        """Why an implementation cannot run here (package missing, needs CUDA), or None."""
        impl, cuda = case.impl, self.device.type == "cuda"
        if impl == "opo_kernels_fused_linear_budget":
            from benchmarks.runners import logits_budget_supported
            if not logits_budget_supported():
                return "fused_linear_opo_loss has no logits_budget= in this opo_kernels"
        if impl == "cce_filtered" and not cuda:
            return "cut-cross-entropy filters gradient blocks in its Triton kernels only (CUDA)"
        if impl == "cce_torch_compile" and not cuda:
            return ("a CUDA row: without CUDA the cce row already runs cut-cross-entropy's "
                    "impl=\"torch_compile\"")
        if impl == "torch_lce":
            return peers.unavailable("torch_lce")
        if impl in ("cce", "cce_filtered", "cce_torch_compile", "trl_head"):
            return peers.unavailable("trl_head" if impl == "trl_head" else "cce")
        if impl.endswith("_chunkB") and case.shape.layout != "padded":
            return ("packed rows go in as one sequence: chunk_size = B = 1 is "
                    "liger_fused_linear_gspo_tf32's own setting")
        if impl.startswith("liger_fused_linear"):
            return peers.unavailable("liger")
        if impl.startswith("liger"):
            if not cuda and not (self.settings.tiny and interpreter_on()):
                return "Liger-Kernel rows need CUDA (or tiny mode under TRITON_INTERPRET=1)"
            if impl != "liger_ce" and case.shape.layout != "padded":
                return "Liger triton_grpo_loss takes the padded layout [B, T+1, V] only"
            try:
                if impl == "liger_ce":
                    import liger_kernel.transformers.functional  # noqa: F401
                else:
                    import liger_kernel.transformers.grpo_loss  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - any import failure means: not available
                return f"liger-kernel not importable: {type(exc).__name__}: {exc}"
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
        host: Dict[str, float] = {}
        if dev.type == "cuda":
            timing = time_cuda(runner.step, setup)
            # host-time column: eager − CUDA-graph replay (the time the GPU waits for the host)
            if case.impl in CAPTURABLE and shape.N <= HOST_TIME_MAX_N and not shape.linear:
                replay = replay_ms(runner.step, setup)
                if replay is not None:
                    host = {"replay_ms": float(replay), "host_ms": float(timing.ms - replay)}
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
            row.update(self._linear_fields(shape, timing.ms, inp.rows, case.impl))
        row.update(runner.extra)
        row.update(host)
        if case.impl == "compile":
            row["graph_breaks"] = _graph_break_count() - graph_breaks
            self.data["compile_graph_breaks"] = _graph_break_reasons()
        self.data["rows"].append(row)
        self.write()
        return Outcome(row=row)

    def _linear_fields(self, shape: Shape, ms: float, rows: int, impl: str
                       ) -> Dict[str, object]:
        """H, the matmul floor of the implementation's own mode on the counted tokens
        (NOTES.md), the same over every row the layout holds, and the achieved rates."""
        rate = float(self.data["matmul_tflops"]) * 1e12  # FLOP/s, this run
        flops = linear_flops(shape, impl=impl)
        flops_rows = linear_flops(shape, rows, impl=impl)
        floor_ms = flops / rate * 1e3
        floor_rows_ms = flops_rows / rate * 1e3
        return {"H": shape.H, "matmul_tflops": float(self.data["matmul_tflops"]),
                "floor_matmuls": LINEAR_FLOOR_MATMULS[impl],
                "floor_ms": float(floor_ms), "x_floor": float(ms / floor_ms),
                "floor_ms_rows": float(floor_rows_ms), "x_floor_rows": float(ms / floor_rows_ms),
                "tflops": float(flops / (ms * 1e-3) / 1e12),
                "tflops_rows": float(flops_rows / (ms * 1e-3) / 1e12)}


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
