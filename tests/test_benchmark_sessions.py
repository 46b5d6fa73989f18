"""The benchmark harness (benchmarks/) measuring real rows at tiny shapes: our kernels under
TRITON_INTERPRET=1 (set by conftest) on the CPU, every fused-linear implementation and peer
at both tiny shapes, the strong torch and Liger rows, and the one command
``python -m benchmarks.run --tiny`` end to end into a temp dir (tiny results never land in
benchmarks/results/); on a GPU, the same at tiny shapes with the real timers. The harness's
pure functions, schema and report: tests/test_benchmark_harness.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import opo_kernels

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import harness, peers, report  # noqa: E402

# ---- the harness measuring real rows (interpreter on CPU) -------------------------------------


def data_breaks(session):
    return any("nonzero" in r or "Dynamic shape" in r
               for r in session.data["compile_graph_breaks"])


def test_session_measures_tiny_rows(tmp_path):
    settings = harness.Settings(tiny=True, impls=("opo_kernels_inplace", "compile"),
                                out_dir=tmp_path, compile_backend="eager")
    session = harness.Session(settings)
    shape = harness.shapes(tiny=True)[1]  # bf16 packed
    for impl in settings.impls:
        outcome = session.measure(harness.Case(impl, shape))
        assert outcome.row is not None, outcome
        row = outcome.row
        assert row["ms"] > 0 and row["gbps"] > 0 and row["inplace"] == (impl != "compile")
        assert row["bytes"] == harness.byte_counts(shape, row["B"], row["T"])["effective"]
        # one timer for every implementation, in place or not
        assert row["timer"] == ("cuda-events" if harness.cuda_ok() else "host-clock")
    assert row["graph_breaks"] >= 1  # the reference's nonzero breaks the compiled graph
    assert data_breaks(session)
    data = json.loads(session.path.read_text())
    harness.validate_results(data)
    assert data["tiny"] is True and len(data["rows"]) == 2
    # resuming keeps the rows and measures only what is missing
    resumed = harness.Session(harness.Settings(tiny=True, impls=settings.impls,
                                               out_dir=tmp_path / "r", resume=session.path))
    outcome = resumed.measure(harness.Case("compile", shape))
    assert outcome.skip and "already measured" in outcome.skip
    assert len(json.loads(resumed.path.read_text())["rows"]) == 2
    # the table says which rows came from the earlier run, and its copy bandwidth
    header = report.render_table(json.loads(resumed.path.read_text())).split("\n| N |")[0]
    assert f"resumed from it (commit `{data['commit'][:12]}`" in header


def test_session_measures_tiny_slice_rows(tmp_path):
    """The two rows that feed the loss the model output's [:, :-1] (default: autograd's slice
    backward; grad_to_base=True: none) run at the first shape, padded, with the same gradient
    w.r.t. the whole output."""
    settings = harness.Settings(tiny=True, impls=harness.SLICE_IMPLS, out_dir=tmp_path)
    session = harness.Session(settings)
    shape = harness.shapes(tiny=True)[0]
    assert shape.layout == "padded"
    grads = []
    for case in harness.cases(settings):
        assert case.shape == shape
        outcome = session.measure(case)
        assert outcome.row is not None and outcome.row["ms"] > 0, outcome
        inp = harness.make_inputs(case.shape, torch.device("cpu"), seed=0)
        leaf = inp.storage.detach().requires_grad_()
        loss = opo_kernels.opo_loss(leaf[:, :-1], inp.labels, inp.ref_logprobs, inp.rewards,
                                    group_size=harness.GROUP_SIZE, backend="triton",
                                    grad_to_base=case.impl == "opo_kernels_grad_to_base",
                                    mask=inp.mask)
        grads.append(torch.autograd.grad(loss, leaf)[0])
    assert [r["impl"] for r in session.data["rows"]] == list(harness.SLICE_IMPLS)
    assert torch.equal(grads[0], grads[1]) and (grads[1][:, -1] == 0).all()


def test_session_measures_tiny_fused_linear_rows(tmp_path):
    """Every fused-linear implementation at both tiny shapes (padded B=2 T=8, packed N=12),
    each row's floor that of its own mode on the counted tokens, at the rate of the run."""
    settings = harness.Settings(tiny=True, impls=harness.LINEAR_IMPLS, out_dir=tmp_path)
    session = harness.Session(settings)
    rate = session.data["matmul_tflops"]
    assert rate > 0 and session.data["matmul_shape"] == list(
        harness.MATMUL_SHAPE if harness.cuda_ok() else harness.MATMUL_SHAPE_TINY)
    padded, packed = harness.linear_shapes(tiny=True)
    assert (packed.layout, packed.N, packed.H, packed.V) == ("packed", 12, 16, 64)
    measured = []
    for case in harness.cases(settings):
        assert case.shape in (padded, packed)
        outcome = session.measure(case)
        if case.impl == "opo_kernels_fused_linear_budget" and outcome.skip:
            assert "logits_budget" in outcome.skip  # opo_kernels without the keyword
            continue
        if case.impl == "cce_filtered" and not harness.cuda_ok():
            assert outcome.skip and "Triton kernels only (CUDA)" in outcome.skip
            continue
        if case.impl == "cce_torch_compile" and not harness.cuda_ok():
            assert outcome.skip and "already runs" in outcome.skip
            continue
        if case.impl == "torch_lce" and peers.unavailable("torch_lce"):
            assert outcome.skip and "new in torch 2.13" in outcome.skip
            continue
        if case.impl.endswith("_chunkB") and case.shape == packed:
            assert outcome.skip and "chunk_size = B = 1" in outcome.skip
            continue
        row = outcome.row
        assert row is not None, outcome
        measured.append((case.impl, case.shape.layout))
        rows = 16 if case.shape == padded else 12
        assert (row["H"], row["rows"]) == (16, rows)
        assert row["bytes"] == harness.linear_byte_counts(case.shape)["effective"]
        matmuls = harness.LINEAR_FLOOR_MATMULS[case.impl]
        floor = matmuls * 2 * case.shape.N * 16 * 64 / (rate * 1e12) * 1e3
        assert row["floor_matmuls"] == matmuls and row["matmul_tflops"] == rate
        assert row["floor_ms"] == pytest.approx(floor)
        assert row["x_floor"] == pytest.approx(row["ms"] / floor)
        assert row["x_floor_rows"] == pytest.approx(row["ms"] / (floor * rows / case.shape.N))
    assert ("cce", "packed") in measured and ("liger_fused_linear_gspo_tf32", "padded") in measured
    if not peers.unavailable("torch_lce"):  # torch's own (>= 2.13, what CI installs)
        assert ("torch_lce", "padded") in measured and ("torch_lce", "packed") in measured
        lce = next(r for r in session.data["rows"] if r["impl"] == "torch_lce")
        assert lce["torch_lce_logprob_dtype"] == lce["dtype"] and lce["floor_matmuls"] == 4
    chunked = [r for r in session.data["rows"]
               if r["impl"] == "liger_fused_linear_gspo_tf32_chunkB"]
    assert [(r["layout"], r["liger_chunk_size"], r["tf32"]) for r in chunked] == [
        ("padded", 2, True)]  # chunk_size = B = 2 sequences
    first = session.data["rows"][0]
    # the plan of the call: chunks of the N = 11 counted rows, no logits held (budget 0)
    assert first["impl"] == "opo_kernels_fused_linear" and first["chunk_size"] == 11
    assert first["held_rows"] == 0 and first["logits_budget"] == 0
    liger_packed = [r for r in session.data["rows"]
                    if r["impl"] == "liger_fused_linear_gspo" and r["layout"] == "packed"]
    assert liger_packed[0]["liger_layout"].startswith("packed rows as one")
    data = report.load(session.path)  # validates the schema, H and the floor included
    table = report.render_table(data)
    assert "| padded | 2 | 8 | 16 | 64 | 11 | opo_kernels_fused_linear | 4 |" in table
    assert "| packed | 6 | 3 | 16 | 64 | 12 | cce | 4 |" in table
    # resuming knows the fused-linear rows by their H as well
    resumed = harness.Session(harness.Settings(tiny=True, impls=settings.impls,
                                               out_dir=tmp_path / "r", resume=session.path))
    outcome = resumed.measure(harness.Case("opo_kernels_materialized", padded))
    assert outcome.skip and "already measured" in outcome.skip


