"""tools/gpu/trl_check.py (OPOTrainer's paths on CUDA against the reference) in its CPU mode:
the script runs, writes its results file, passes on a correct trainer and fails when the
trainer and the reference disagree."""

import json

import pytest

pytestmark = pytest.mark.cpu_only  # the tiny mode runs the kernels in the interpreter

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from tools.gpu import trl_check  # noqa: E402


def test_tiny_run(tmp_path):
    assert trl_check.main(["--tiny", "--out", str(tmp_path), "--paths", "fused_linear,auto",
                           "--precisions", "fp32"]) == 0
    data = json.loads((tmp_path / "cpu-tiny.trl_check.json").read_text())
    assert data["device"] == "cpu-tiny" and data["vocab"] == 512
    runs = {run["path"]: run for run in data["runs"]}
    assert runs["auto"]["resolved_path"] == "fused_linear"  # off-policy schedule
    for run in runs.values():
        assert run["passed"] and run["steps"] == 2, run
        step0, step1 = run["checks"]["step0"], run["checks"]["step1"]
        assert step0["off_policy_batch"] and step1["loss"] != 0  # log-ratios != 0 at step 1
        assert step1["worst_relative_grad_error"] < 1e-4 and step1["grad_norm"] > 0


def test_a_wrong_trainer_fails(tmp_path, monkeypatch, capsys):
    """The reference with another α than the trainer's: every step is reported off."""
    reference_step = trl_check.reference_step
    monkeypatch.setattr(trl_check, "reference_step",
                        lambda *args: reference_step(*args[:-1], {"alpha": 0.2}))
    assert trl_check.main(["--tiny", "--out", str(tmp_path), "--paths", "logits",
                           "--precisions", "fp32"]) == 1
    (run,) = json.loads((tmp_path / "cpu-tiny.trl_check.json").read_text())["runs"]
    assert not run["passed"] and any("gradient off" in f for f in run["failures"])
    assert "FAILED" in capsys.readouterr().out
