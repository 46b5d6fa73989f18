"""One command for the whole benchmark: the pytest-benchmark suite, the results JSON, the plot
and the performance table of docs/benchmarks.md.

    python -m benchmarks.run                      # GPU: benchmarks/results/<device>.{json,png,md}
                                                  #      + docs/benchmarks.md table (markers)
    python -m benchmarks.run --tiny               # CPU check: N=64, V=128, into a temp dir
    python -m benchmarks.run --out DIR --no-readme --budget-s 420     # a time-limited run
    python -m benchmarks.run --resume DIR/<device>.json ...           # measure the rest only
    python -m benchmarks.run --report-only benchmarks/results/<device>.json   # plot + table

Options are passed to the suite as OPO_BENCH_* environment variables (benchmarks/harness.py).
Tiny runs never write under benchmarks/results/ nor into the repository's docs/benchmarks.md.
(The --readme/--no-readme options name the markdown file that holds the table.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from benchmarks.cases import ROOT, cuda_ok, out_dir_for
from benchmarks.plot import plot
from benchmarks.report import load, render_table, update_readme

README = ROOT / "docs" / "benchmarks.md"  # the file whose perf-table markers hold the table


def _newest_results(out_dir: Path) -> Optional[Path]:
    found = [p for p in out_dir.glob("*.json") if not p.name.endswith("pytest-benchmark.json")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_suite(args, out_dir: Path) -> int:
    env = dict(os.environ)
    env["OPO_BENCH_OUT"] = str(out_dir)
    env["OPO_BENCH_TINY"] = "1" if args.tiny else "0"
    for key, val in (("OPO_BENCH_IMPLS", args.impls), ("OPO_BENCH_BUDGET_S", args.budget_s),
                     ("OPO_BENCH_RESUME", args.resume)):
        if val is not None:
            env[key] = str(val)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_bench_opo.py", "-q", "-rs",
           "-p", "no:cacheprovider"]
    try:
        import pytest_benchmark  # noqa: F401
        cmd += [f"--benchmark-json={out_dir / 'pytest-benchmark.json'}",
                "--benchmark-columns=median,rounds", "--benchmark-sort=name"]
    except ImportError:
        print("[bench] pytest-benchmark not installed: running the suite without it")
    if args.k:
        cmd += ["-k", args.k]
    print("[bench]", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


def report(results: Path, readme: Optional[Path]) -> None:
    data = load(results)
    png = plot(data, results.with_suffix(".png"))
    table = render_table(data)
    md = results.with_suffix(".md")
    md.write_text(table, encoding="utf-8")
    print(table)
    print(f"[bench] results {results}\n[bench] plot    {png}\n[bench] table   {md}")
    if readme is not None:
        if update_readme(readme, table):
            print(f"[bench] table   {readme} (table between the perf-table markers)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the opo_kernels benchmark suite and report.")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, CPU-friendly, temp dir")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results, or a "
                    "temp dir with --tiny)")
    ap.add_argument("--impls", help="comma-separated implementations (default: all)")
    ap.add_argument("-k", help="pytest -k expression over the case ids, e.g. 'V151936'")
    ap.add_argument("--budget-s", type=float, help="start no new row after this many seconds")
    ap.add_argument("--resume", type=Path, help="earlier results JSON of the same device: "
                    "keep its rows, measure the others")
    ap.add_argument("--readme", type=Path, help="markdown file to update between the "
                    "perf-table markers (default: docs/benchmarks.md on full runs; none on tiny "
                    "runs)")
    ap.add_argument("--no-readme", action="store_true", help="do not touch any markdown file")
    ap.add_argument("--report-only", type=Path, metavar="RESULTS_JSON",
                    help="skip the measurements: plot + table (+ docs/benchmarks.md) from it")
    args = ap.parse_args(argv)

    readme: Optional[Path] = None if args.no_readme else (args.readme or
                                                          (None if args.tiny else README))
    if args.tiny and readme is not None and readme.resolve() == README.resolve():
        ap.error("a tiny (CPU) run must not write the repository's docs/benchmarks.md")

    if args.report_only:
        report(args.report_only, readme)
        return 0

    if not args.tiny and not cuda_ok():
        ap.error("the full benchmark grid needs a CUDA GPU (and TRITON_INTERPRET unset); "
                 "use --tiny for the CPU check")
    try:
        out_dir = out_dir_for(args.out, args.tiny)
    except ValueError as exc:
        ap.error(str(exc))
    out_dir.mkdir(parents=True, exist_ok=True)

    rc = run_suite(args, out_dir)
    results = _newest_results(out_dir)
    if results is None:
        print(f"[bench] no results JSON in {out_dir} (pytest exit code {rc})", file=sys.stderr)
        return rc or 1
    bench_json = out_dir / "pytest-benchmark.json"
    if bench_json.exists():
        bench_json.replace(results.with_suffix(".pytest-benchmark.json"))
    report(results, readme)
    return rc


if __name__ == "__main__":
    sys.exit(main())
