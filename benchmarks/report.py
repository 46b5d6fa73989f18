"""Markdown performance table from a results JSON, and its insertion into README.md.

    python -m benchmarks.report benchmarks/results/<device>.json            # print the table
    python -m benchmarks.report benchmarks/results/<device>.json --readme README.md

The table goes between the markers ``<!-- perf-table:start -->`` and
``<!-- perf-table:end -->``; a README without both markers (in that order) is left untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from benchmarks.harness import IMPLS, OPTIONAL_IMPLS, validate_results

START = "<!-- perf-table:start -->"
END = "<!-- perf-table:end -->"
IMPL_ORDER = {name: i for i, name in enumerate(IMPLS + OPTIONAL_IMPLS)}
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def load(path) -> Dict[str, object]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    validate_results(data)
    return data


def _shape_key(row) -> Tuple:
    return (row["N"], row["V"], row["dtype"], row["layout"])


def _fmt_mem(nbytes: int) -> str:
    if nbytes < 0:
        return "n/a"
    return f"{nbytes / 2**20:,.0f}"


def _fmt_gbps(gbps: float) -> str:
    return f"{gbps:,.0f}" if gbps >= 10 else f"{gbps:.3g}"


def render_table(data: Dict[str, object]) -> str:
    """The performance table (markdown) with a header line naming device and versions."""
    rows: List[dict] = list(data["rows"])
    shape_order: Dict[Tuple, int] = {}
    for row in rows:
        shape_order.setdefault(_shape_key(row), len(shape_order))
    rows.sort(key=lambda r: (shape_order[_shape_key(r)], IMPL_ORDER.get(r["impl"], 99)))
    ours = {_shape_key(r): r["ms"] for r in rows if r["impl"] == "opo_kernels"}
    ours_inplace = {_shape_key(r): r["ms"] for r in rows if r["impl"] == "opo_kernels_inplace"}
    timers = sorted({str(r.get("timer", "?")) for r in rows})
    how = ("median of CUDA-event timings" if all(t.startswith(("do_bench", "cuda")) for t in timers)
           else "median of " + "/".join(timers) + " timings")

    commit = str(data["commit"])[:12]
    extras = ""
    if data.get("liger_kernel"):
        extras += f", liger-kernel {data['liger_kernel']}"
    if data.get("created_utc"):
        extras += f", {str(data['created_utc'])[:10]}"
    lines = []
    if data.get("tiny"):
        lines.append("**Tiny CPU run (harness check): these numbers are NOT GPU measurements.**")
        lines.append("")
    lines.append(
        f"Measured on **{data['device']}** (torch {data['torch']}, triton {data['triton']}, "
        f"commit `{commit}`{extras}). Device copy bandwidth {_fmt_gbps(data['copy_gbps'])} GB/s "
        f"(read + write, same run). Forward + backward of one loss call, {how}; GB/s is "
        "effective: 3·N·V·itemsize (2 reads + 1 write of the counted logits) over the time, the "
        "same byte count for every implementation (benchmarks/NOTES.md). The last two columns "
        "are the row's time over opo_kernels' (resp. opo_kernels_inplace's) at the same shape: "
        "how many times faster ours is.")
    lines.append("")
    lines.append("| N | V | dtype | layout | impl | ms | GB/s | % of copy | extra peak MiB "
                 "| ÷ opo_kernels | ÷ opo_kernels_inplace |")
    lines.append("|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratios = []
        for ref in (ours, ours_inplace):
            base = ref.get(_shape_key(r))
            ratios.append(f"{r['ms'] / base:.2f}×" if base else "–")
        pct = r.get("pct_copy", 100 * r["gbps"] / data["copy_gbps"])
        lines.append(
            f"| {r['N']} | {r['V']} | {SHORT_DTYPE.get(r['dtype'], r['dtype'])} | {r['layout']} "
            f"| {r['impl']} | {r['ms']:.3f} | {_fmt_gbps(r['gbps'])} | {pct:.1f} "
            f"| {_fmt_mem(r['peak_mem_bytes'])} | {ratios[0]} | {ratios[1]} |")
    if not rows:
        lines.append("| – | – | – | – | (no rows) | – | – | – | – | – | – |")
    skipped = data.get("skipped") or []
    if skipped:
        lines.append("")
        lines.append("Not measured:")
        for s in skipped:
            lines.append(f"- {s['impl']} N={s['N']} V={s['V']} "
                         f"{SHORT_DTYPE.get(s['dtype'], s['dtype'])} {s['layout']}: "
                         f"{s['reason']}")
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, table: str) -> Optional[str]:
    """`text` with the part between the markers replaced, or None if the markers are missing,
    repeated or out of order."""
    if text.count(START) != 1 or text.count(END) != 1:
        return None
    i, j = text.index(START), text.index(END)
    if j < i:
        return None
    return text[: i + len(START)] + "\n" + table.rstrip("\n") + "\n" + text[j:]


def update_readme(readme, table: str) -> bool:
    """Writes `table` between the markers of `readme`. Returns True if the file now holds it;
    False (file untouched) when the file or its markers are missing."""
    path = Path(readme)
    if not path.is_file():
        print(f"[report] {path} not found: README not updated", file=sys.stderr)
        return False
    text = path.read_text(encoding="utf-8")
    new = replace_between_markers(text, table)
    if new is None:
        print(f"[report] {path}: markers {START} / {END} missing or misplaced: "
              "README not updated", file=sys.stderr)
        return False
    if new != text:
        path.write_text(new, encoding="utf-8")
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results JSON (benchmarks/results/<device>.json)")
    ap.add_argument("--readme", help="README to update between the perf-table markers")
    args = ap.parse_args(argv)
    table = render_table(load(args.results))
    print(table)
    if args.readme:
        update_readme(args.readme, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
