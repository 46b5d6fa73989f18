"""The step benchmark's results: schema check, the headline table (markdown, for the README
between ``<!-- step-table:start -->`` and ``<!-- step-table:end -->``) and the figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from benchmarks import report as perf_report
from benchmarks.step import grid

START = "<!-- step-table:start -->"
END = "<!-- step-table:end -->"
TARGET_MODEL, TARGET_TOKENS = "qwen2.5-0.5b", 8192
TARGET_VS_PLAIN = 0.8      # our fastest general-mode path's step time over plain's, at the
                           # target shape
ROW_FIELDS = {"model": str, "tokens": int, "path": str, "step_ms": (int, float),
              "peak_mem_bytes": int, "loss_ms": (int, float, type(None)),
              "tokens_per_s": (int, float), "B": int, "L": int, "counted": int}
TIME_SKIP = "time budget spent"   # bench.py's reason for a row a time-limited run did not reach
TOP_FIELDS = ("device", "torch", "triton", "transformers", "commit", "settings", "rows",
              "skipped", "errors", "models", "timer")


def validate(data: Dict[str, object]) -> None:
    """Raises ValueError naming the first field that is missing or of the wrong type."""
    for key in TOP_FIELDS:
        if key not in data:
            raise ValueError(f"step results: missing top-level field {key!r}")
    if not isinstance(data["rows"], list):
        raise ValueError("step results: rows must be a list")
    for i, row in enumerate(data["rows"]):
        for key, typ in ROW_FIELDS.items():
            if key not in row:
                raise ValueError(f"step results: rows[{i}] has no {key!r}")
            if not isinstance(row[key], typ) or isinstance(row[key], bool):
                raise ValueError(f"step results: rows[{i}][{key!r}] = {row[key]!r} has the "
                                 f"wrong type")
        if row["path"] not in grid.PATHS:
            raise ValueError(f"step results: rows[{i}] has unknown path {row['path']!r}")
        if row["model"] not in data["models"]:
            raise ValueError(f"step results: rows[{i}] names model {row['model']!r} that "
                             "'models' does not describe")


def load(path) -> Dict[str, object]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    validate(data)
    return data


def _shapes(rows: List[dict]) -> List[Tuple[str, int]]:
    return list(dict.fromkeys((r["model"], r["tokens"]) for r in rows))


def _mib(n: int) -> str:
    return "n/a" if n < 0 else f"{n / 2**20:,.0f}"


def _x(num: Optional[float], den: Optional[float]) -> str:
    if num is None or den is None or den <= 0 or num < 0:
        return "–"
    return f"{num / den:.2f}×"


def _fastest(at: Dict[str, dict], paths) -> Optional[dict]:
    rows = [at[p] for p in paths if p in at]
    return min(rows, key=lambda r: r["step_ms"]) if rows else None


def unreached(data: Dict[str, object], model: str, tokens: int, paths) -> List[str]:
    """The paths among ``paths`` that the run was asked for (``settings.paths``) and did not
    reach at this shape: no row, no error, no skip other than for the time budget. While one
    is missing, a "fastest peer" or "leanest peer" would be whichever happened to be measured
    first, so those ratios are not given (a resumed run measures the rest)."""
    asked = data["settings"].get("paths", grid.PATHS)

    def here(items):
        return {i["path"] for i in items or [] if i["model"] == model and i["tokens"] == tokens}
    accounted = here(data["rows"]) | here(data.get("errors")) | here(
        i for i in data.get("skipped") or [] if i.get("reason") != TIME_SKIP)
    return [p for p in paths if p in asked and p not in accounted]


def best_peer(data: Dict[str, object], at: Dict[str, dict], model: str,
              tokens: int) -> Optional[dict]:
    """The row of the fastest rated peer at this shape (``at``: its rows by path), or None
    while a rated peer the run was asked for was not reached (``unreached``)."""
    if unreached(data, model, tokens, grid.RATED_PEERS):
        return None
    return _fastest(at, grid.RATED_PEERS)


def _ratio(a: Optional[dict], b: Optional[dict], key: str) -> Optional[float]:
    return None if a is None or b is None or b[key] <= 0 or a[key] < 0 else a[key] / b[key]


def targets(data: Dict[str, object], model: str = TARGET_MODEL,
            tokens: int = TARGET_TOKENS) -> Dict[str, object]:
    """At one shape: our fastest general-mode path (the peers' setting, ``grid.OURS_GENERAL``),
    its time over plain's and over the fastest peer's; the same for our on-policy path (another
    setting, reported beside it); our fused-linear path's peak over the leanest other path's
    (None where a row is missing; the fastest-peer ratios None while a rated peer the run was
    asked for was not reached, the leanest-peer one while any peer was: ``unreached``, listed
    in ``peers_not_reached``)."""
    at = {r["path"]: r for r in data["rows"] if r["model"] == model and r["tokens"] == tokens}
    best = _fastest(at, grid.OURS_GENERAL)
    on_policy = _fastest(at, grid.OURS_ON_POLICY)
    missing = unreached(data, model, tokens, grid.TARGET_PEERS)
    # (the table's "× best peer" applies the same rule: best_peer)
    peer_best = best_peer(data, at, model, tokens)
    fused = at.get("opo_fused_linear")
    mem_peers = [at[p] for p in grid.TARGET_PEERS if p in at and at[p]["peak_mem_bytes"] >= 0]
    lean = min(mem_peers, key=lambda r: r["peak_mem_bytes"]) if mem_peers and not missing \
        else None
    plain = at.get("plain")
    return {"model": model, "tokens": tokens, "best": best and best["path"],
            "best_mode": "general",
            "best_vs_plain": _ratio(best, plain, "step_ms"),
            "best_peer": peer_best and peer_best["path"],
            "best_vs_best_peer": _ratio(best, peer_best, "step_ms"),
            "on_policy": on_policy and on_policy["path"],
            "on_policy_vs_plain": _ratio(on_policy, plain, "step_ms"),
            "on_policy_vs_best_peer": _ratio(on_policy, peer_best, "step_ms"),
            "leanest_peer": lean and lean["path"],
            "fused_peak_vs_leanest_peer": _ratio(fused, lean, "peak_mem_bytes"),
            "peers_not_reached": missing}


def _verdict(x: Optional[float], limit: float, strict: bool = False) -> str:
    if x is None:
        return "not measured"
    return "met" if (x < limit if strict else x <= limit) else "NOT met"


def render_table(data: Dict[str, object]) -> str:
    """The headline table: per model and micro-batch, every path's step time, its ratio to
    plain's and to the fastest peer's, the head + loss part, peak memory above model +
    optimizer, tokens/s; then the targets' verdict at the target shape."""
    rows = list(data["rows"])
    order = {p: i for i, p in enumerate(grid.PATHS)}
    s = data["settings"]
    lines = []
    if data.get("tiny"):
        lines += ["**Tiny CPU run (harness check): these numbers are NOT GPU measurements.**", ""]
    peer_v = ", ".join(f"{k} {v}" for k, v in (data.get("peers") or {}).items() if v)
    lines.append(
        f"One RL step (forward, loss, backward, AdamW step) on **{data['device']}** (torch "
        f"{data['torch']}, triton {data['triton']}, {peer_v}; commit "
        f"`{str(data['commit'])[:12]}`). Random-init models of the published shapes, bf16 "
        f"weights, gradient checkpointing {'on' if s.get('grad_ckpt') else 'off'}, sequences "
        f"of {s['seq_len']} positions in groups of {s['group_size']}, "
        f"~{s['counted_fraction']:.0%} of positions counted. Step: median of {s['steps']} "
        f"steps after {s['warmup']} warm-up ({data['timer']}). \"× plain\" is the step time "
        "over the *plain* path's (model logits → fp32 log-softmax → OPO from log-probs) at the "
        "same shape; \"× best peer\" over the fastest peer path's there (plain not counted; "
        "that path is marked \"(best peer)\"; \"–\" where a peer the run was asked for was "
        "not reached in its time); every peer is given the old log-probs, as our "
        "general-mode paths are, while opo_fused_linear_on_policy runs the on-policy mode "
        "(ref_logprobs=None: one update per batch), another setting, so the verdict compares "
        "it separately; \"head + loss\" is the part from the backbone's output to its gradient "
        "(LM head, loss and their backward); peak memory is above the model and optimizer "
        "state. Liger rows run GRPO/GSPO (Liger has no OPO): liger_logits at sequence level "
        "(GSPO), liger_logits_token at token level (GRPO); liger_fused_linear is its defaults "
        "(chunk_size=1, fp32 matmul precision: TF32 off), _tf32 with TF32 on, _chunkB also "
        "with chunk_size = B (one chunk); cce is cut-cross-entropy in its exact mode, "
        "cce_filtered in its default mode (filter_eps=\"high\": gradient blocks below the "
        "threshold skipped, an approximate gradient: shown, but not a \"best peer\" and not in "
        "the targets); torch_lce is PyTorch's chunked linear_cross_entropy (torch >= 2.13), "
        "whose per-token log-probs come in the model's dtype (bf16): the OPO loss of rounded "
        "log-probs, shown like cce_filtered; every other path computes the OPO loss exactly.")
    lines += ["", "| model | tokens | path | step ms | × plain | × best peer | head + loss ms "
              "| share | peak MiB | tokens/s |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, tokens in _shapes(rows):
        at = sorted((r for r in rows if r["model"] == model and r["tokens"] == tokens),
                    key=lambda r: order.get(r["path"], 99))
        plain = next((r for r in at if r["path"] == "plain"), None)
        best = best_peer(data, {r["path"]: r for r in at}, model, tokens)
        for r in at:
            share = "–" if r.get("loss_share") is None else f"{r['loss_share']:.0%}"
            head = "–" if r.get("loss_ms") is None else f"{r['loss_ms']:.1f}"
            name = r["path"] + (" (best peer)" if r is best else "")
            lines.append(
                f"| {model} | {tokens} | {name} | {r['step_ms']:.1f} "
                f"| {_x(r['step_ms'], plain and plain['step_ms'])} "
                f"| {_x(r['step_ms'], best and best['step_ms'])} | {head} | {share} "
                f"| {_mib(r['peak_mem_bytes'])} | {r['tokens_per_s']:,.0f} |")
    if not rows:
        lines.append("| – | – | (no rows) | – | – | – | – | – | – | – |")
    lines += _verdict_lines(targets(data))
    for key, title in (("skipped", "Not measured"), ("errors", "Failed")):
        items = data.get(key) or []
        if items:
            lines += ["", f"{title}:"]
            lines += [f"- {i['model']} {i['tokens']} {i['path']}: "
                      f"{i.get('reason') or i.get('error', '')[:200]}" for i in items]
    return "\n".join(lines) + "\n"


def _verdict_lines(t: Dict[str, object]) -> List[str]:
    """The targets at the target shape (``targets``), as markdown lines ([] without ours)."""
    if t["best"] is None and t["on_policy"] is None:
        return []
    text = f"Targets at {t['model']}, {t['tokens']} tokens: "
    if t["peers_not_reached"]:
        text += (f"(peers not reached in the run's time: {', '.join(t['peers_not_reached'])}; "
                 "the comparisons with the fastest and the leanest peer wait for them) ")
    if t["best"] is not None:
        text += (f"our fastest general-mode path, the peers' setting ({t['best']}), "
                 f"{_fmt(t['best_vs_plain'])} plain's step time (≤ {TARGET_VS_PLAIN}: "
                 f"{_verdict(t['best_vs_plain'], TARGET_VS_PLAIN)}), "
                 f"{_fmt(t['best_vs_best_peer'])} the fastest peer's ({t['best_peer']}; < 1: "
                 f"{_verdict(t['best_vs_best_peer'], 1.0, strict=True)}); ")
    if t["on_policy"] is not None:
        text += (f"on-policy, a setting the peers were not run in ({t['on_policy']}, "
                 f"ref_logprobs=None): {_fmt(t['on_policy_vs_plain'])} plain's, "
                 f"{_fmt(t['on_policy_vs_best_peer'])} the fastest peer's; ")
    text += (f"opo_fused_linear's peak memory {_fmt(t['fused_peak_vs_leanest_peer'])} the "
             f"leanest other path's ({t['leanest_peer']}; ≤ 1: "
             f"{_verdict(t['fused_peak_vs_leanest_peer'], 1.0)}).")
    return ["", text]


def _fmt(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}×"


def update_readme(readme, table: str) -> bool:
    """The table between the step-table markers of ``readme``; False (untouched) when the file
    or its markers are missing or misplaced."""
    return perf_report.update_readme(readme, table, START, END)


def plot(data: Dict[str, object], out_png) -> Path:
    """Step time and peak memory per path, one row of panels per model, bars grouped by
    micro-batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows)) or ["(no rows)"]
    paths = [p for p in grid.PATHS if any(r["path"] == p for r in rows)]
    fig, axes = plt.subplots(len(models), 2, figsize=(14, 4 * len(models)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for m, model in enumerate(models):
        sizes = sorted({r["tokens"] for r in rows if r["model"] == model})
        width = 0.8 / max(1, len(paths))
        for k, (key, label, scale) in enumerate((("step_ms", "step time (ms)", 1.0),
                                                 ("peak_mem_bytes", "peak memory above "
                                                  "model + optimizer (GiB)", 2.0**-30))):
            ax = axes[m][k]
            for j, p in enumerate(paths):
                vals = []
                for t in sizes:
                    r = next((r for r in rows if r["model"] == model and r["tokens"] == t
                              and r["path"] == p), None)
                    vals.append(r[key] * scale if r is not None and r[key] >= 0 else 0.0)
                ax.bar([i + j * width for i in range(len(sizes))], vals, width, label=p,
                       color=cmap(j % 20), hatch="//" if p.startswith("opo_") else None)
            if key == "peak_mem_bytes" and not any(
                    r[key] >= 0 for r in rows if r["model"] == model):
                ax.text(0.5, 0.5, "not measured (no CUDA)", ha="center", va="center",
                        transform=ax.transAxes)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))])
            ax.set_xticklabels([f"{t} tokens" for t in sizes])
            ax.set_ylabel(label)
            ax.set_title(model, fontsize=10)
        axes[m][0].legend(fontsize=7, ncol=2)
    title = f"One RL step per loss path — {data['device']} (torch {data['torch']})"
    if data.get("tiny"):
        title += "\nTINY CPU RUN: not a GPU measurement"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
