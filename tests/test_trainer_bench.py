"""benchmarks/trainer_bench.py (OPOTrainer's default against GRPOTrainer's) runs on CPU at tiny
size: every row is measured, the results file has the fields the GPU run reports, OPOTrainer's
default runs the fused-linear loss off-policy, and its loss paths compute the same loss and
gradient on the same batch (off-policy, so that the loss is not 0). No timing claim on CPU."""

import json

import pytest

pytestmark = pytest.mark.cpu_only  # the tiny mode runs the kernels in the interpreter

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from benchmarks import trainer_bench  # noqa: E402


def test_tiny_run(tmp_path):
    assert trainer_bench.main(["--tiny", "--out", str(tmp_path), "--schedules", "off_policy",
                               "--steps", "1", "--warmup", "1"]) == 0
    data = json.loads((tmp_path / "cpu-tiny.trainer.json").read_text())
    assert data["device"] == "cpu-tiny" and data["errors"] == []
    rows = {row["run"]: row for row in data["rows"]}
    assert set(rows) == set(trainer_bench.RUNS)
    assert rows["grpo"]["trainer"] == "GRPOTrainer"
    assert {name: rows[name]["loss_path"] for name in trainer_bench.RUNS} == {
        "grpo": "trl_fused_head", "opo": "fused_linear", "opo_fused_linear": "fused_linear",
        "opo_fused_linear_1gib": "fused_linear", "opo_trl_fused_head": "trl_fused_head",
        "opo_logits": "logits"}
    for row in rows.values():
        assert row["schedule"] == "off_policy" and row["steps"] == 1
        assert row["step_ms"] > 0 and row["peak_mem_bytes"] is None  # no memory figure on CPU
        assert row["vs_grpo"]["step_ms"] == pytest.approx(row["step_ms"]
                                                          / rows["grpo"]["step_ms"])
        assert 0 < row["counted"] < row["tokens"]
    opo = rows["opo"]
    assert opo["first_loss"] != 0 and opo["first_grad_norm"] > 0
    for name in ("opo_fused_linear", "opo_fused_linear_1gib", "opo_trl_fused_head",
                 "opo_logits"):
        assert rows[name]["first_loss"] == pytest.approx(opo["first_loss"], rel=1e-5)
        assert rows[name]["first_grad_norm"] == pytest.approx(opo["first_grad_norm"], rel=1e-5)


@pytest.mark.parametrize("argv, match", [
    (["--micro-batch", "3"], "multiple of --group"),
    (["--runs", "grpo,ppo"], "--runs"),
    (["--model", "gpt5"], "unknown 'gpt5'"),
], ids=["partial-groups", "runs", "model"])
def test_bad_arguments(tmp_path, argv, match, capsys):
    with pytest.raises(SystemExit):
        trainer_bench.main(["--tiny", "--out", str(tmp_path), *argv])
    assert match in capsys.readouterr().err