def test_session_measures_the_strong_torch_row(tmp_path):
    """torch_compiled (the strong-torch OPO, Dynamo-traced here) at the tiny logits shapes; its
    gradient equals the reference's."""
    settings = harness.Settings(tiny=True, impls=("torch_compiled",), out_dir=tmp_path,
                                compile_backend="eager")
    session = harness.Session(settings)
    for shape in harness.shapes(tiny=True)[:2]:
        outcome = session.measure(harness.Case("torch_compiled", shape))
        assert outcome.row is not None and outcome.row["ms"] > 0, outcome
        assert outcome.row["compile_backend"] == "eager"


def test_session_measures_both_liger_logits_rows(tmp_path):
    """liger_gspo (sequence level) and liger_grpo_token (token level) run Liger's
    triton_grpo_loss (Triton's interpreter here) at the padded shape, in place; the packed
    layout is skipped, naming why."""
    if harness.peers.unavailable("liger"):
        pytest.fail(harness.peers.unavailable("liger"))
    impls = ("liger_gspo", "liger_grpo_token")
    session = harness.Session(harness.Settings(tiny=True, impls=impls, out_dir=tmp_path))
    padded, packed = harness.shapes(tiny=True)[:2]
    for impl, level in zip(impls, ("sequence", "token")):
        row = session.measure(harness.Case(impl, padded)).row
        assert row is not None and row["inplace"] and impl in harness.INPLACE_IMPLS
        assert row["liger_importance_sampling_level"] == level
        skip = session.measure(harness.Case(impl, packed)).skip
        assert skip and "padded layout" in skip


