"""The launch-config sweep (benchmarks/sweep.py) in its tiny CPU mode: every kernel kind runs
under each forced launch config (a pipelined one among them) through the package's launchers,
and its output passes the script's own check at the timed shape (log-probs vs torch, gradient
rows vs the closed form) before it is timed — so a config that computes wrong fails here, not
on the GPU. Also the occupancy arithmetic the NOTES' candidate table is built on."""

import json

import pytest

from benchmarks import sweep

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)


def test_tiny_sweep(tmp_path):
    results = sweep.sweep(tiny=True, out=tmp_path)
    kinds = {(r["kind"], r["dtype"], r["BLOCK_V"], r["stages"]) for r in results}
    assert len(kinds) == len(results) == 3 * 2 * 2
    assert {r["stages"] for r in results} == {1, 2}
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in results)
    lines = (tmp_path / "sweep.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["rows"] == 16 and len(lines) == 1 + len(results)
    best = sweep.best_rows(results)
    assert len(best) == 3 * 2 and all(b in results for b in best)


def test_tiny_sweep_config_that_computes_wrong_fails(monkeypatch):
    """The check before timing is real: a launcher whose forward writes wrong log-probs
    makes the sweep stop with an AssertionError."""
    from opo_kernels import row_launch

    original = row_launch.forward_rows

    def wrong(*args, **kwargs):
        out = original(*args, **kwargs)
        if out is not None and "grad" not in kwargs:
            out[0].add_(0.01)
        return out

    monkeypatch.setattr(row_launch, "forward_rows", wrong)
    with pytest.raises(AssertionError):
        sweep.sweep(tiny=True, out=None, configs=[(64, 4, 1)])


@pytest.mark.parametrize("regs,warps,smem,expected", [
    (46, 16, 0, 2),       # 48 regs x 512 threads = 24,576 -> 2 programs
    (32, 16, 0, 4),       # registers allow 4, threads allow 4
    (63, 4, 0, 8),        # 64 x 128 = 8,192 -> 8
    (32, 4, 0, 16),       # registers allow 16, threads 16
    (40, 16, 16448, 3),   # registers: 3; shared memory: 13
    (40, 2, 100_000, 2),  # shared memory: 228 KiB / (100,000 + 1 KiB) = 2
])
def test_programs_per_sm(regs, warps, smem, expected):
    assert sweep.programs_per_sm(regs, warps, smem) == expected


def test_tiny_focus(tmp_path):
    """--focus: the FOCUS list's kinds and configs (programs per SM, rows not counted) run
    checked through the launchers; the bytes credited count rows not counted as written only
    (and not at all for the forward)."""
    results = sweep.sweep(tiny=True, out=tmp_path, focus=True)
    assert [(r["kind"], r["programs_per_sm"], r["reverse"], r["uncounted"])
            for r in results] == [
        (kind, config[3] if len(config) > 3 else 0, len(config) > 4 and config[4], uncounted)
        for kind, config, uncounted in sweep.TINY_FOCUS]
    assert any(r["reverse"] for r in results)
    lines = (tmp_path / "sweep_focus.jsonl").read_text().splitlines()
    assert len(lines) == 1 + len(results)
    rows, row_bytes = 16, 200 * 2  # 6 of the 16 rows are not counted (index % 10 < 3)
    for r in results:
        counted = rows - 6 if r["uncounted"] else rows
        expected = (counted + (0 if r["kind"] == "fwd" else rows)) * row_bytes
        assert abs(r["gbps"] * r["ms"] * 1e6 - expected) < 1e-6 * expected, r
