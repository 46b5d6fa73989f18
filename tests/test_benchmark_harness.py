"""The benchmark suite (benchmarks/) checked at tiny shapes, without a GPU.

What is checked: the shape grid and the byte count the GB/s come from, the results schema,
the README table generator (markers present, missing, misplaced), the plot, the harness
measuring real rows (our kernels run under TRITON_INTERPRET=1, set by conftest), and the one
command ``python -m benchmarks.run --tiny`` end to end into a temp dir. Tiny results must
never land in benchmarks/results/ or in the repository's README.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import harness, plot, report  # noqa: E402

GIB = 2**30


def _row(impl="opo_kernels", n=64, v=128, dtype="bfloat16", layout="padded", ms=1.0):
    return {"impl": impl, "N": n, "V": v, "dtype": dtype, "layout": layout, "ms": ms,
            "gbps": 3 * n * v * 2 / (ms * 1e-3) / 1e9, "peak_mem_bytes": 1 << 20}


def _results(rows):
    return {"device": "Test GPU", "torch": "2.x", "triton": "3.x", "commit": "abc",
            "copy_gbps": 3000.0, "rows": rows, "skipped": [
                {"impl": "eager", "N": 32768, "V": 151936, "dtype": "float32",
                 "layout": "padded", "reason": "estimated 200 GiB"}]}


# ---- pure functions --------------------------------------------------------------------------


def test_grid_target_first_and_complete():
    grid = harness.shapes(tiny=False)
    assert grid[0] == harness.TARGET == harness.Shape(16384, 151936, "bfloat16", "padded")
    assert len(grid) == len(set(grid)) == 3 * 3 * 2 + 1  # V x N x layout in bf16, + one fp32
    assert sum(s.dtype == "float32" for s in grid) == 1
    assert [c.impl for c in harness.cases(harness.Settings())][:len(harness.IMPLS)] == list(
        harness.IMPLS)


def test_byte_count_is_two_reads_one_write():
    b, t = harness.batch_geometry(harness.TARGET)
    counts = harness.byte_counts(harness.TARGET, b, t)
    logits = 3 * 16384 * 151936 * 2
    assert logits == 14_935_916_544  # the number quoted in benchmarks/NOTES.md
    assert counts["effective"] == logits + 16384 * 20 + b * 4
    assert counts["dense"] - counts["effective"] == (b * t - 16384) * 151936 * 2


@pytest.mark.parametrize("n", [64, 4096, 16384, 32768])
def test_padded_geometry_counts_about_70_percent(n):
    import torch
    b, t = harness.batch_geometry(harness.Shape(n, 128, "bfloat16", "padded"))
    assert b % harness.GROUP_SIZE == 0
    lengths = harness.sequence_lengths(n, b, t, torch.Generator().manual_seed(1))
    assert sum(lengths) == n and all(1 <= x <= t for x in lengths)
    assert 0.65 < n / (b * t) <= 0.7


def test_memory_estimates():
    big = harness.Shape(32768, 151936, "float32", "padded")
    inputs, extra = harness.memory_estimate(harness.Case("eager", big))
    assert inputs + extra > 100 * GIB  # skipped on an 80 GiB H100
    _, extra = harness.memory_estimate(harness.Case("opo_kernels_inplace", harness.TARGET))
    assert extra == 0
    inputs, extra = harness.memory_estimate(harness.Case("opo_kernels", harness.TARGET))
    b, t = harness.batch_geometry(harness.TARGET)
    assert extra == b * t * 151936 * 2 and inputs == b * (t + 1) * 151936 * 2


def test_schema_validation():
    harness.validate_results(_results([_row()]))
    for bad in ({"ms": "1"}, {"peak_mem_bytes": 1.5}, {"impl": "other"}, {"layout": "x"}):
        row = _row()
        row.update(bad)
        with pytest.raises(ValueError):
            harness.validate_results(_results([row]))
    data = _results([])
    del data["copy_gbps"]
    with pytest.raises(ValueError, match="copy_gbps"):
        harness.validate_results(data)


def test_tiny_results_never_go_to_results_dir():
    with pytest.raises(ValueError, match="tiny"):
        harness.resolve_out_dir(harness.Settings(tiny=True, out_dir=harness.RESULTS_DIR))
    with pytest.raises(ValueError, match="tiny"):
        harness.resolve_out_dir(harness.Settings(tiny=True,
                                                 out_dir=harness.RESULTS_DIR / "sub"))
    assert harness.RESULTS_DIR not in harness.resolve_out_dir(
        harness.Settings(tiny=True)).parents


def test_report_table_and_readme(tmp_path):
    data = _results([_row(), _row("eager", ms=8.0), _row("opo_kernels_inplace", ms=0.9),
                     _row("liger_gspo", ms=1.5, n=128)])
    table = report.render_table(data)
    assert "| 64 | 128 | bf16 | padded | eager | 8.000 |" in table
    assert "8.00× | 8.89× |" in table          # eager time over ours, and over ours in place
    assert "| liger_gspo | 1.500 |" in table and "| – | – |" in table  # no ours at N=128
    assert "estimated 200 GiB" in table

    readme = tmp_path / "README.md"
    text = f"# t\n\nbefore\n{report.START}\nold table\n{report.END}\nafter\n"
    readme.write_text(text)
    assert report.update_readme(readme, table)
    new = readme.read_text()
    assert "old table" not in new and table.strip() in new
    assert new.startswith("# t\n\nbefore\n") and new.endswith(f"{report.END}\nafter\n")
    assert report.update_readme(readme, table) and readme.read_text() == new  # idempotent

    for broken in ("# no markers\n", f"{report.END}\n{report.START}\n",
                   f"{report.START}\n{report.START}\n{report.END}\n"):
        readme.write_text(broken)
        assert not report.update_readme(readme, table)
        assert readme.read_text() == broken  # untouched
    assert not report.update_readme(tmp_path / "missing.md", table)
    assert not (tmp_path / "missing.md").exists()


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(), _row("eager", ms=4.0), _row(layout="packed"), _row(dtype="float32")]
    out = plot.plot(_results(rows), tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = plot.plot(_results([]), tmp_path / "empty.png")  # no rows: still a picture
    assert out.stat().st_size > 0


# ---- the harness measuring real rows (interpreter on CPU) -------------------------------------


def data_breaks(session):
    return any("nonzero" in r or "Dynamic shape" in r
               for r in session.data["compile_graph_breaks"])


def test_session_measures_tiny_rows(tmp_path):
    settings = harness.Settings(tiny=True, impls=("opo_kernels_inplace", "compile"),
                                out_dir=tmp_path, compile_backend="eager")
    session = harness.Session(settings)
    shape = harness.shapes(tiny=True)[1]  # bf16 packed
    for impl in settings.impls:
        outcome = session.measure(harness.Case(impl, shape))
        assert outcome.row is not None, outcome
        row = outcome.row
        assert row["ms"] > 0 and row["gbps"] > 0 and row["inplace"] == (impl != "compile")
        assert row["bytes"] == harness.byte_counts(shape, row["B"], row["T"])["effective"]
        assert row["timer"] == ("cuda-events+restore" if row["inplace"] else "do_bench") \
            if harness.cuda_ok() else row["timer"] == "host-clock"
    assert row["graph_breaks"] >= 1  # the reference's nonzero breaks the compiled graph
    assert data_breaks(session)
    data = json.loads(session.path.read_text())
    harness.validate_results(data)
    assert data["tiny"] is True and len(data["rows"]) == 2
    # resuming keeps the rows and measures only what is missing
    resumed = harness.Session(harness.Settings(tiny=True, impls=settings.impls,
                                               out_dir=tmp_path / "r", resume=session.path))
    outcome = resumed.measure(harness.Case("compile", shape))
    assert outcome.skip and "already measured" in outcome.skip
    assert len(json.loads(resumed.path.read_text())["rows"]) == 2


def test_run_command_end_to_end(tmp_path):
    """`python -m benchmarks.run --tiny`: pytest-benchmark suite -> JSON, PNG, table, README."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.START}\n{report.END}\n")
    before = sorted(harness.RESULTS_DIR.glob("*")) if harness.RESULTS_DIR.exists() else []
    root_readme = (ROOT / "README.md").read_text(encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--tiny", "--out", str(tmp_path / "out"),
         "--impls", "opo_kernels,eager", "-k", "bf16-padded", "--readme", str(readme)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    data = report.load(out / "cpu-tiny.json")
    assert [(r["impl"], r["layout"]) for r in data["rows"]] == [
        ("opo_kernels", "padded"), ("eager", "padded")]
    assert (out / "cpu-tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert "| opo_kernels |" in (out / "cpu-tiny.md").read_text()
    assert "| eager |" in readme.read_text()
    assert (ROOT / "README.md").read_text(encoding="utf-8") == root_readme
    after = sorted(harness.RESULTS_DIR.glob("*")) if harness.RESULTS_DIR.exists() else []
    assert after == before


def test_run_refuses_tiny_into_results_dir():
    from benchmarks import run
    with pytest.raises(SystemExit):
        run.main(["--tiny", "--out", str(harness.RESULTS_DIR)])
    with pytest.raises(SystemExit):
        run.main(["--tiny", "--readme", str(ROOT / "README.md")])


# ---- on a GPU: the real timers at tiny shapes (a pre-flight of the full run) ------------------


@pytest.mark.gpu
def test_session_on_gpu_tiny(tmp_path):
    impls = ("opo_kernels", "opo_kernels_inplace", "eager", "liger_gspo", "liger_ce")
    session = harness.Session(harness.Settings(tiny=True, impls=impls, out_dir=tmp_path))
    assert session.data["copy_gbps"] > 100
    shape = harness.shapes(tiny=True)[0]
    for impl in impls:
        outcome = session.measure(harness.Case(impl, shape))
        if impl.startswith("liger") and outcome.skip:
            continue  # liger-kernel not installed here
        assert outcome.row is not None, outcome
        assert outcome.row["timer"] in ("do_bench", "cuda-events+restore")
        assert outcome.row["peak_mem_bytes"] >= 0
    harness.validate_results(json.loads(session.path.read_text()))
