"""Command line of the step benchmark (see ``benchmarks/step/__init__.py``)."""

from __future__ import annotations

import os

import torch

# Without a GPU our Triton kernels (and Liger's) can only run in Triton's interpreter, which
# must be chosen before anything imports triton (whatever the environment said).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from benchmarks.cases import ROOT, cuda_ok, out_dir_for  # noqa: E402
from benchmarks.step import grid  # noqa: E402
from benchmarks.step.report import load, plot, render_table, update_readme  # noqa: E402


def _csv(text: Optional[str], cast=str):
    return None if text is None else tuple(cast(x) for x in text.replace(" ", "").split(",") if x)


def report(results: Path, readme: Optional[Path]) -> str:
    data = load(results)
    table = render_table(data)
    results.with_suffix(".md").write_text(table, encoding="utf-8")
    png = plot(data, results.with_suffix(".png"))
    print(table)
    print(f"[step] results {results}\n[step] figure  {png}\n[step] table   "
          f"{results.with_suffix('.md')}")
    if readme is not None:
        ok = update_readme(readme, table)
        print(f"[step] README  {readme}: " + ("updated" if ok else "markers missing, untouched"))
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="One RL step per loss path (benchmarks/step).")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU, into a temp dir")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    ap.add_argument("--models", help=f"comma-separated, of {list(grid.MODELS)}")
    ap.add_argument("--tokens", help="comma-separated micro-batch sizes (positions)")
    ap.add_argument("--paths", help=f"comma-separated, of {list(grid.PATHS)}")
    ap.add_argument("--steps", type=int, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, help="untimed steps first")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--no-grad-ckpt", action="store_true", help="gradient checkpointing off")
    ap.add_argument("--budget-s", type=float, help="start no new row after this many seconds")
    ap.add_argument("--resume", type=Path, help="earlier results file of the same device: keep "
                    "its rows, measure the others")
    ap.add_argument("--readme", type=Path, help="README to update between the step-table "
                    "markers (never on tiny runs)")
    ap.add_argument("--report-only", type=Path, metavar="RESULTS_JSON",
                    help="no measurement: table + figure (+ README) from this file")
    args = ap.parse_args(argv)

    if args.report_only:
        report(args.report_only, args.readme)
        return 0
    kw = {k: v for k, v in dict(
        models=_csv(args.models), tokens=_csv(args.tokens, int), paths=_csv(args.paths),
        steps=args.steps, warmup=args.warmup, seq_len=args.seq_len,
        budget_s=args.budget_s,
        resume=None if args.resume is None else str(args.resume)).items()
        if v is not None}
    if args.no_grad_ckpt:
        kw["grad_ckpt"] = False
    if not args.tiny and not cuda_ok():
        ap.error("the full grid needs a CUDA GPU (and TRITON_INTERPRET unset); --tiny runs the "
                 "CPU check")
    try:
        settings = (grid.Settings.tiny_defaults(**kw) if args.tiny
                    else grid.Settings(**kw)).check()
    except ValueError as exc:
        ap.error(str(exc))
    try:
        out = out_dir_for(args.out, args.tiny, prefix="opo-step-tiny-")
    except ValueError as exc:
        ap.error(str(exc))
    if args.tiny and args.readme is not None and args.readme.resolve() == (
            ROOT / "README.md").resolve():
        ap.error("a tiny (CPU) run must not write the repository README.md")

    from benchmarks.step.bench import StepBench
    bench = StepBench(settings, out)
    print(f"[step] results -> {bench.path}", flush=True)
    bench.run()
    report(bench.path, args.readme)
    return 1 if bench.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
