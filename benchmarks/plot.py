"""Bar chart of a results JSON: effective GB/s per implementation and shape, one panel per
(dtype, layout), with the measured copy bandwidth as a dashed line. Logits rows only: the
fused-linear rows are compute-bound (their GB/s mean little); they are in report.py's second
table.

    python -m benchmarks.plot benchmarks/results/<device>.json [out.png]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Tuple

from benchmarks.report import IMPL_ORDER, LABELS, SHORT_DTYPE, is_linear_row, load


def plot(data: Dict[str, object], out_png) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    rows: List[dict] = [r for r in data["rows"] if not is_linear_row(r)]
    panels: Dict[Tuple[str, str], List[dict]] = {}
    for r in rows:
        panels.setdefault((r["dtype"], r["layout"]), []).append(r)
    keys = sorted(panels, key=lambda k: (k[0] != "bfloat16", k[1] != "padded", k))
    fig, axes = plt.subplots(max(1, len(keys)), 1, figsize=(12, 3.6 * max(1, len(keys))),
                             squeeze=False)
    impls = sorted({r["impl"] for r in rows}, key=lambda x: IMPL_ORDER.get(x, 99))
    width = 0.8 / max(1, len(impls))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {impl: palette[IMPL_ORDER.get(impl, 0) % len(palette)] for impl in impls}
    for ax, key in zip(axes[:, 0], keys or [None]):
        if key is None:
            ax.text(0.5, 0.5, "no measured rows", ha="center", va="center")
            ax.set_axis_off()
            continue
        prows = panels[key]
        shapes = sorted({(r["V"], r["N"]) for r in prows})
        xpos = {s: i for i, s in enumerate(shapes)}
        for k, impl in enumerate(impls):
            pts = [r for r in prows if r["impl"] == impl]
            if not pts:
                continue
            ax.bar([xpos[(r["V"], r["N"])] + (k - (len(impls) - 1) / 2) * width for r in pts],
                   [r["gbps"] for r in pts], width, label=LABELS.get(impl, impl), color=color[impl])
        ax.axhline(data["copy_gbps"], color="k", ls="--", lw=1,
                   label=f"device copy {data['copy_gbps']:,.0f} GB/s")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"V={v}\nN={n}" for v, n in shapes], fontsize=8)
        ax.set_ylabel("effective GB/s\n(3·N·V·itemsize / time)")
        ax.set_title(f"{SHORT_DTYPE.get(key[0], key[0])}, {key[1]}", fontsize=10)
        ax.legend(fontsize=7, ncol=4, loc="upper left")
    title = f"OPO loss forward+backward — {data['device']} (torch {data['torch']}, " \
            f"triton {data['triton']}, {str(data['commit'])[:10]})"
    if data.get("tiny"):
        title += "\nTINY CPU RUN: not a GPU measurement"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    print(plot(load(src), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
