"""The demo (``python -m opo_kernels.demo``): smoke runs at tiny settings, and the parts that
can be checked exactly (the variable-length task's reward and mask, the paired bootstrap).

Tiny on purpose (2 steps, a 1-layer d=16 model, 2 prompts x 6 samples): it checks the plumbing
(rollouts of both tasks, the four losses, the outputs), not learning; the real runs are the
figures in docs/.
"""

import json
import math
import sys

import pytest
import torch

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)

pytest.importorskip("matplotlib")
demo = pytest.importorskip("opo_kernels.demo")
from opo_kernels.demo.report import bootstrap_interval  # noqa: E402
from opo_kernels.demo.tasks import Rollout, SortStopTask, SortTask  # noqa: E402

TINY = ["--steps", "2", "--seeds", "0", "1", "--prompts", "2", "--digits", "4", "--length", "3",
        "--d-model", "16", "--n-layer", "1", "--n-head", "2", "--no-progress"]
METHODS = ("opo_paper", "opo_paper_centered", "opo_author", "gspo")


def _check_outputs(out, steps, tasks=("sort", "sort_stop")):
    result = json.loads((out / "curves.json").read_text())
    for task in tasks:
        curves = result["tasks"][task]
        for method in METHODS:
            for key in ("reward", "grad_norm", "length"):
                values = curves["mean"][method][key]
                assert len(values) == steps, (task, method, key)
                assert all(math.isfinite(v) for v in values), (task, method, key, values)
            assert all(0.0 <= r <= 1.0 for r in curves["mean"][method]["reward"])
            assert all(g > 0 for g in curves["mean"][method]["grad_norm"])
            assert len(curves["per_seed"]["0"][method]["reward"]) == steps
        summary = curves["summary"]
        assert summary["opo_paper"]["final_reward_minus_gspo_ci95"] is not None  # 2 seeds
        assert (out / f"curves_{task}.png").stat().st_size > 0
    assert result["config"]["group_size"] == 6
    return result


def test_demo_torch_backend(tmp_path):
    # backend "torch": the PyTorch reference, fast on CPU (conftest turns the interpreter on)
    result = demo.main(TINY + ["--backend", "torch", "--out", str(tmp_path)])
    _check_outputs(tmp_path, 2)
    assert result["config"]["opo_kernels_backend"] == "torch"
    lengths = result["tasks"]["sort"]["mean"]["gspo"]["length"]
    assert lengths == [3.0, 3.0]  # fixed-length task


def test_demo_triton_backend(tmp_path):
    # backend "auto" -> the fused Triton kernels (interpreted: conftest sets TRITON_INTERPRET=1)
    result = demo.main(TINY + ["--steps", "1", "--tasks", "sort_stop", "--out", str(tmp_path)])
    _check_outputs(tmp_path, 1, tasks=("sort_stop",))
    assert result["config"]["opo_kernels_backend"] == "triton"


def test_sort_stop_reward_and_mask():
    task = SortStopTask(digits=8, length=5)
    eos = 8
    prompts = torch.tensor([[-1, -1, 3, 1, 2], [5, 4, 3, 2, 1], [-1, -1, -1, 7, 0]])
    answers = torch.tensor([[1, 2, 3, eos, 0, 0],     # right, stops right: 1
                            [1, 2, eos, 4, 5, eos],   # stops early: 2 hits / 5
                            [0, 7, 1, 1, 1, 1]])      # never stops: 2 hits / 6 tokens
    roll = Rollout(None, answers, task.completion_mask(answers), None)
    assert torch.allclose(task.reward(prompts, roll), torch.tensor([1.0, 0.4, 2 / 6]))
    assert task.lengths(roll).tolist() == [4.0, 3.0, 6.0]  # counted tokens, EOS included
    assert SortTask(digits=8, length=5).constant_baseline() == pytest.approx(0.340, abs=1e-3)


def test_bootstrap_interval():
    assert bootstrap_interval([0.1], 1000) is None
    lo, hi = bootstrap_interval([0.10, 0.12, 0.08, 0.11], 2000)
    assert 0.08 <= lo < hi <= 0.12  # the mean of resampled seeds stays within their range
    lo, hi = bootstrap_interval([-1.0, 1.0, -1.0, 1.0], 2000)
    assert lo < 0 < hi


ONE_RUN = ["--steps", "1", "--seeds", "0", "--prompts", "2", "--digits", "4", "--length", "3",
           "--d-model", "16", "--n-layer", "1", "--n-head", "2", "--tasks", "sort",
           "--methods", "gspo", "--backend", "torch"]


@pytest.mark.parametrize("terminal", [False, True], ids=["log-file", "terminal"])
def test_progress_bars_only_on_a_terminal(tmp_path, capsys, monkeypatch, terminal):
    """In a log file (CI) every redraw of a bar is a new line: the bars are off there."""
    pytest.importorskip("tqdm")
    monkeypatch.setattr(type(sys.stderr), "isatty", lambda self: terminal, raising=False)
    demo.main(ONE_RUN + ["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert ("sort gspo seed 0" in err) == terminal, err[-500:]


def test_triton_backend_on_cpu_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """Without a GPU or the interpreter, --backend triton ends in argparse's usage error (exit
    code 2) naming the way out, not in a traceback from inside the loss."""
    monkeypatch.setattr(demo, "interpreter_on", lambda: False)
    with pytest.raises(SystemExit) as exc:
        demo.main(ONE_RUN[:-2] + ["--backend", "triton", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--backend triton" in err and "--device cuda" in err and "TRITON_INTERPRET=1" in err
