"""Markdown performance table from a results JSON, and its insertion into a markdown file
(docs/benchmarks.md, which ``python -m benchmarks.run`` updates).

    python -m benchmarks.report benchmarks/results/<device>.json            # print the table
    python -m benchmarks.report benchmarks/results/<device>.json --readme docs/benchmarks.md

The table goes between the markers ``<!-- perf-table:start -->`` and
``<!-- perf-table:end -->``; a file without both markers (in that order) is left untouched.
The torch denominator of the headline is the strong-torch OPO (``torch_compiled``,
benchmarks/peers_torch.py); the package's reference rows stay, labelled "reference (readable,
slow)". Fused-linear rows (hidden states -> loss, grads of hidden and weight; rows with "H")
get a second table: time over the floor of each implementation's own mode on the counted
tokens, against the peers, with the fused-linear targets (stated here once: ``LINEAR_TARGETS``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from benchmarks.cases import ALL_IMPLS, LINEAR_IMPLS
from benchmarks.results import validate_results

START = "<!-- perf-table:start -->"
END = "<!-- perf-table:end -->"
IMPL_ORDER = {name: i for i, name in enumerate(ALL_IMPLS)}
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}

# display names: what each impl is, for a reader of the table
LABELS = {
    "torch_compiled": "torch_compiled (strong torch, compiled)",
    "eager": "eager: reference (readable, slow)",
    "compile": "compile: reference (readable, slow), torch.compile",
}
TORCH_BASELINE = "torch_compiled"

# The fused-linear targets (bf16, GPU), the one place they are stated; each verdict in the
# table is computed from the measured rows of the same run:
LINEAR_OURS = "opo_kernels_fused_linear"
LINEAR_TARGETS = {
    "x_floor_general": 1.15,     # opo_kernels_fused_linear ≤ 1.15× its 4-matmul floor
    "x_floor_on_policy": 1.15,   # opo_kernels_fused_linear_on_policy ≤ 1.15× its 3-matmul floor
    "budget_vs_materialized": 1.05,  # logits held: ≤ 1.05× opo_kernels_materialized's time
    "vs_peer": 1.0,              # ≤ cut-cross-entropy's and ≤ TRL head + our log-prob loss
}
# Quack's linear cross-entropy, forward + backward at M = 4096, H = 4096, V = 128256 on an H200
# (3 matmuls, gradient in place): 17.3 ms. A published figure, not measured here; compared only
# on an H200 at the packed shape, with the on-policy mode (the same 3 matmuls).
QUACK_H200_MS = 17.3
QUACK_FACTOR = 1.15


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
    strong = {_shape_key(r): r["ms"] for r in rows if r["impl"] == TORCH_BASELINE}
    timers = sorted({str(r.get("timer", "?")) for r in data["rows"]})
    if timers == ["cuda-events"]:
        how = ("median of CUDA-event timings, one loop for every implementation (L2 flushed, "
               "device synchronized before each call: host time included alike)")
    else:
        how = "median of " + "/".join(timers) + " timings"

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
        "same byte count for every implementation (benchmarks/NOTES.md). The last three columns "
        "are the row's time over opo_kernels' (resp. opo_kernels_inplace's, the strong-torch "
        "baseline torch_compiled's) at the same shape. The headline's torch denominator is "
        "torch_compiled (a well-written PyTorch OPO under torch.compile); the eager/compile "
        "rows are the package's reference, written to be read, not to be fast.")
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
                     "| ÷ opo_kernels | ÷ opo_kernels_inplace | ÷ torch_compiled |")
        lines.append("|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratios = []
        for ref in (ours, ours_inplace, strong):
            base = ref.get(_shape_key(r))
            ratios.append(f"{r['ms'] / base:.2f}×" if base else "–")
        pct = r.get("pct_copy", 100 * r["gbps"] / data["copy_gbps"])
        lines.append(
            f"| {r['N']} | {r['V']} | {SHORT_DTYPE.get(r['dtype'], r['dtype'])} | {r['layout']} "
            f"| {LABELS.get(r['impl'], r['impl'])} | {r['ms']:.3f} | {_fmt_gbps(r['gbps'])} "
            f"| {pct:.1f} "
            f"| {_fmt_mem(r['peak_mem_bytes'])} | {ratios[0]} | {ratios[1]} | {ratios[2]} |")
    if not rows and not linear:
        lines.append("| – | – | – | – | (no rows) | – | – | – | – | – | – | – |")
    for h in headline(data):
        x = h["vs_torch"]  # torch_compiled ms ÷ opo_kernels ms: below 1 when ours is slower
        lines.append("")
        lines.append(
            f"At N={h['N']} V={h['V']} {SHORT_DTYPE.get(h['dtype'], h['dtype'])} {h['layout']}: "
            + (f"opo_kernels is {x:.2f}× faster than" if x >= 1 else
               f"opo_kernels is {1 / x:.2f}× slower than")
            + " the strong-torch baseline "
            f"(torch_compiled), {h['vs_compile_ref']}× the compiled reference's time and "
            f"{h['vs_eager_ref']}× the eager reference's (readable, slow)."
            + _liger_sentence(h))
    host = [r for r in rows if r.get("host_ms") is not None]
    if host:  # harness.py: eager − CUDA-graph replay at the small shapes
        lines.append("")
        lines.append("Host time per call (the time the GPU waits for the host: eager ms − the "
                     "same step replayed from a CUDA graph, same timer):")
        lines.append("")
        lines.append("| N | V | layout | impl | eager ms | replay ms | host ms |")
        lines.append("|---:|---:|---|---|---:|---:|---:|")
        for r in host:
            lines.append(f"| {r['N']} | {r['V']} | {r['layout']} | "
                         f"{LABELS.get(r['impl'], r['impl'])} | {r['ms']:.3f} | "
                         f"{r['replay_ms']:.3f} | {r['host_ms']:.3f} |")
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


def headline(data: Dict[str, object]) -> List[Dict[str, object]]:
    """Per logits shape with both rows: opo_kernels' speed-up over the strong-torch baseline
    (and, for reference, over the package's reference rows)."""
    rows = [r for r in data["rows"] if not is_linear_row(r)]
    out = []
    for key in dict.fromkeys(_shape_key(r) for r in rows):
        at = {r["impl"]: r for r in rows if _shape_key(r) == key}
        ours, strong = at.get("opo_kernels"), at.get(TORCH_BASELINE)
        if not ours or not strong:
            continue

        ref = {impl: f"{at[impl]['ms'] / ours['ms']:.2f}" if impl in at else "–"
               for impl in ("compile", "eager")}
        liger = {impl: at[impl]["ms"] / ours["ms"] if impl in at else None
                 for impl in LIGER_LOGITS}
        out.append({"N": key[0], "V": key[1], "dtype": key[2], "layout": key[3],
                    "vs_torch": strong["ms"] / ours["ms"], "vs_compile_ref": ref["compile"],
                    "vs_eager_ref": ref["eager"], "vs_liger": liger})
    return out


# Liger's triton_grpo_loss rows, each with what it is: a "× faster than Liger" names the level
LIGER_LOGITS = {"liger_grpo_token": "token level, 2 reads + 1 write of the logits",
                "liger_gspo": "sequence level, GSPO: 3 reads + 1 write"}


def _liger_sentence(h: Dict[str, object]) -> str:
    """" Liger's triton_grpo_loss over opo_kernels' time: <row> (<what>) X×, ..." or ''."""
    parts = [f"{impl} ({what}) {x:.2f}×" for impl, what in LIGER_LOGITS.items()
             if (x := h["vs_liger"].get(impl)) is not None]
    if not parts:
        return ""
    return " Liger's triton_grpo_loss over opo_kernels' time: " + "; ".join(parts) + "."


def _chunk_bytes(row: Optional[dict]) -> int:
    """One chunk of logits of our fused-linear row (its chunk_size·V·2 bytes, bf16)."""
    if not row or not row.get("chunk_size"):
        return 0
    return int(row["chunk_size"]) * int(row["V"]) * {"float32": 4}.get(row["dtype"], 2)


def linear_targets(data: Dict[str, object]) -> List[Dict[str, object]]:
    """Per fused-linear shape, each target of ``LINEAR_TARGETS`` from the rows of the run:
    (name, measured ratio or None, limit) tuples under "checks"."""
    rows = [r for r in data["rows"] if is_linear_row(r)]
    out = []
    for key in dict.fromkeys(_shape_key(r) for r in rows):
        at = {r["impl"]: r for r in rows if _shape_key(r) == key}
        ours = at.get(LINEAR_OURS)
        on_policy = at.get("opo_kernels_fused_linear_on_policy")
        budget, mat = at.get("opo_kernels_fused_linear_budget"), at.get("opo_kernels_materialized")
        checks = [
            ("opo_kernels_fused_linear × its 4-matmul floor", ours and ours.get("x_floor"),
             LINEAR_TARGETS["x_floor_general"]),
            ("opo_kernels_fused_linear_on_policy × its 3-matmul floor",
             on_policy and on_policy.get("x_floor"), LINEAR_TARGETS["x_floor_on_policy"]),
            ("opo_kernels_fused_linear_budget ÷ opo_kernels_materialized (time)",
             _ratio(budget and budget["ms"], mat and mat["ms"]),
             LINEAR_TARGETS["budget_vs_materialized"]),
        ]
        for peer in ("cce", "trl_head"):
            theirs = at.get(peer)
            checks.append((f"opo_kernels_fused_linear ÷ {peer} (time)",
                           _ratio(ours and ours["ms"], theirs and theirs["ms"]),
                           LINEAR_TARGETS["vs_peer"]))
            peak = _ratio(ours and ours["peak_mem_bytes"],
                          theirs and theirs["peak_mem_bytes"] >= 0
                          and theirs["peak_mem_bytes"] + _chunk_bytes(ours))
            checks.append((f"opo_kernels_fused_linear peak ÷ ({peer}'s + one chunk)", peak,
                           1.0))
        if "H200" in str(data.get("device")) and key[3] == "packed" and on_policy:
            checks.append((f"opo_kernels_fused_linear_on_policy ÷ Quack's published "
                           f"{QUACK_H200_MS} ms (H200)", on_policy["ms"] / QUACK_H200_MS,
                           QUACK_FACTOR))
        out.append({"shape": key, "checks": checks})
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
    ours = {_shape_key(r): r for r in rows if r["impl"] == LINEAR_OURS}
    rate = data.get("matmul_tflops")
    rate_txt = _fmt_gbps(rate) if isinstance(rate, (int, float)) else "?"
    mm = "×".join(str(x) for x in data.get("matmul_shape") or []) or "?"
    lines = [
        "Fused linear: loss from hidden states and the LM head `[V, H]`, forward + backward "
        "including the gradients of hidden and weight; padded `[B, T, H]` (~70 % of the B·T "
        "positions counted: N tokens) and packed `[N, H]` (every row counted). Floor: the "
        "matmuls of each implementation's own mode, 2·N·H·V FLOPs each on the N counted "
        f"tokens (4 in general: logits, logits again in backward, ∂hidden, ∂weight; 3 "
        f"on-policy or with the logits held or materialized), at the bf16 matmul rate "
        f"measured in the same run and used as quoted: {rate_txt} TFLOP/s (torch.matmul {mm}, "
        "median). \"× floor (rows)\" counts every row the layout holds, padding included. "
        "cce is cut-cross-entropy in its exact mode, trl_head TRL's chunked log-prob head and "
        "torch_lce PyTorch's chunked linear_cross_entropy (torch >= 2.13; its log-probs in the "
        "inputs' dtype), each followed by opo_loss_from_logprobs; cce_torch_compile is "
        "cut-cross-entropy's impl=\"torch_compile\" (logits of the counted rows "
        "materialized: 3 matmuls). Liger "
        "runs GSPO (no OPO in Liger), at its default fp32 matmul precision (TF32 off) and with "
        "TF32 on (_tf32), at its default chunk_size=1 and with chunk_size = B (_chunkB, the "
        "batch in one chunk). cce_filtered is "
        "cut-cross-entropy at its default filter_eps=\"high\" (backward skips blocks whose "
        "gradient is below bf16 eps/32: not exact; CUDA only).",
        "",
        "| layout | B | T | H | V | N | impl | floor matmuls | ms | TFLOP/s | × floor "
        "| × floor (rows) | extra peak MiB | ms ÷ opo_kernels_fused_linear |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = ours.get(_shape_key(r))
        lines.append(
            f"| {r['layout']} | {r.get('B', '?')} | {r.get('T', '?')} | {r['H']} | {r['V']} "
            f"| {r['N']} | {r['impl']} | {r.get('floor_matmuls', '?')} | {r['ms']:.3f} "
            f"| {_fmt_gbps(r.get('tflops', float('nan')))} "
            f"| {_fmt_ratio(r.get('x_floor'))} | {_fmt_ratio(r.get('x_floor_rows'))} "
            f"| {_fmt_mem(r['peak_mem_bytes'])} "
            f"| {_fmt_ratio(_ratio(r['ms'], base and base['ms']))} |")
    for t in linear_targets(data):
        n, v, dtype, layout, h, b = t["shape"]
        where = f"B={b} " if layout == "padded" else ""
        lines.append("")
        lines.append(f"Targets at {layout} {where}H={h} V={v} N={n} "
                     f"{SHORT_DTYPE.get(dtype, dtype)}: " + "; ".join(
                         f"{name} {_fmt_ratio(x)} (≤ {limit}: {_verdict(x, limit)})"
                         for name, x, limit in t["checks"]) + ".")
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, table: str, start: str = START,
                            end: str = END) -> Optional[str]:
    """`text` with the part between the markers replaced, or None if the markers are missing,
    repeated or out of order."""
    if text.count(start) != 1 or text.count(end) != 1:
        return None
    i, j = text.index(start), text.index(end)
    if j < i:
        return None
    return text[: i + len(start)] + "\n" + table.rstrip("\n") + "\n" + text[j:]


def update_readme(readme, table: str, start: str = START, end: str = END) -> bool:
    """Writes `table` between the markers (by default the perf-table ones) of `readme`.
    Returns True if the file now holds it; False (file untouched) when the file or its
    markers are missing."""
    path = Path(readme)
    if not path.is_file():
        print(f"[report] {path} not found: README not updated", file=sys.stderr)
        return False
    text = path.read_text(encoding="utf-8")
    new = replace_between_markers(text, table, start, end)
    if new is None:
        print(f"[report] {path}: markers {start} / {end} missing or misplaced: "
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
