"""A training loop whose batch shape changes every step (B and T do, in RL) compiles each kernel
once: no kernel argument that follows B or T is specialized by Triton (``tools/gpu/jit_keys.py``
computes the JIT keys with Triton's own binder at six (B, T) that change T % 16 and B % 16).

Before this was checked, the epilogue (~3-5 s to compile for sm_90 on this machine), the row
kernels and the log-prob gradient kernel recompiled whenever T % 16 or B % 16 changed, through
the strides over sequences of the [B, T] inputs (T or T + 1) and the sequence count. Runs in a
subprocess because this process has the interpreter switched on.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_only  # needs the real JIT functions (conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scenarios():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-m", "tools.gpu.jit_keys", "--json"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["scenarios"]


EXPECTED_KERNELS = {
    "padded-general": {"_opo_fwd_kernel", "_opo_bwd_kernel", "epilogue_kernel"},
    "padded-on-policy-entropy": {"_opo_fwd_kernel", "_scale_kernel", "epilogue_kernel"},
    "packed-general": {"_opo_fwd_kernel", "_opo_bwd_kernel", "epilogue_kernel"},
    "from-logprobs": {"_logprob_grad_kernel", "epilogue_kernel"},
    "fused-linear": {"_opo_fwd_kernel", "_opo_bwd_kernel", "epilogue_kernel"},
}


@pytest.mark.parametrize("scenario", sorted(EXPECTED_KERNELS))
def test_changing_shapes_compile_each_kernel_once(scenarios, scenario):
    counts = scenarios[scenario]
    assert set(counts) == EXPECTED_KERNELS[scenario]  # the recorder saw every launch site
    grew = {k: n for k, n in counts.items() if n["all"] != n["first"]}
    assert not grew, f"kernels recompiled for a new (B, T): {grew}"


def test_on_policy_epilogue_has_its_two_launch_variants(scenarios):
    """The counts-only pre-pass and the loss epilogue are two variants of one kernel (HAS_LP):
    the key count is not trivially 1, so the binder's keys do tell variants apart."""
    assert scenarios["padded-on-policy-entropy"]["epilogue_kernel"] == {"first": 2, "all": 2}


def test_suite_variants_records_and_compiles_a_suite_slice(tmp_path):
    from triton.runtime import interpreter

    if "run" not in interpreter.InterpretedFunction.__dict__:
        pytest.skip("tools/gpu/suite_variants.py records launches through the interpreter's "
                    "run method (a closure per kernel in Triton 3.4)")
    """``tools/gpu/suite_variants.py`` (run by hand: ~15 min for the whole suite) on a slice of
    the suite: the float64 gradcheck launches of both layouts are recorded, rebuilt with the same
    keys and compiled for sm_90."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "tools.gpu.suite_variants", "--workers", "1", "--dir",
         str(tmp_path), "--pytest-args",
         "tests/test_gradcheck.py -k 'sequence-ratio-tensor and triton'"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "[suite_variants] interpreter suite: exit code 0" in out.stdout
    launched = next(ln for ln in lines if "distinct kernel variants launched" in ln)
    assert int(launched.split()[1]) >= 4, launched  # fwd, bwd, epilogue; two layouts
    kernels = {ln.split()[0] for ln in lines if ln.startswith("  _") or ln.startswith("  epi")}
    assert {"_opo_fwd_kernel", "_opo_bwd_kernel", "epilogue_kernel"} <= kernels, out.stdout
    assert "[suite_variants] 0 variant(s) failed, spilled or did not rebuild" in out.stdout