def test_run_command_end_to_end(tmp_path):
    """`python -m benchmarks.run --tiny`: pytest-benchmark suite -> JSON, PNG, table, README."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.START}\n{report.END}\n")
    before = sorted(harness.RESULTS_DIR.glob("*")) if harness.RESULTS_DIR.exists() else []
    from benchmarks.run import README as table_file  # the repository's table (must not change)
    root_readme = table_file.read_text(encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--tiny", "--out", str(tmp_path / "out"),
         "--impls", "opo_kernels,eager,opo_kernels_fused_linear,liger_fused_linear_gspo",
         "-k", "bf16-padded", "--readme", str(readme)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    data = report.load(out / "cpu-tiny.json")
    assert [(r["impl"], r["layout"]) for r in data["rows"]] == [
        ("opo_kernels", "padded"), ("eager", "padded"), ("opo_kernels_fused_linear", "padded"),
        ("liger_fused_linear_gspo", "padded")]  # Liger's fused-linear module is torch: runs here
    assert data["rows"][2]["H"] == 16 and data["matmul_tflops"] > 0
    assert data["skipped"] == [] and data["peers"]["liger-kernel"]
    assert (out / "cpu-tiny.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "cpu-tiny.md").read_text()
    assert "| opo_kernels |" in md and "| opo_kernels_fused_linear |" in md
    assert "Fused linear:" in md and "| liger_fused_linear_gspo | 4 |" in md
    assert "| eager: reference (readable, slow) |" in readme.read_text()
    assert table_file.read_text(encoding="utf-8") == root_readme
    after = sorted(harness.RESULTS_DIR.glob("*")) if harness.RESULTS_DIR.exists() else []
    assert after == before


def test_run_refuses_tiny_into_results_dir(monkeypatch):
    from benchmarks import run

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("a refused tiny run went on to measure / write")
    monkeypatch.setattr(run, "run_suite", must_not_run)
    monkeypatch.setattr(run, "report", must_not_run)
    with pytest.raises(SystemExit):
        run.main(["--tiny", "--out", str(harness.RESULTS_DIR)])
    with pytest.raises(SystemExit):
        run.main(["--tiny", "--readme", str(run.README)])


# ---- on a GPU: the real timers at tiny shapes (a pre-flight of the full run) ------------------


@pytest.mark.gpu
def test_session_on_gpu_tiny(tmp_path):
    impls = ("opo_kernels", "opo_kernels_inplace", "torch_compiled", "eager", "liger_gspo",
             "liger_grpo_token", "liger_ce", *harness.SLICE_IMPLS)
    session = harness.Session(harness.Settings(tiny=True, impls=impls + harness.LINEAR_IMPLS,
                                               out_dir=tmp_path))
    assert session.data["copy_gbps"] > 100 and session.data["matmul_tflops"] > 1
    shape = harness.shapes(tiny=True)[0]
    cases = [harness.Case(impl, shape) for impl in impls] + [
        harness.Case(impl, linear) for linear in harness.linear_shapes(tiny=True)
        for impl in harness.LINEAR_IMPLS]
    for case in cases:
        outcome = session.measure(case)
        if outcome.skip and (case.impl.startswith(("liger", "cce", "trl", "torch_lce"))
                             or case.impl.endswith("_budget")):
            continue  # the peer's package (or logits_budget=) is not installed here
        assert outcome.row is not None, outcome
        assert outcome.row["timer"] == "cuda-events"
        assert outcome.row["peak_mem_bytes"] >= 0
    harness.validate_results(json.loads(session.path.read_text()))
