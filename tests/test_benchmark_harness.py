"""The benchmark suite (benchmarks/) checked at tiny shapes, without a GPU.

What is checked: the shape grid and the byte count the GB/s come from, the results schema,
the README table generator (markers present, missing, misplaced), the plot. The harness
measuring real rows and the ``--tiny`` command: tests/test_benchmark_sessions.py. Tiny
results must never land in benchmarks/results/ or in the repository's README.md. The
fused-linear rows (loss from hidden states, gradients of hidden and weight, each
implementation's matmul floor, the second report table) are checked the same way at B=2, T=8,
H=16, V=64.
"""

import sys
from pathlib import Path

import pytest
import torch

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


def _linear_row(impl="opo_kernels_fused_linear", ms=100.0, peak=4 * GIB,
                shape=harness.LINEAR_TARGET):
    floor = harness.linear_flops(shape, impl=impl) / 700e12 * 1e3
    rows = shape.B * shape.T if shape.layout == "padded" else shape.N
    return {"impl": impl, "N": shape.N, "V": shape.V, "dtype": "bfloat16",
            "layout": shape.layout, "H": shape.H, "B": shape.B, "T": shape.T, "ms": ms,
            "gbps": 1.0, "peak_mem_bytes": peak, "floor_ms": floor, "x_floor": ms / floor,
            "floor_matmuls": harness.LINEAR_FLOOR_MATMULS[impl], "chunk_size": 1024,
            "x_floor_rows": ms / (floor * rows / shape.N),
            "tflops": harness.linear_flops(shape, impl=impl) / (ms * 1e-3) / 1e12}


# ---- pure functions --------------------------------------------------------------------------


