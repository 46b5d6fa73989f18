"""Smoke test of the demo (``python -m opo_kernels.demo``): both RL runs at tiny settings.

Tiny on purpose (2 steps, a 1-layer d=16 model, 2 prompts x 6 samples): it checks the plumbing
(rollouts, both losses, the outputs), not learning; the real run is docs/demo_curves.png.
"""

import json
import math

import pytest

pytest.importorskip("matplotlib")
demo = pytest.importorskip("opo_kernels.demo")

TINY = ["--steps", "2", "--seeds", "0", "--prompts", "2", "--digits", "4", "--length", "3",
        "--d-model", "16", "--n-layer", "1", "--n-head", "2", "--no-progress"]


def _check_outputs(out, steps):
    curves = json.loads((out / "curves.json").read_text())
    for method in ("opo", "gspo"):
        for key in ("reward", "grad_norm"):
            values = curves[method][key]
            assert len(values) == steps, (method, key)
            assert all(math.isfinite(v) for v in values), (method, key, values)
        assert all(0.0 <= r <= 1.0 for r in curves[method]["reward"])
        assert all(g > 0 for g in curves[method]["grad_norm"])
        assert len(curves["per_seed"]["0"][method]["reward"]) == steps
    assert curves["config"]["group_size"] == 6
    assert (out / "curves.png").stat().st_size > 0
    return curves


def test_demo_torch_backend(tmp_path):
    # backend "torch": the PyTorch reference, fast on CPU (conftest turns the interpreter on)
    curves = demo.main(TINY + ["--backend", "torch", "--out", str(tmp_path)])
    _check_outputs(tmp_path, 2)
    assert curves["config"]["opo_kernels_backend"] == "torch"


def test_demo_triton_backend(tmp_path):
    # backend "auto" -> the fused Triton kernels (interpreted: conftest sets TRITON_INTERPRET=1)
    curves = demo.main(TINY + ["--steps", "1", "--out", str(tmp_path)])
    _check_outputs(tmp_path, 1)
    assert curves["config"]["opo_kernels_backend"] == "triton"
