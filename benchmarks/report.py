"""Markdown performance table from a results JSON, and its insertion into README.md.

    python -m benchmarks.report benchmarks/results/<device>.json            # print the table
    python -m benchmarks.report benchmarks/results/<device>.json --readme README.md

The table goes between the markers ``<!-- perf-table:start -->`` and
``<!-- perf-table:end -->``; a README without both markers (in that order) is left untouched.
Fused-linear rows (hidden states -> loss, grads of hidden and weight; rows with "H") get a
second table: time over the 4-matmul floor and against Liger's fused-linear GSPO loss, with
the issue-4 targets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from benchmarks.cases import ALL_IMPLS, LINEAR_IMPLS
from benchmarks.counts import FLOOR_MATMULS
from benchmarks.results import validate_results

START = "<!-- perf-table:start -->"
END = "<!-- perf-table:end -->"
IMPL_ORDER = {name: i for i, name in enumerate(ALL_IMPLS)}
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}

# Issue 4 targets for opo_kernels_fused_linear (reported, not asserted): ratios <= these
LINEAR_OURS = "opo_kernels_fused_linear"
LINEAR_LIGER = "liger_fused_linear_gspo"
TARGET_TIME_VS_LIGER = 0.8
TARGET_PEAK_VS_LIGER = 1.0
TARGET_X_FLOOR = 1.3


def load(path) -> Dict[str, object]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    validate_results(data)
    return data


def _shape_key(row) -> Tuple:
    return (row["N"], row["V"], row["dtype"], row["layout"], row.get("H"),
            row.get("B") if row.get("H") is not None else None)


def is_linear_row(row) -> bool:
    return row.get("impl") in LINEAR_IMPLS or row.get("H") is not None


def _fmt_mem(nbytes: int) -> str:
    if nbytes < 0:
        return "n/a"
    return f"{nbytes / 2**20:,.0f}"


def _fmt_gbps(gbps: float) -> str:
    return f"{gbps:,.0f}" if gbps >= 10 else f"{gbps:.3g}"


def render_table(data: Dict[str, object]) -> str:
    """The performance tables (markdown) with a header line naming device and versions: the
    logits rows, then (if any) the fused-linear rows (``render_linear_table``)."""
    rows: List[dict] = [r for r in data["rows"] if not is_linear_row(r)]
    shape_order: Dict[Tuple, int] = {}
    for row in rows:
        shape_order.setdefault(_shape_key(row), len(shape_order))
    rows.sort(key=lambda r: (shape_order[_shape_key(r)], IMPL_ORDER.get(r["impl"], 99)))
    ours = {_shape_key(r): r["ms"] for r in rows if r["impl"] == "opo_kernels"}
    ours_inplace = {_shape_key(r): r["ms"] for r in rows if r["impl"] == "opo_kernels_inplace"}
    timers = sorted({str(r.get("timer", "?")) for r in data["rows"]})
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
    resumed = data.get("resumed_from")
    if resumed and any(r.get("run") == "resumed" for r in data["rows"]):
        lines[-1] += (
            f" Rows measured by an earlier run of the same device were resumed from it (commit "
            f"`{str(resumed.get('commit'))[:12]}`, {str(resumed.get('created_utc'))[:16]}, copy "
            f"{_fmt_gbps(resumed['copy_gbps'])} GB/s); each row's % of copy is against its own "
            "run's copy bandwidth.")
    linear = render_linear_table(data)
    if rows or not linear:  # no empty logits table above the fused-linear one
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
    if not rows and not linear:
        lines.append("| – | – | – | – | (no rows) | – | – | – | – | – | – |")
    if linear:
        lines.append("")
        lines.append(linear.rstrip("\n"))
    skipped = data.get("skipped") or []
    if skipped:
        lines.append("")
        lines.append("Not measured:")
        for s in skipped:
            geometry = (f"B={s['B']} T={s['T']} H={s['H']} " if s.get("H") is not None
                        else "")
            lines.append(f"- {s['impl']} {geometry}N={s['N']} V={s['V']} "
                         f"{SHORT_DTYPE.get(s['dtype'], s['dtype'])} {s['layout']}: "
                         f"{s['reason']}")
    return "\n".join(lines) + "\n"


def _ratio(num, den) -> Optional[float]:
    if num is None or den is None or num < 0 or den <= 0:
        return None
    return num / den


def _fmt_ratio(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}×" if x < 1000 else f"{x:.3g}×"


def _verdict(x: Optional[float], target: float) -> str:
    if x is None:
        return "not measured"
    return "met" if x <= target else "NOT met"


def linear_targets(data: Dict[str, object]) -> List[Dict[str, object]]:
    """Per fused-linear shape: ours' time and peak over Liger's, and ours' x_floor, each with
    its target (None where a row is missing or its peak was not measured)."""
    rows = [r for r in data["rows"] if is_linear_row(r)]
    out = []
    for key in dict.fromkeys(_shape_key(r) for r in rows):
        at = {r["impl"]: r for r in rows if _shape_key(r) == key}
        ours, liger = at.get(LINEAR_OURS), at.get(LINEAR_LIGER)
        out.append({
            "shape": key, "ours": ours, "liger": liger,
            "time_vs_liger": _ratio(ours and ours["ms"], liger and liger["ms"]),
            "peak_vs_liger": _ratio(ours and ours["peak_mem_bytes"],
                                    liger and liger["peak_mem_bytes"]),
            "x_floor": ours.get("x_floor") if ours else None,
            "x_floor_rows": ours.get("x_floor_rows") if ours else None,
        })
    return out


def render_linear_table(data: Dict[str, object]) -> str:
    """The fused-linear table (markdown), '' when the results hold no fused-linear row."""
    rows: List[dict] = [r for r in data["rows"] if is_linear_row(r)]
    if not rows:
        return ""
    shape_order: Dict[Tuple, int] = {}
    for row in rows:
        shape_order.setdefault(_shape_key(row), len(shape_order))
    rows.sort(key=lambda r: (shape_order[_shape_key(r)], IMPL_ORDER.get(r["impl"], 99)))
    liger = {_shape_key(r): r for r in rows if r["impl"] == LINEAR_LIGER}
    rate = data.get("matmul_tflops")
    rate_txt = _fmt_gbps(rate) if isinstance(rate, (int, float)) else "?"
    mm = "×".join(str(x) for x in data.get("matmul_shape") or []) or "?"
    lines = [
        "Fused linear: loss from hidden states `[B, T, H]` and the LM head `[V, H]`, forward + "
        "backward including the gradients of hidden and weight (padded, ~70 % of the B·T "
        f"positions counted: N tokens). Floor: {FLOOR_MATMULS} matmuls of 2·N·H·V FLOPs "
        f"(logits, logits recomputed in backward, ∂hidden, ∂weight) at the bf16 matmul rate "
        f"measured in the same run, {rate_txt} TFLOP/s (torch.matmul {mm}, median); "
        "\"× floor (B·T)\" counts all B·T rows, padding included. Targets for "
        f"{LINEAR_OURS}: time ≤ {TARGET_TIME_VS_LIGER}× {LINEAR_LIGER}'s, extra peak memory "
        f"≤ its, time ≤ {TARGET_X_FLOOR}× the floor.",
        "",
        "| B | T | H | V | N | impl | ms | TFLOP/s | × floor | × floor (B·T) | extra peak MiB "
        "| ms ÷ Liger | peak ÷ Liger |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lig = liger.get(_shape_key(r))
        lines.append(
            f"| {r.get('B', '?')} | {r.get('T', '?')} | {r['H']} | {r['V']} | {r['N']} "
            f"| {r['impl']} | {r['ms']:.3f} | {_fmt_gbps(r.get('tflops', float('nan')))} "
            f"| {_fmt_ratio(r.get('x_floor'))} | {_fmt_ratio(r.get('x_floor_rows'))} "
            f"| {_fmt_mem(r['peak_mem_bytes'])} "
            f"| {_fmt_ratio(_ratio(r['ms'], lig and lig['ms']))} "
            f"| {_fmt_ratio(_ratio(r['peak_mem_bytes'], lig and lig['peak_mem_bytes']))} |")
    for t in linear_targets(data):
        n, v, dtype, _layout, h, b = t["shape"]
        lines.append("")
        lines.append(
            f"Targets at B={b} H={h} V={v} N={n} {SHORT_DTYPE.get(dtype, dtype)}: "
            f"time ÷ Liger {_fmt_ratio(t['time_vs_liger'])} (≤ {TARGET_TIME_VS_LIGER}: "
            f"{_verdict(t['time_vs_liger'], TARGET_TIME_VS_LIGER)}); "
            f"peak ÷ Liger {_fmt_ratio(t['peak_vs_liger'])} (≤ {TARGET_PEAK_VS_LIGER}: "
            f"{_verdict(t['peak_vs_liger'], TARGET_PEAK_VS_LIGER)}); "
            f"× floor {_fmt_ratio(t['x_floor'])} (≤ {TARGET_X_FLOOR}: "
            f"{_verdict(t['x_floor'], TARGET_X_FLOOR)}; over all B·T rows "
            f"{_fmt_ratio(t['x_floor_rows'])}).")
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
