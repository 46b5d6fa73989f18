"""benchmarks/host_time.py (the package's own host time per call, launches stubbed) runs every
mode, counts the launches a call makes and leaves Triton's launch path as it found it."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import host_time  # noqa: E402

pytestmark = pytest.mark.cpu_only  # CPU tensors, launches stubbed (conftest.py)


def test_host_time_measures_every_mode_and_restores_launches():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from opo_kernels import row_kernels

    owner = type(row_kernels._opo_fwd_kernel)
    original = owner.__getitem__
    result = host_time.measure(calls=2, repeats=1, warmup=1)
    assert owner.__getitem__ is original
    assert set(result) == set(host_time.MODES)
    assert all(t.best > 0 and t.floor_best > 0 and t.median >= t.best for t in result.values())
    # general: forward row kernel, epilogue, backward row kernel; on-policy: counts-only
    # epilogue, one-pass kernel, epilogue, scale (docs/kernels.md, "Passes and launches")
    launches = {mode: t.launches for mode, t in result.items()}
    assert launches == {"general": 3, "grad_to_base": 3, "on_policy": 4, "packed": 3}
    # the real kernels still run afterwards
    x = torch.randn(4, 8, requires_grad=True)
    import opo_kernels
    loss = opo_kernels.opo_loss(x, torch.randint(0, 8, (4,)), torch.zeros(4), torch.randn(2),
                                seq_ids=torch.tensor([0, 0, 1, 1]), group_size=2,
                                backend="triton")
    assert torch.isfinite(loss)


def test_command_line_takes_tiny_and_out(tmp_path):
    """``--tiny`` and ``--out DIR``, as every side benchmark (docs/benchmarks.md)."""
    import json

    host_time.main(["--tiny", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "host_time.json").read_text())
    assert data["tiny"] is True and set(data["modes"]) == set(host_time.MODES)
    assert data["modes"]["packed"]["launches"] == 3
