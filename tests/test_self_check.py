"""The self-check ``python -m opo_kernels`` (the first thing a GPU session runs): it exits 0 and
prints OK when the fused loss and the reference agree with the float64 oracle, 1 when one is
over its tolerance; without CUDA it restarts itself under the Triton interpreter; importing its
module (tests/test_gpu.py shares ``padded_problem``) has no side effect.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opo_kernels import __main__ as self_check

REPO = Path(__file__).resolve().parents[1]
# V = 1000 as in the kernel-vs-reference grid: on CUDA, the same compiled variants
SMALL = ["--B", "3", "--T", "8", "--V", "1000", "--group-size", "3", "--repeats", "1"]


@pytest.mark.cpu_only
def test_runs_and_restarts_under_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "opo_kernels", *SMALL], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "self-check on CPU (Triton interpreter)" in out.stdout
    assert out.stdout.rstrip().endswith("OK")
    assert "over tolerance" not in out.stdout


@pytest.mark.cpu_only  # (main() with the CPU default; on CUDA the device run calls it itself)
def test_exits_1_when_an_error_is_over_its_tolerance(monkeypatch, capsys):
    assert self_check.main(SMALL) == 0
    monkeypatch.setitem(self_check.GRAD_TOL, torch.bfloat16, 0.0)  # no bf16 gradient meets 0
    assert self_check.main(SMALL) == 1
    printed = capsys.readouterr().out
    assert "over tolerance" in printed and printed.rstrip().endswith("FAILED")


def test_padded_problem_is_the_shifted_view_and_seeded():
    logits, labels, ref, rewards, mask = self_check.padded_problem(2, 5, 7, torch.float32, "cpu")
    assert logits.shape == (2, 5, 7) and logits.stride() == (6 * 7, 7, 1)  # [:, :-1] of T + 1
    assert labels.shape == ref.shape == mask.shape == (2, 5) and rewards.shape == (2,)
    again = self_check.padded_problem(2, 5, 7, torch.float32, "cpu")
    assert all(torch.equal(a, b) for a, b in zip((logits, labels, ref, rewards, mask), again))
