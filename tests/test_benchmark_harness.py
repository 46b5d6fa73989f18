"""The benchmark suite (benchmarks/) checked at tiny shapes, without a GPU.

What is checked: the shape grid and the byte count the GB/s come from, the results schema,
the README table generator (markers present, missing, misplaced), the plot, the harness
measuring real rows (our kernels run under TRITON_INTERPRET=1, set by conftest), and the one
command ``python -m benchmarks.run --tiny`` end to end into a temp dir. Tiny results must
never land in benchmarks/results/ or in the repository's README.md. The fused-linear rows
(issue 4: loss from hidden states, grads of hidden and weight, the 4-matmul floor, the second
report table) are checked the same way at B=2, T=8, H=16, V=64; Liger's rows are skipped
without CUDA.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import opo_kernels

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)

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
            "copy_gbps": 3000.0, "matmul_tflops": 700.0, "matmul_shape": [8192, 8192, 8192],
            "rows": rows, "skipped": [
                {"impl": "eager", "N": 32768, "V": 151936, "dtype": "float32",
                 "layout": "padded", "reason": "estimated 200 GiB"}]}


def _linear_row(impl="opo_kernels_fused_linear", ms=100.0, peak=4 * GIB):
    shape = harness.LINEAR_TARGET
    floor = harness.linear_flops(shape) / 700e12 * 1e3
    return {"impl": impl, "N": shape.N, "V": shape.V, "dtype": "bfloat16", "layout": "padded",
            "H": shape.H, "B": shape.B, "T": shape.T, "ms": ms, "gbps": 1.0,
            "peak_mem_bytes": peak, "floor_ms": floor, "x_floor": ms / floor,
            "x_floor_rows": ms / (floor * shape.B * shape.T / shape.N),
            "tflops": harness.linear_flops(shape) / (ms * 1e-3) / 1e12}


# ---- pure functions --------------------------------------------------------------------------


def test_grid_target_first_and_complete():
    grid = harness.shapes(tiny=False)
    assert grid[0] == harness.TARGET == harness.Shape(16384, 151936, "bfloat16", "padded")
    assert len(grid) == len(set(grid)) == 3 * 3 * 2 + 1  # V x N x layout in bf16, + one fp32
    assert sum(s.dtype == "float32" for s in grid) == 1
    assert [c.impl for c in harness.cases(harness.Settings())][:len(harness.IMPLS)] == list(
        harness.IMPLS)


def test_fused_linear_rows_come_right_after_the_target():
    lin = harness.LINEAR_TARGET
    assert (lin.B, lin.T, lin.H, lin.V, lin.dtype, lin.layout) == (
        16, 1024, 4096, 128256, "bfloat16", "padded")
    assert lin.N == round(0.7 * 16 * 1024) == 11469 and harness.batch_geometry(lin) == (16, 1024)
    ids = [(c.impl, c.shape) for c in harness.cases(harness.Settings())]
    n = len(harness.IMPLS)
    assert ids[n:n + len(harness.LINEAR_IMPLS)] == [(i, lin) for i in harness.LINEAR_IMPLS]
    assert all((s.H is not None) == (i in harness.LINEAR_IMPLS) for i, s in ids)
    # the slice rows (the loss fed the model output's [:, :-1]) at the target shape only
    plain = len(harness.IMPLS) - len(harness.SLICE_IMPLS)
    assert len(ids) == 19 * plain + len(harness.SLICE_IMPLS) + len(harness.LINEAR_IMPLS)
    assert {s for i, s in ids if i in harness.SLICE_IMPLS} == {harness.TARGET}
    tiny = harness.linear_shapes(tiny=True)[0]
    assert (tiny.B, tiny.T, tiny.H, tiny.V) == (2, 8, 16, 64)
    # groups of 6 consecutive sequences; B=16 leaves a last group of 4
    assert harness.group_ids_for(16).bincount().tolist() == [6, 6, 4]


def test_fused_linear_bytes_floor_and_memory():
    lin = harness.LINEAR_TARGET
    counts = harness.byte_counts(lin, lin.B, lin.T)
    assert counts["effective"] == counts["dense"] == (
        2 * (16 * 1024 + 128256) * 4096 * 2 + lin.N * 20 + 16 * 12)
    assert harness.linear_flops(lin) == 4 * 2 * lin.N * 4096 * 128256
    assert harness.linear_flops(lin, 16 * 1024) == 4 * 2 * 16384 * 4096 * 128256
    for impl in harness.LINEAR_IMPLS:
        inputs, extra = harness.memory_estimate(harness.Case(impl, lin))
        assert inputs == (16 * 1024 + 128256) * 4096 * 2
        assert 0 < inputs + extra < 20 * GIB  # fits an 80 GB H100 with room


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
    harness.validate_results(_results([_linear_row()]))
    for key in ("H", "floor_ms", "x_floor"):
        row = _linear_row()
        del row[key]
        with pytest.raises(ValueError, match=key):
            harness.validate_results(_results([row]))
    data = _results([_linear_row()])
    del data["matmul_tflops"]
    with pytest.raises(ValueError, match="matmul_tflops"):
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


def test_report_fused_linear_table():
    rows = [_row(), _linear_row(ms=60.0, peak=3 * GIB),
            _linear_row("opo_kernels_materialized", ms=90.0, peak=10 * GIB),
            _linear_row("liger_fused_linear_gspo", ms=100.0, peak=4 * GIB)]
    data = _results(rows)
    harness.validate_results(data)
    table = report.render_table(data)
    first, second = table.split("Fused linear:")
    assert "| opo_kernels |" in first and "fused_linear" not in first.split("Not measured")[0]
    assert "700 TFLOP/s" in second and "8192×8192×8192" in second
    assert "| 16 | 1024 | 4096 | 128256 | 11469 | opo_kernels_fused_linear | 60.000 |" in second
    assert "| 3,072 | 0.60× | 0.75× |" in second     # ms and peak over Liger's
    assert "| 10,240 | 0.90× | 2.50× |" in second    # materialized
    t = report.linear_targets(data)[0]
    assert t["time_vs_liger"] == pytest.approx(0.6) and t["peak_vs_liger"] == pytest.approx(0.75)
    floor = harness.linear_flops(harness.LINEAR_TARGET) / 700e12 * 1e3
    assert t["x_floor"] == pytest.approx(60.0 / floor)
    assert "time ÷ Liger 0.60× (≤ 0.8: met)" in second
    assert "peak ÷ Liger 0.75× (≤ 1.0: met)" in second
    verdict = "met" if 60.0 / floor <= 1.3 else "NOT met"
    assert f"× floor {60.0 / floor:.2f}× (≤ 1.3: {verdict};" in second
    # no Liger row (e.g. not installed): ratios are "–", the targets "not measured"
    table = report.render_table(_results([_linear_row()]))
    assert "time ÷ Liger – (≤ 0.8: not measured)" in table
    assert report.render_linear_table(_results([_row()])) == ""


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(), _row("eager", ms=4.0), _row(layout="packed"), _row(dtype="float32"),
            _linear_row()]  # fused-linear rows are left out of the GB/s plot
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
    # the table says which rows came from the earlier run, and its copy bandwidth
    header = report.render_table(json.loads(resumed.path.read_text())).split("\n| N |")[0]
    assert f"resumed from it (commit `{data['commit'][:12]}`" in header


def test_session_measures_tiny_slice_rows(tmp_path):
    """The two rows that feed the loss the model output's [:, :-1] (default: autograd's slice
    backward; grad_to_base=True: none) run at the first shape, padded, with the same gradient
    w.r.t. the whole output."""
    settings = harness.Settings(tiny=True, impls=harness.SLICE_IMPLS, out_dir=tmp_path)
    session = harness.Session(settings)
    shape = harness.shapes(tiny=True)[0]
    assert shape.layout == "padded"
    grads = []
    for case in harness.cases(settings):
        assert case.shape == shape
        outcome = session.measure(case)
        assert outcome.row is not None and outcome.row["ms"] > 0, outcome
        inp = harness.make_inputs(case.shape, torch.device("cpu"), seed=0)
        leaf = inp.storage.detach().requires_grad_()
        loss = opo_kernels.opo_loss(leaf[:, :-1], inp.labels, inp.ref_logprobs, inp.rewards,
                                    group_size=harness.GROUP_SIZE, backend="triton",
                                    grad_to_base=case.impl == "opo_kernels_grad_to_base",
                                    mask=inp.mask)
        grads.append(torch.autograd.grad(loss, leaf)[0])
    assert [r["impl"] for r in session.data["rows"]] == list(harness.SLICE_IMPLS)
    assert torch.equal(grads[0], grads[1]) and (grads[1][:, -1] == 0).all()


def test_session_measures_tiny_fused_linear_rows(tmp_path):
    settings = harness.Settings(tiny=True, impls=harness.LINEAR_IMPLS, out_dir=tmp_path)
    session = harness.Session(settings)
    rate = session.data["matmul_tflops"]
    assert rate > 0 and session.data["matmul_shape"] == list(
        harness.MATMUL_SHAPE if harness.cuda_ok() else harness.MATMUL_SHAPE_TINY)
    shape = harness.linear_shapes(tiny=True)[0]
    for case in harness.cases(settings):
        assert case.shape == shape
        outcome = session.measure(case)
        if case.impl == "liger_fused_linear_gspo" and not harness.cuda_ok():
            assert outcome.skip and "CUDA" in outcome.skip
            continue
        if case.impl.startswith("liger") and outcome.skip:
            continue  # liger-kernel not installed
        row = outcome.row
        assert row is not None, outcome
        assert (row["H"], row["B"], row["T"], row["rows"]) == (16, 2, 8, 16)
        assert row["bytes"] == harness.linear_byte_counts(shape)["effective"]
        floor = harness.linear_flops(shape) / (rate * 1e12) * 1e3
        assert row["floor_ms"] == pytest.approx(floor)
        assert row["x_floor"] == pytest.approx(row["ms"] / floor)
        assert row["x_floor_rows"] == pytest.approx(row["ms"] / (floor * 16 / shape.N))
    assert [r["impl"] for r in session.data["rows"]][:2] == list(harness.LINEAR_IMPLS[:2])
    first = session.data["rows"][0]
    assert first["chunk_size"] == 16  # 16 rows < V = 64: one block of all 64 columns
    assert (first["backward_cuts"], first["vocab_block"]) == ("vocabulary", 64)
    data = report.load(session.path)  # validates the schema, H and the floor included
    assert "| 2 | 8 | 16 | 64 | 11 | opo_kernels_fused_linear |" in report.render_table(data)
    # resuming knows the fused-linear rows by their H as well
    resumed = harness.Session(harness.Settings(tiny=True, impls=settings.impls,
                                               out_dir=tmp_path / "r", resume=session.path))
    outcome = resumed.measure(harness.Case("opo_kernels_materialized", shape))
    assert outcome.skip and "already measured" in outcome.skip


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
         "--impls", "opo_kernels,eager,opo_kernels_fused_linear,liger_fused_linear_gspo",
         "-k", "bf16-padded", "--readme", str(readme)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    data = report.load(out / "cpu-tiny.json")
    assert [(r["impl"], r["layout"]) for r in data["rows"]] == [
        ("opo_kernels", "padded"), ("eager", "padded"), ("opo_kernels_fused_linear", "padded")]
    assert data["rows"][2]["H"] == 16 and data["matmul_tflops"] > 0
    assert [s["impl"] for s in data["skipped"]] == ["liger_fused_linear_gspo"]  # no CUDA here
    assert (out / "cpu-tiny.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "cpu-tiny.md").read_text()
    assert "| opo_kernels |" in md and "| opo_kernels_fused_linear |" in md
    assert "Fused linear:" in md and "liger_fused_linear_gspo B=2 T=8 H=16" in md
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
    impls = ("opo_kernels", "opo_kernels_inplace", "eager", "liger_gspo", "liger_ce",
             *harness.SLICE_IMPLS)
    session = harness.Session(harness.Settings(tiny=True, impls=impls + harness.LINEAR_IMPLS,
                                               out_dir=tmp_path))
    assert session.data["copy_gbps"] > 100 and session.data["matmul_tflops"] > 1
    shape, linear = harness.shapes(tiny=True)[0], harness.linear_shapes(tiny=True)[0]
    for impl in impls + harness.LINEAR_IMPLS:
        case = harness.Case(impl, linear if impl in harness.LINEAR_IMPLS else shape)
        outcome = session.measure(case)
        if impl.startswith("liger") and outcome.skip:
            continue  # liger-kernel not installed here
        assert outcome.row is not None, outcome
        assert outcome.row["timer"] in ("do_bench", "cuda-events+restore")
        assert outcome.row["peak_mem_bytes"] >= 0
    harness.validate_results(json.loads(session.path.read_text()))
