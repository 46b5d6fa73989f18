"""The host-overhead benchmark (benchmarks/host_overhead.py) in its tiny CPU mode: the three
steps it times (general call, on-policy call, epilogue alone) run and are written out. The
CUDA-graph replay it adds on a GPU is the capture tested in tests/test_cuda_graph.py."""

import json

import pytest

from benchmarks import host_overhead

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)


def test_tiny_mode_runs(tmp_path):
    result = host_overhead.run(tiny=True, out=tmp_path)
    assert [r["what"] for r in result["rows"]] == ["general", "on_policy", "epilogue"]
    assert all(r["eager_ms"] > 0 and "graph_ms" not in r for r in result["rows"])
    saved = json.loads((tmp_path / "host_overhead.json").read_text())
    assert saved["rows"] == result["rows"]


def test_grid_has_the_trainer_micro_batch_rows():
    from benchmarks.cases import HOST_TIME_MAX_N, Shape, shapes

    grid = shapes(False)
    for v in (151936, 32000):
        for layout in ("padded", "packed"):
            for n in (1024, 2048, 4096):
                assert Shape(n, v, "bfloat16", layout) in grid
                assert n <= HOST_TIME_MAX_N  # each gets the host-time column
    assert len(grid) == len(set(grid))
    # capture needs no host sync: the references (nonzero) are left out
    assert {"opo_kernels", "liger_ce", "liger_gspo"} <= set(host_overhead.CAPTURABLE)
    assert not {"eager", "compile"} & set(host_overhead.CAPTURABLE)


def test_report_lists_the_host_time_of_the_rows_that_have_it():
    from benchmarks import report

    rows = [{"impl": "opo_kernels", "N": 1024, "V": 32000, "dtype": "bfloat16",
             "layout": "padded", "ms": 0.9, "gbps": 100.0, "peak_mem_bytes": 1 << 20,
             "replay_ms": 0.3, "host_ms": 0.6},
            {"impl": "eager", "N": 1024, "V": 32000, "dtype": "bfloat16", "layout": "padded",
             "ms": 5.0, "gbps": 10.0, "peak_mem_bytes": 1 << 20}]
    data = {"device": "Test GPU", "torch": "2.x", "triton": "3.x", "commit": "abc",
            "copy_gbps": 3000.0, "rows": rows, "skipped": []}
    text = report.render_table(data)
    assert "| 1024 | 32000 | padded | opo_kernels | 0.900 | 0.300 | 0.600 |" in text
    assert "| 5.000 |" not in text.split("Host time per call")[1]  # no column: no row
