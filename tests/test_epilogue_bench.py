"""The before/after epilogue benchmark (tools/gpu/epilogue_bench.py) in its tiny CPU mode: it
runs, and the legacy torch epilogue of commit 630c99a agrees with the Triton epilogue (loss and
every c_t) before anything is timed — an independent second implementation of the closed
forms."""

import pytest

from tools.gpu import epilogue_bench

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)


def test_tiny_mode_runs_and_agrees(tmp_path):
    result = epilogue_bench.run(tiny=True, out=tmp_path)
    (row,) = result["rows"]
    assert row["before_ms"] > 0 and row["after_ms"] > 0
    assert (tmp_path / "epilogue_bench.json").exists()
