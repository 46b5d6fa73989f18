"""Every kernel variant the package launches compiles for sm_90 (H100/H200) with the real Triton
compiler — no GPU needed, Triton ships ptxas — from the arguments of a real launch
(``tools/gpu/aot_check.py`` records them), and the compiled code has the properties the
roofline needs (docs/kernels.md):

- no register spills (local memory 0), in every variant;
- 16-bit logits are read with 16-byte vector loads (``ld.global.v4`` / ``LDG.E.128``) in the
  forward and backward loops, and the gradient written with 16-byte stores;
- the exponentials of the row loops are ``ex2.approx.ftz`` (no non-flush-to-zero ``ex2``: its
  extra compare and predicated multiplies per element cost issue slots).

The interpreter tests cannot see any of this. Runs in a subprocess because this process has the
interpreter switched on.
"""

import json
import os
import subprocess
import sys

import pytest
from triton.runtime.jit import JITFunction

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)
if not hasattr(JITFunction, "_pack_args"):
    pytest.skip("tools/gpu/aot_check.py builds a launch's source with JITFunction._pack_args, "
                "which this Triton lacks (3.4 does; 3.6, the GPU image's, has it)",
                allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's notice; fusion is the default
    out = subprocess.run([sys.executable, "-m", "tools.gpu.aot_check", "--json"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["variants"]


def test_every_variant_compiles_without_spills(compiled):
    assert {"fwd-bf16", "fwd-bf16-onepass", "fwd-bf16-partial", "bwd-bf16", "scale-bf16",
            "epilogue-padded", "epilogue-packed-ids", "logprob-grad", "fwd-fp64",
            "combine-tp8-entropy"} <= set(compiled)
    spills = {name: row["spill_bytes"] for name, row in compiled.items()}
    assert all(v == 0 for v in spills.values()), f"register spills: {spills}"


SIXTEEN_BIT = [n for n in ("fwd-bf16", "fwd-bf16-entropy", "fwd-bf16-onepass",
                           "fwd-bf16-entropy-onepass", "fwd-bf16-partial", "fwd-bf16-packed",
                           "fwd-fp16", "bwd-bf16", "bwd-bf16-entropy-token", "bwd-fp16",
                           "scale-bf16", "fwd-bf16-persistent",
                           "fwd-bf16-onepass-persistent", "fwd-bf16-onepass-forward")]


@pytest.mark.parametrize("name", SIXTEEN_BIT)
def test_16bit_rows_use_16_byte_accesses(compiled, name):
    row = compiled[name]
    assert row["ld_v4"] >= 1 and row["ldg128"] >= 1, row
    if "bwd" in name or "onepass" in name or "scale" in name:  # they write the gradient
        assert row["st_v4"] >= 1 and row["stg128"] >= 1, row


@pytest.mark.parametrize("name", ["fwd-bf16-stages2", "bwd-bf16-stages2",
                                  "fwd-bf16-onepass-stages2"])
def test_pipelined_loop_prefetches_with_16_byte_async_copies(compiled, name):
    """stages = 2 (a launch-config candidate) pipelines the vocabulary loop: the next block is
    fetched into shared memory with 16-byte cp.async while this one is reduced; stages = 1
    (the default table) keeps plain 16-byte register loads and no shared-memory staging."""
    row = compiled[name]
    assert row["cp_async16"] >= 1 and row["smem_dynamic"] >= 8192 * 2, row
    plain = compiled[name.replace("-stages2", "")]
    assert plain["cp_async16"] == 0 and plain["ld_v4"] >= 1, plain


@pytest.mark.parametrize("name", [n for n in SIXTEEN_BIT if n != "scale-bf16"]
                         + ["fwd-fp32", "bwd-fp32", "fwd-bf16-stages2", "bwd-bf16-stages2",
                            "combine-tp8", "combine-tp8-entropy"])
def test_row_exponentials_flush_to_zero(compiled, name):
    row = compiled[name]
    assert row["ex2_ftz"] >= 1 and row["ex2_nonftz"] == 0, row


def test_reverse_gradient_pass_keeps_16_byte_accesses(compiled):
    """The one-pass gradient pass walking the row backwards (the table's choice) computes its
    block starts as (last − i)·BLOCK_V: the compiler must still know them aligned, so the
    backward walk has as many 16-byte loads and stores as the forward one, and no spill."""
    back, forward = compiled["fwd-bf16-onepass"], compiled["fwd-bf16-onepass-forward"]
    for key in ("ld_v4", "st_v4", "ldg128", "stg128"):
        assert back[key] == forward[key] >= 1, (key, back, forward)
    assert back["spill_bytes"] == 0
