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
