"""The vocabulary-parallel benchmark (benchmarks/tp_bench.py) in its tiny CPU mode: two gloo
ranks spawned by the script time both on-policy modes and rank 0 writes the JSON the GPU run
commits."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_mode_runs_both_modes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.tp_bench", "--tiny", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "tp_bench.json").read_text())
    assert result["world"] == 2
    (row,) = result["rows"]
    assert row["general_ms"] > 0 and row["one_pass_ms"] > 0
    assert row["one_pass_speedup"] == pytest.approx(row["general_ms"] / row["one_pass_ms"])