def test_grid_target_first_and_complete():
    grid = harness.shapes(tiny=False)
    assert grid[0] == harness.TARGET == harness.Shape(16384, 151936, "bfloat16", "padded")
    # V x N x layout in bf16, + one fp32, + N in {1024, 2048} x layout at two V (host-bound)
    assert len(grid) == len(set(grid)) == 3 * 3 * 2 + 1 + 2 * 2 * 2
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
    assert len(ids) == 27 * plain + len(harness.SLICE_IMPLS) + 2 * len(harness.LINEAR_IMPLS)
    # the two fused-linear shapes: the padded target, then Quack's packed M = 4096
    packed = harness.LINEAR_PACKED
    assert (packed.N, packed.H, packed.V, packed.layout) == (4096, 4096, 128256, "packed")
    assert ids[n + len(harness.LINEAR_IMPLS):n + 2 * len(harness.LINEAR_IMPLS)] == [
        (i, packed) for i in harness.LINEAR_IMPLS]
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
    # each implementation against its own mode's floor: 3 matmuls when the backward need not
    # recompute the logits
    three = {i for i, m in harness.LINEAR_FLOOR_MATMULS.items() if m == 3}
    assert three == {"opo_kernels_fused_linear_on_policy", "opo_kernels_fused_linear_budget",
                     "opo_kernels_materialized", "cce_torch_compile"}
    assert set(harness.LINEAR_FLOOR_MATMULS) == set(harness.LINEAR_IMPLS)
    assert harness.linear_flops(lin, impl="opo_kernels_fused_linear_on_policy") == (
        3 * 2 * lin.N * 4096 * 128256)
    packed = harness.LINEAR_PACKED
    assert harness.byte_counts(packed, packed.B, packed.T)["effective"] == (
        2 * (4096 + 128256) * 4096 * 2 + 4096 * 20 + packed.B * 12)
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
                     _row("liger_gspo", ms=1.5, n=128), _row("torch_compiled", ms=2.0),
                     _row("compile", ms=4.0)])
    table = report.render_table(data)
    assert "| 64 | 128 | bf16 | padded | eager: reference (readable, slow) | 8.000 |" in table
    assert "8.00× | 8.89× | 4.00× |" in table   # eager over ours, ours in place, strong torch
    assert "| torch_compiled (strong torch, compiled) | 2.000 |" in table
    # the headline's torch denominator is the strong torch, the reference rows say what they are
    assert ("opo_kernels is 2.00× faster than the strong-torch baseline (torch_compiled), "
            "4.00× the compiled reference's time and 8.00× the eager reference's") in table
    assert "| liger_gspo | 1.500 |" in table and "| – | – |" in table  # no ours at N=128
    # and a headline where ours is the slower one says so
    slower = report.render_table(_results([_row(ms=3.0), _row("torch_compiled", ms=2.0),
                                           _row("compile", ms=4.0), _row("eager", ms=8.0)]))
    assert "opo_kernels is 1.50× slower than the strong-torch baseline (torch_compiled)" in slower
    assert "triton_grpo_loss" not in slower  # no Liger row at that shape: no Liger ratio
    # a "× faster than Liger" names the level of each of Liger's rows
    both = report.render_table(_results([_row(), _row("torch_compiled", ms=2.0),
                                         _row("liger_gspo", ms=1.34),
                                         _row("liger_grpo_token", ms=1.1)]))
    assert ("Liger's triton_grpo_loss over opo_kernels' time: liger_grpo_token (token level, "
            "2 reads + 1 write of the logits) 1.10×; liger_gspo (sequence level, GSPO: 3 reads "
            "+ 1 write) 1.34×.") in both
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
    lin, packed = harness.LINEAR_TARGET, harness.LINEAR_PACKED
    rows = [_row(), _linear_row(ms=60.0, peak=3 * GIB),
            _linear_row("opo_kernels_fused_linear_on_policy", ms=40.0, peak=3 * GIB),
            _linear_row("opo_kernels_fused_linear_budget", ms=50.0, peak=8 * GIB),
            _linear_row("opo_kernels_materialized", ms=49.0, peak=10 * GIB),
            _linear_row("cce", ms=75.0, peak=3 * GIB),
            _linear_row("trl_head", ms=50.0, peak=2 * GIB),
            _linear_row("liger_fused_linear_gspo", ms=100.0, peak=4 * GIB),
            _linear_row("opo_kernels_fused_linear_on_policy", ms=20.0, shape=packed)]
    data = _results(rows)
    harness.validate_results(data)
    table = report.render_table(data)
    first, second = table.split("Fused linear:")
    assert "| opo_kernels |" in first and "fused_linear" not in first.split("Not measured")[0]
    # the matmul rate quoted is the one every x_floor uses
    assert "700 TFLOP/s" in second and "8192×8192×8192" in second
    assert ("| padded | 16 | 1024 | 4096 | 128256 | 11469 | opo_kernels_fused_linear | 4 "
            "| 60.000 |") in second
    assert "| opo_kernels_fused_linear_on_policy | 3 | 40.000 |" in second
    assert f"| packed | 6 | {packed.T} | 4096 | 128256 | 4096 |" in second
    checks = {name: (x, limit) for name, x, limit in report.linear_targets(data)[0]["checks"]}
    floor4 = harness.linear_flops(lin) / 700e12 * 1e3
    floor3 = 0.75 * floor4
    assert checks["opo_kernels_fused_linear × its 4-matmul floor"] == (
        pytest.approx(60.0 / floor4), 1.15)
    assert checks["opo_kernels_fused_linear_on_policy × its 3-matmul floor"][0] == (
        pytest.approx(40.0 / floor3))
    assert checks["opo_kernels_fused_linear_budget ÷ opo_kernels_materialized (time)"] == (
        pytest.approx(50 / 49), 1.05)
    assert checks["opo_kernels_fused_linear ÷ cce (time)"][0] == pytest.approx(0.8)
    assert checks["opo_kernels_fused_linear ÷ trl_head (time)"][0] == pytest.approx(1.2)
    chunk = 1024 * 128256 * 2  # one chunk of our logits
    assert checks["opo_kernels_fused_linear peak ÷ (trl_head's + one chunk)"][0] == (
        pytest.approx(3 * GIB / (2 * GIB + chunk)))
    assert "opo_kernels_fused_linear ÷ cce (time) 0.80× (≤ 1.0: met)" in second
    assert "opo_kernels_fused_linear ÷ trl_head (time) 1.20× (≤ 1.0: NOT met)" in second
    assert "Quack" not in second  # its published figure is an H200's: compared there only
    data["device"] = "NVIDIA H200"
    assert "Quack's published 17.3 ms (H200) 1.16× (≤ 1.15: NOT met)" in report.render_table(
        data)
    # the other shape has one row: its other targets are "not measured"
    assert "opo_kernels_fused_linear ÷ cce (time) – (≤ 1.0: not measured)" in second
    assert report.render_linear_table(_results([_row()])) == ""


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(), _row("eager", ms=4.0), _row(layout="packed"), _row(dtype="float32"),
            _linear_row()]  # fused-linear rows are left out of the GB/s plot
    out = plot.plot(_results(rows), tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = plot.plot(_results([]), tmp_path / "empty.png")  # no rows: still a picture
    assert out.stat().st_size > 0
