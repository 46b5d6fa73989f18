"""Launch-config sweep of the row kernels (one device call): forward, backward and one-pass at
V ∈ {32000, 128256, 151936}, bf16 and fp32, N = 16384 rows, over BLOCK_V × num_warps × the
software-pipelining depth of the vocabulary loop (``stages``).

    python -m benchmarks.sweep [--out DIR] [--budget-s S]   # CUDA: JSON lines + best rows
    python -m benchmarks.sweep --focus [--out DIR]          # CUDA: the FOCUS list only
    python -m benchmarks.sweep --tiny [--focus]             # CPU (interpreter): same code, tiny
    python -m benchmarks.sweep --occupancy                  # CPU, no GPU: compiler's registers
                                                            # and shared memory per candidate

Each kernel runs through the package's own launchers (``row_launch.forward_rows`` /
``backward_rows``) with the launch config forced by ``row_launch.LAUNCH_OVERRIDE``, so what is
timed is what ``opo_loss`` launches. Per measurement: median time (``timers.time_cuda``, the
benchmark suite's one CUDA-event timer: L2 flushed, device synchronized before each call),
GB/s of the bytes the kernel must move (forward: N·V·itemsize read; backward and one-pass:
read + write) and % of the device-to-device copy bandwidth measured in the same run.
Before timing a config, its output is checked at the timed shape: log-probs of a sample of rows
against torch's float32 log-softmax, gradient rows against the closed form c·(onehot − p).
Candidates and the reasoning behind them: benchmarks/NOTES.md ("Launch configs").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.side_bench import environment
from benchmarks.timers import copy_bandwidth, time_cuda, time_host

# the target vocabulary first: a time-limited run (device_run.sh lease) measures it
SIZES = [151936, 128256, 32000]
DTYPES = ["bfloat16", "float32"]
# (BLOCK_V, num_warps, stages): the table as committed first, then NOTES.md's candidates
CONFIGS = [(8192, 16, 1), (4096, 4, 1), (8192, 8, 1), (4096, 8, 1), (2048, 4, 1),
           (16384, 16, 1), (16384, 8, 1), (32768, 32, 1), (8192, 4, 1), (4096, 2, 1),
           (8192, 16, 2), (4096, 8, 2), (8192, 8, 2), (4096, 4, 2)]
KINDS = ["fwd", "bwd", "onepass"]
TINY = dict(sizes=[200], dtypes=["bfloat16", "float32"], configs=[(64, 4, 1), (256, 4, 2)],
            rows=16)

# --focus: the question the last lease left (benchmarks/GPU_RUNS.md), bf16, V = 151936,
# N = 16384, as (kind, config, fraction of rows not counted). The 2026-12-04 second lease
# answered the earlier focus list (programs that loop over rows: all slower, 4.96-13.99 ms
# against 3.60 ms for one program per row; zero rows at ~93 % of copy).
# - Does the one-pass re-read hit L2 more when the gradient pass walks each row backwards
#   (LaunchConfig.reverse, 5th element)? One program per row keeps thousands of 297 KiB rows in
#   flight, so only each row's last few blocks can still be in L2 when the pass comes back;
#   walking backwards re-reads exactly those first. The bigger programs keep fewer rows in
#   flight (4 warps: ~16 programs per SM; 16 warps: ~4), so more of each row may be re-read
#   from L2, at the first pass's cost (the forward kernel alone lost 25 % with 16 warps).
# - The general mode's two kernels at the same all-counted rows, for the kernel-level
#   one-pass ÷ general ratio in the same run (the issue's ≥ 1.4× target).
FOCUS_V, FOCUS_DTYPE = 151936, "bfloat16"
FOCUS = [("onepass", (4096, 4, 1, 0, reverse), 0.0)
         for reverse in (False, True)]  # the committed config, both directions
FOCUS += [("onepass", (block, warps, 1, 0, reverse), 0.0)
          for block, warps in ((4096, 8), (8192, 8), (8192, 16), (16384, 16), (2048, 4))
          for reverse in (False, True)]
FOCUS += [("fwd", (4096, 2, 1), 0.0), ("bwd", (16384, 16, 1), 0.0)]
TINY_FOCUS = [("onepass", (64, 4, 1), 0.0), ("onepass", (64, 4, 1, 0, True), 0.0),
              ("onepass", (64, 4, 1, 1), 0.0),
              ("onepass", (64, 4, 1, 0.5), 0.0), ("bwd", (64, 4, 1), 0.3),
              ("fwd", (64, 4, 1, 2), 0.3)]


def _bench(fn, cuda: bool) -> float:
    """Median ms: the benchmark suite's CUDA timer (``timers.time_cuda``: CUDA events, L2
    flushed, device synchronized before each call); tiny mode: one host-timed call after a
    warm-up (not a measurement)."""
    return (time_cuda(fn, rep_ms=100) if cuda else time_host(fn, reps=1)).ms


def copy_gbps(cuda: bool) -> float:
    """The device-to-device copy bandwidth, measured as the benchmark suite measures it."""
    import torch

    return copy_bandwidth(torch.device("cuda"))["copy_gbps"] if cuda else float("nan")


def _problem(rows: int, vocab: int, dtype, device, uncounted: float = 0.0):
    """Logits ~ N(0, 2²) drawn on the device (a [16384, 151936] float32 draw on the host would
    take longer than the sweep of one shape), uniform labels, 8 rows per sequence, of which
    the fraction ``uncounted`` (the first rows of every 10) is not counted (seq_id −1)."""
    import torch

    from opo_kernels import OPOLossConfig, epilogue, row_launch

    g = torch.Generator(device=device).manual_seed(vocab)
    logits = torch.empty(rows, vocab, dtype=dtype, device=device)
    for part in logits.split(1024):  # in slices: no float32 copy of the whole tensor
        part.copy_(torch.randn(part.shape, generator=g, device=device) * 2)
    labels = torch.randint(0, vocab, (rows,), generator=g, device=device)
    index = torch.arange(rows, device=device)
    seq = torch.where(index % 10 < round(10 * uncounted), -1, index // 8)
    num_seqs = (rows + 7) // 8
    rows_ = row_launch.Rows(labels, None, seq, None, rows, None, num_seqs)
    params = epilogue.params_tensor(OPOLossConfig(), device, torch.float32)
    coef = torch.rand(num_seqs, 2, generator=g, device=device) - 0.5
    scal = torch.zeros(2, device=device)
    return logits, labels, seq, rows_, params, coef, scal


def _check(kind, logits, labels, seq, out, coef, grad):
    """Spot check at the timed shape (a sample of rows, float32 torch)."""
    import torch

    pick = torch.linspace(0, logits.shape[0] - 1, 16, device=logits.device).long()
    log_p = torch.log_softmax(logits[pick].float(), -1)
    lp = out[0][pick]
    counted = seq[pick] >= 0  # rows not counted: log-prob 0 and a zero gradient row
    expected_lp = torch.where(counted, log_p.gather(1, labels[pick, None])[:, 0], 0.0)
    assert torch.allclose(lp, expected_lp, rtol=1e-4, atol=1e-4), (kind, lp, expected_lp)
    if grad is not None:
        s = seq[pick].clamp(min=0)
        c = torch.where(counted, coef[s, 0] + coef[s, 1], 0.0)
        onehot = torch.nn.functional.one_hot(labels[pick], logits.shape[1]).float()
        expected = c[:, None] * (onehot - log_p.exp())
        err = (grad[pick].float() - expected).abs().max().item()
        tol = (2**-7 if logits.dtype == torch.bfloat16 else 1e-5) * expected.abs().max().item()
        assert err <= tol + 1e-7, (kind, err, tol)


def _kernel_call(kind, problem, device):
    """The launcher call of one kernel kind (and the gradient buffer or statistics it needs)."""
    import torch

    from opo_kernels import row_launch

    logits, labels, seq, rows, params, coef, scal = problem
    if kind == "fwd":
        return (lambda: row_launch.forward_rows(logits, rows, params, False)), None
    grad = torch.empty_like(logits)
    if kind == "onepass":
        return (lambda: row_launch.forward_rows(logits, rows, params, False, grad=grad,
                                                coef=coef, scal=scal)), grad
    stats = row_launch.forward_rows(logits, rows, params, False)
    one = torch.ones((), device=device)
    return (lambda: row_launch.backward_rows(logits, rows, stats[0], stats[1], None, coef,
                                             scal, one, params, "sequence_mean", "ratio",
                                             inplace=False)), stats


def measure(kind, config, problem, device, cuda):
    """Checked, then timed: (ms, bytes moved) of one kernel at one launch config."""
    from opo_kernels import row_launch

    logits, labels, seq, _, _, coef, _ = problem
    row_launch.LAUNCH_OVERRIDE = lambda k, v, d: config if k == kind else None
    try:
        fn, extra = _kernel_call(kind, problem, device)
        result = fn()
        if kind == "bwd":
            _check(kind, logits, labels, seq, extra, coef, result)
        else:
            _check(kind, logits, labels, seq, result, coef, extra)
        ms = _bench(fn, cuda)
    finally:
        row_launch.LAUNCH_OVERRIDE = None
    # counted rows are read (and written); rows not counted are only written (not by fwd)
    row_bytes = logits.shape[1] * logits.element_size()
    counted = int((seq >= 0).sum())
    written = 0 if kind == "fwd" else logits.shape[0]
    return ms, (counted + written) * row_bytes


def _row(kind, dtype_name, vocab, rows, config, ms, nbytes, bandwidth, cuda, uncounted=0.0):
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {"kind": kind, "dtype": dtype_name, "V": vocab, "N": rows, "BLOCK_V": config[0],
            "num_warps": config[1], "stages": config[2],
            "programs_per_sm": config[3] if len(config) > 3 else 0,
            "reverse": bool(config[4]) if len(config) > 4 else False, "uncounted": uncounted,
            "ms": ms, "gbps": gbps, "pct_copy": 100 * gbps / bandwidth if cuda else None}


def _l2_bytes(cuda: bool):
    import torch

    return torch.cuda.get_device_properties(0).L2_cache_size if cuda else None


def sweep(tiny: bool, out: Path | None, budget_s: float = float("inf"), configs=None,
          focus: bool = False):
    """Every (dtype, V, kind, config), or with focus the FOCUS list; rows as dicts, also
    appended to out/sweep.jsonl (focus: out/sweep_focus.jsonl). After budget_s seconds no new
    shape (focus: measurement) starts (the rest is listed as skipped)."""
    import torch

    cuda = torch.cuda.is_available() and not tiny
    device = "cuda" if cuda else "cpu"
    rows = TINY["rows"] if tiny else 16384
    configs = configs or (TINY["configs"] if tiny else CONFIGS)
    bandwidth = copy_gbps(cuda)
    name = "sweep_focus.jsonl" if focus else "sweep.jsonl"
    log = open(out / name, "a") if out is not None else None

    def emit(record):
        print(json.dumps(record), flush=True)
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    emit(environment(cuda, copy_gbps=bandwidth, rows=rows, l2_bytes=_l2_bytes(cuda),
                     sm_count=torch.cuda.get_device_properties(0).multi_processor_count
                     if cuda else None))
    start = time.perf_counter()
    results = []
    if focus:
        vocab, dtype_name = (TINY["sizes"][0], "bfloat16") if tiny else (FOCUS_V, FOCUS_DTYPE)
        problems = {}
        for kind, config, uncounted in (TINY_FOCUS if tiny else FOCUS):
            if time.perf_counter() - start > budget_s:
                emit({"skipped": [kind, list(config), uncounted],
                      "reason": f"budget {budget_s} s"})
                continue
            if uncounted not in problems:
                problems.clear()  # one [16384, 151936] problem at a time
                if cuda:
                    torch.cuda.empty_cache()
                problems[uncounted] = _problem(rows, vocab, getattr(torch, dtype_name), device,
                                               uncounted)
            ms, nbytes = measure(kind, config, problems[uncounted], device, cuda)
            results.append(_row(kind, dtype_name, vocab, rows, config, ms, nbytes, bandwidth,
                                cuda, uncounted))
            emit(results[-1])
        if log:
            log.close()
        return results
    for dtype_name in (TINY["dtypes"] if tiny else DTYPES):
        for vocab in (TINY["sizes"] if tiny else SIZES):
            if time.perf_counter() - start > budget_s:
                emit({"skipped": [dtype_name, vocab], "reason": f"budget {budget_s} s"})
                continue
            problem = _problem(rows, vocab, getattr(torch, dtype_name), device)
            for kind in KINDS:
                for config in configs:
                    ms, nbytes = measure(kind, config, problem, device, cuda)
                    results.append(_row(kind, dtype_name, vocab, rows, config, ms, nbytes,
                                        bandwidth, cuda))
                    emit(results[-1])
            del problem
            if cuda:
                torch.cuda.empty_cache()
    if log:
        log.close()
    return results


def best_rows(results):
    """The fastest config per (kind, dtype, V)."""
    best = {}
    for r in results:
        key = (r["kind"], r["dtype"], r["V"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return [best[k] for k in sorted(best)]


# --------------------------------------------------------------------------------------------
# Occupancy from the compiler (no GPU): registers and shared memory per candidate, for sm_90
# --------------------------------------------------------------------------------------------
REGS_PER_SM, THREADS_PER_SM, SMEM_PER_SM, MAX_PROGRAMS_PER_SM = 65536, 2048, 228 * 1024, 32
VARIANT = {("fwd", "bfloat16"): "fwd-bf16", ("bwd", "bfloat16"): "bwd-bf16",
           ("onepass", "bfloat16"): "fwd-bf16-onepass", ("fwd", "float32"): "fwd-fp32",
           ("bwd", "float32"): "bwd-fp32"}


def programs_per_sm(regs: int, num_warps: int, smem: int) -> int:
    """Resident programs per SM: registers (allocated per warp in units of 256, i.e. per
    thread rounded up to 8), threads, shared memory and the 32-block limit."""
    regs_per_program = ((regs + 7) // 8 * 8) * 32 * num_warps
    limits = [REGS_PER_SM // regs_per_program, THREADS_PER_SM // (32 * num_warps),
              MAX_PROGRAMS_PER_SM]
    if smem:
        limits.append(SMEM_PER_SM // (smem + 1024))  # + the 1 KiB the runtime reserves
    return max(min(limits), 0)


def occupancy(configs=None):
    """Per (variant, config): registers, spills, shared memory, programs per SM and the bytes
    of logits one SM can have requested per iteration (programs × BLOCK_V × itemsize)."""
    from opo_kernels import row_launch
    from tools.gpu import aot_check

    rows = []
    for (kind, dtype_name), variant in VARIANT.items():
        itemsize = 2 if dtype_name == "bfloat16" else 4
        for config in configs or CONFIGS:
            row_launch.LAUNCH_OVERRIDE = lambda k, v, d, c=config: c
            try:
                with aot_check.recording() as log:
                    aot_check.VARIANTS[variant]()
                (kernel, args, kwargs), = log
                compiled = aot_check.compile_launch(kernel, args, kwargs)
                info = aot_check.inspect_compiled(compiled)
            finally:
                row_launch.LAUNCH_OVERRIDE = None
            smem = compiled.metadata.shared
            progs = programs_per_sm(info["regs"], config[1], smem)
            rows.append({"kind": kind, "dtype": dtype_name, "BLOCK_V": config[0],
                         "num_warps": config[1], "stages": config[2], "regs": info["regs"],
                         "spill_bytes": info["spill_bytes"], "smem_bytes": smem,
                         "programs_per_sm": progs,
                         "kib_per_sm_per_iter": progs * config[0] * itemsize / 1024 *
                         max(config[2], 1)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check at tiny shapes")
    parser.add_argument("--occupancy", action="store_true",
                        help="compile the candidates for sm_90 (no GPU) and print occupancy")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for sweep.jsonl (default: $OUT if set)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new shape after this many seconds")
    parser.add_argument("--focus", action="store_true",
                        help="only the FOCUS list (one-pass rows in flight vs L2, zero rows)")
    args = parser.parse_args(argv)
    if args.occupancy:
        print(f"{'kind':<8}{'dtype':<10}{'BLOCK_V':>8}{'warps':>6}{'stages':>7}{'regs':>6}"
              f"{'spill':>6}{'smem':>7}{'prog/SM':>8}{'KiB/SM':>8}")
        for r in occupancy():
            print(f"{r['kind']:<8}{r['dtype']:<10}{r['BLOCK_V']:>8}{r['num_warps']:>6}"
                  f"{r['stages']:>7}{r['regs']:>6}{r['spill_bytes']:>6}{r['smem_bytes']:>7}"
                  f"{r['programs_per_sm']:>8}{r['kib_per_sm_per_iter']:>8.0f}")
        return
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results = sweep(args.tiny, out, args.budget_s, focus=args.focus)
    print("every row:" if args.focus else "best per (kind, dtype, V):")
    for r in results if args.focus else best_rows(results):
        print(f"  {r['kind']:<8} {r['dtype']:<9} V={r['V']:<7} BLOCK_V={r['BLOCK_V']:<6} "
              f"warps={r['num_warps']:<3} stages={r['stages']} "
              f"per_sm={r['programs_per_sm']:<4} reverse={r.get('reverse', False):d} "
              f"uncounted={r['uncounted']:<4} {r['ms']:.3f} ms "
              f"{r['gbps']:.0f} GB/s" + (f" ({r['pct_copy']:.1f} % of copy)"
                                         if r["pct_copy"] else ""))


if __name__ == "__main__":
    main()
