"""The timed steps and the results file of the step benchmark.

One step = ``loss = path.loss()`` (forward, head, loss), ``loss.backward()``,
``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``: what a trainer does per
micro-batch with one update per micro-batch. Every path is timed by the same clock:

  step_ms       CUDA events around the whole step, the device synchronized before each step
                (host time included, for every path alike); the median of ``steps`` steps after
                ``warmup`` untimed ones. Without CUDA: the host clock (no timing claim).
  loss_ms       the head + loss part of the same steps: from the end of the backbone's forward
                (an event recorded by a forward hook) to the moment the gradient of the
                backbone's output exists (a tensor hook): the LM head matmuls, the loss, their
                backward. The same boundary for every path (the hidden states), so the logits
                paths' LM head is inside it as the fused paths' is.
  peak_mem_bytes  max_memory_allocated during one more step, minus what was allocated before
                it: the models' parameters and optimizer states (each model's
                ``base_mem_bytes``; every model of the run stays resident) are not counted;
                the gradients, activations, logits and the loss's buffers are.
  tokens_per_s  B·L (every position of the micro-batch) over the step time;
                counted_tokens_per_s the same for the counted positions.
"""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks import peers
from benchmarks.cases import cuda_ok
from benchmarks.results import device_name, load_resumable, recorded_commit, slug, write_json
from benchmarks.step import grid, report
from benchmarks.step.batch import StepBatch, build_model, build_optimizer, make_batch
from benchmarks.step.paths import Unavailable, build_path
from benchmarks.timers import _quantile

SCHEMA = 1


class Clock:
    """Timestamps on the device stream (CUDA events) or the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @property
    def name(self) -> str:
        return "cuda-events (synchronized before each step)" if self.cuda else "host-clock"


class HeadTimer:
    """Marks the end of the backbone's forward and the arrival of its output's gradient (the
    head + loss part of a step), through hooks on ``model.base_model``."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        self.active = False
        self.marks: Dict[str, object] = {}
        self.handle = model.base_model.register_forward_hook(self._forward_hook)

    def _forward_hook(self, _module, _args, output):
        hidden = getattr(output, "last_hidden_state", None)
        if not self.active or hidden is None or not hidden.requires_grad:
            return
        self.marks["head_start"] = self.clock.mark()
        hidden.register_hook(self._grad_hook)

    def _grad_hook(self, _grad):
        self.marks["head_end"] = self.clock.mark()

    def remove(self) -> None:
        self.handle.remove()


class StepBench:
    """One run: builds each model once, each micro-batch once, and measures the paths in
    order, rewriting the results file after every row."""

    def __init__(self, settings: grid.Settings, out_dir: Path):
        self.settings = settings.check()
        self.device = torch.device("cuda") if cuda_ok() else torch.device("cpu")
        if self.device.type != "cuda" and not settings.tiny:
            raise RuntimeError("the step benchmark's full grid needs a CUDA GPU (TRITON_INTERPRET "
                               "unset); --tiny runs the CPU check")
        self.clock = Clock(self.device)
        self.started = time.monotonic()
        import transformers
        import triton
        dev = device_name(self.device, settings.tiny)
        self.path = Path(out_dir) / f"{slug(dev)}.step.json"
        self.data: Dict[str, object] = {
            "device": dev, "schema": SCHEMA, "kind": "rl_step",
            "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "peers": peers.versions(),
            "commit": settings.commit or recorded_commit(), "python": platform.python_version(),
            "tiny": settings.tiny,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "settings": {"seq_len": settings.seq_len, "prompt_len": settings.prompt_len,
                         "group_size": grid.GROUP_SIZE,
                         "counted_fraction": grid.COUNTED_FRACTION, "steps": settings.steps,
                         "warmup": settings.warmup, "grad_ckpt": settings.grad_ckpt,
                         "dtype": "bfloat16", "optimizer": "AdamW (fused on CUDA), lr 0",
                         "compile_backend": settings.compile_backend,
                         "paths": list(settings.paths),
                         "float32_matmul_precision": torch.get_float32_matmul_precision()},
            "timer": self.clock.name, "method": __doc__.split("\n\n", 1)[1].strip(),
            "models": {}, "rows": [], "skipped": [], "errors": [],
        }
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self.data["gpu_memory_bytes"] = int(props.total_memory)
        self.done = set()
        if settings.resume is not None:
            self._resume(Path(settings.resume))
        self.write()

    def _resume(self, path: Path) -> None:
        """Keeps the measured rows of an earlier results file of the same device (its models'
        records too); only the rows it lacks are measured."""
        old = load_resumable(path, self.data["device"])
        for row in old.get("rows", []):
            self.data["rows"].append(row)
            self.done.add((row["model"], row["tokens"], row["path"]))
        self.data["models"].update(old.get("models", {}))
        self.data["resumed_from"] = {"commit": old.get("commit"),
                                     "created_utc": old.get("created_utc")}

    def write(self) -> None:
        write_json(self.path, self.data)

    def out_of_time(self) -> bool:
        budget = self.settings.budget_s
        return budget is not None and time.monotonic() - self.started > budget

    # ---- the grid ----

    def run(self) -> Dict[str, object]:
        """Every model is built once and kept: the micro-batch sizes are the outer loop, so
        that a time-limited run measures the first size (the headline) on every model before
        the next size."""
        s = self.settings
        models: Dict[str, tuple] = {}
        try:
            for name in s.models:
                if not all((name, t, p) in self.done for t in s.tokens for p in s.paths):
                    models[name] = self._build(name)
            for tokens in s.tokens:
                for name, (model, opt, timer) in models.items():
                    todo = [p for p in s.paths if (name, tokens, p) not in self.done]
                    if not todo:
                        continue
                    if self.out_of_time():
                        for p in todo:
                            self._skip(name, tokens, p, report.TIME_SKIP)
                        continue
                    batch = make_batch(model, tokens, s.seq_len, s.prompt_len, seed=s.seed)
                    for path in todo:
                        self.measure(model, opt, batch, path, name, timer)
                    del batch
                    self._sync_gc()
        finally:
            for _model, _opt, timer in models.values():
                timer.remove()
            models.clear()
            self._sync_gc()
        return self.data

    def _build(self, name: str):
        """The model, its optimizer (state created) and head timer; its memory recorded."""
        s = self.settings
        cuda = self.device.type == "cuda"
        self._sync_gc()
        before = torch.cuda.memory_allocated() if cuda else 0
        model = build_model(name, self.device, s.grad_ckpt, seed=s.seed)
        opt = build_optimizer(model)
        self._sync_gc()
        base = torch.cuda.memory_allocated() - before if cuda else -1
        self.data["models"][name] = {
            "config": grid.MODELS[name][0], "params": sum(p.numel() for p in model.parameters()),
            "vocab": model.config.vocab_size, "hidden": model.config.hidden_size,
            "layers": model.config.num_hidden_layers, "base_mem_bytes": int(base)}
        self.write()
        return model, opt, HeadTimer(model, self.clock)

    def _sync_gc(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def _fields(self, model_name: str, tokens: int, path: str) -> Dict[str, object]:
        return {"model": model_name, "tokens": tokens, "path": path}

    def _skip(self, model_name: str, tokens: int, path: str, reason: str) -> None:
        self.data["skipped"].append(dict(self._fields(model_name, tokens, path), reason=reason))
        self.write()

    # ---- one row ----

    def measure(self, model, opt, batch: StepBatch, path: str, model_name: str,
                timer: HeadTimer) -> Optional[Dict[str, object]]:
        tokens = batch.B * batch.L
        if (model_name, tokens, path) in self.done:
            return None
        if self.out_of_time():
            self._skip(model_name, tokens, path, report.TIME_SKIP)
            return None
        try:
            lp = build_path(path, model, batch, self.settings.compile_backend)
            row = self._measure(model, opt, batch, lp, model_name, timer)
        except Unavailable as exc:
            self._skip(model_name, tokens, path, str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - OOM: skipped; anything else: recorded
            msg = f"{type(exc).__name__}: {exc}"
            opt.zero_grad(set_to_none=True)
            timer.active = False
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower():
                self._skip(model_name, tokens, path,
                           "out of memory: " + msg.strip().splitlines()[0][:300])
            else:
                self.data["errors"].append(dict(self._fields(model_name, tokens, path),
                                                error=msg[:2000],
                                                traceback=traceback.format_exc()[-4000:]))
                self.write()
            return None
        finally:
            self._sync_gc()
        self.data["rows"].append(row)
        self.write()
        return row

    def _step(self, lp, opt) -> torch.Tensor:
        loss = lp.loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def _measure(self, model, opt, batch: StepBatch, lp, model_name: str,
                 timer: HeadTimer) -> Dict[str, object]:
        clock, s = self.clock, self.settings
        t0 = time.perf_counter()
        first_loss = float(self._step(lp, opt))  # JIT / torch.compile / autotuning
        clock.sync()
        first_step_s = time.perf_counter() - t0
        if first_loss != first_loss:
            raise FloatingPointError(f"{lp.name}: the loss is NaN")
        for _ in range(s.warmup - 1):
            self._step(lp, opt)
        step_ms: List[float] = []
        head_ms: List[float] = []
        timer.active = True
        try:
            for _ in range(s.steps):
                clock.sync()
                timer.marks.clear()
                start = clock.mark()
                self._step(lp, opt)
                end = clock.mark()
                clock.sync()
                step_ms.append(clock.ms(start, end))
                if "head_start" in timer.marks and "head_end" in timer.marks:
                    head_ms.append(clock.ms(timer.marks["head_start"], timer.marks["head_end"]))
        finally:
            timer.active = False
        peak = self._peak(lp, opt)
        med = statistics.median(step_ms)
        head = statistics.median(head_ms) if len(head_ms) == len(step_ms) else None
        tokens = batch.B * batch.L
        row: Dict[str, object] = dict(
            self._fields(model_name, tokens, lp.name), B=batch.B, L=batch.L,
            counted=batch.counted, step_ms=med, step_ms_p20=_quantile(step_ms, 0.2),
            step_ms_p80=_quantile(step_ms, 0.8), steps=len(step_ms),
            loss_ms=head, loss_share=None if head is None else head / med,
            peak_mem_bytes=int(peak),
            base_mem_bytes=self.data["models"][model_name]["base_mem_bytes"],
            tokens_per_s=tokens / (med * 1e-3), counted_tokens_per_s=batch.counted / (med * 1e-3),
            loss=first_loss, first_step_s=round(first_step_s, 3), timer=clock.name)
        row.update(lp.extra)
        return row

    def _peak(self, lp, opt) -> int:
        """Peak bytes of one step above the memory held before it (model + optimizer state);
        -1 without CUDA."""
        if self.device.type != "cuda":
            return -1
        self._sync_gc()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self._step(lp, opt)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
