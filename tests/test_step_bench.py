"""The RL-step benchmark (benchmarks/step) on the CPU with a tiny 2-layer Qwen2: every loss
path computing the OPO loss gives the reference's loss and LM-head gradient on the same model
and batch; Liger's GSPO paths agree with each other; the timed step runs end to end into a
results file of the documented schema; the headline table and its targets come from that file.
Our Triton kernels and Liger's run under TRITON_INTERPRET=1 (tests/conftest.py).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from opo_kernels import opo_loss_from_logprobs, reference

pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import peers  # noqa: E402
from benchmarks.cases import RESULTS_DIR  # noqa: E402
from benchmarks.step import grid, report  # noqa: E402
from benchmarks.step.batch import build_model, make_batch  # noqa: E402
from benchmarks.step.paths import Unavailable, build_path  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    s = grid.Settings.tiny_defaults()
    model = build_model("tiny", CPU, grad_ckpt=True)
    batch = make_batch(model, s.tokens[0], s.seq_len, s.prompt_len)
    return model, batch


def test_batch_geometry(tiny):
    model, b = tiny
    assert (b.B, b.L) == (8, grid.TINY_SEQ_LEN) and b.B % grid.GROUP_SIZE == 0
    assert b.counted == round(grid.COUNTED_FRACTION * b.B * b.L)
    # the counted labels are the completion tokens, shifted by one; prompts never count
    assert (b.mask[:, : grid.TINY_PROMPT_LEN - 1] == 0).all()
    assert torch.equal(b.labels_full[:, 1:] != -100, b.mask != 0)
    assert torch.equal(b.labels, b.input_ids[:, 1:])
    assert ((b.attention_mask[:, 1:] == 0) <= (b.mask == 0)).all()  # padding never counts
    assert b.old_logprobs.dtype == torch.float32 and torch.isfinite(b.old_logprobs).all()
    assert (b.old_logprobs < 0.5).all()  # log-probs + N(0, 0.05²) noise
    with pytest.raises(ValueError, match="multiple"):
        make_batch(model, 3 * grid.TINY_SEQ_LEN, grid.TINY_SEQ_LEN, grid.TINY_PROMPT_LEN)


def _loss_and_head_grad(model, path):
    model.zero_grad(set_to_none=True)
    loss = path.loss()
    loss.backward()
    grad = model.get_output_embeddings().weight.grad.float().clone()
    model.zero_grad(set_to_none=True)
    return loss.detach(), grad


def _reference(model, b, on_policy):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    loss = reference.opo_loss(logits[:, :-1], b.labels, None if on_policy else b.old_logprobs,
                              b.rewards, mask=b.mask, group_size=b.group_size)
    loss.backward()
    grad = model.get_output_embeddings().weight.grad.float().clone()
    model.zero_grad(set_to_none=True)
    return loss.detach(), grad


@pytest.mark.parametrize("name", [p for p in grid.OPO_MATH if p != "torch_lce"])
def test_opo_paths_equal_the_reference(tiny, name):
    """Same model, same batch: each path's loss and the gradient of the (tied) LM head equal
    the reference's on the model's bf16 logits."""
    model, b = tiny
    try:
        path = build_path(name, model, b, compile_backend="eager")
    except Unavailable as exc:
        if name == "opo_fused_linear_budget":
            pytest.skip(str(exc))  # opo_kernels without logits_budget=
        raise
    loss, grad = _loss_and_head_grad(model, path)
    want, want_grad = _reference(model, b, on_policy=name.endswith("_on_policy"))
    torch.testing.assert_close(loss, want, rtol=5e-3, atol=2e-5)
    # the tied head's gradient also holds the embedding's, back-propagated through the bf16
    # backbone: compared as a whole (relative Frobenius error), not element by element
    assert grad.abs().max() > 0
    assert (grad - want_grad).norm() / want_grad.norm() < 2e-2


def test_torch_lce_path_is_opo_of_its_logprobs(tiny):
    """torch's linear_cross_entropy gives bf16 per-token losses for the bf16 model, so its
    path is the OPO loss of those rounded log-probs (not the reference's: tests/test_peers.py
    says by how much). The path's wiring (positions, labels, counted rows) is checked here:
    its loss is the reference's OPO of the same log-probs, and its log-probs are the model's
    own to within bf16 rounding."""
    model, b = tiny
    if peers.unavailable("torch_lce"):
        pytest.skip(peers.unavailable("torch_lce"))
    path = build_path("torch_lce", model, b, compile_backend="eager")
    assert path.extra["torch_lce_logprob_dtype"] == "bfloat16"
    loss, grad = _loss_and_head_grad(model, path)
    with torch.no_grad():
        hidden = model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask
                                  ).last_hidden_state[:, :-1]
        lp = peers.torch_lce_logprobs(hidden, model.get_output_embeddings().weight, b.labels,
                                      b.mask != 0)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    counted = b.mask != 0
    exact = reference.chunked_logprobs(logits[:, :-1].float(), b.labels)
    assert (lp[counted].float() - exact[counted]).abs().max() < 2 ** -6 * exact[counted].abs().max()
    want = opo_loss_from_logprobs(lp.float(), b.old_logprobs, b.rewards, mask=b.mask,
                                  group_size=b.group_size, vocab_size=b.vocab, backend="torch")
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_liger_paths_agree(tiny):
    """Liger has no OPO: its GSPO paths run the same loss on the same batch and must agree
    with each other (logits + triton_grpo_loss vs the fused-linear module: TF32 off and on,
    chunk_size 1 and B); liger_logits_token is the token-level (GRPO) call of the same kernel
    entry point, checked against GRPO's formula in tests/test_peers.py."""
    model, b = tiny
    got = {}
    for name in ("liger_logits", "liger_fused_linear", "liger_fused_linear_tf32",
                 "liger_fused_linear_tf32_chunkB"):
        path = build_path(name, model, b, compile_backend="eager")
        assert path.extra["loss_math"].startswith("GSPO")
        got[name] = _loss_and_head_grad(model, path)
    assert build_path("liger_fused_linear_tf32_chunkB", model, b, compile_backend="eager"
                      ).extra["liger_chunk_size"] == b.B
    base_loss, base_grad = got["liger_logits"]
    for name, (loss, grad) in got.items():
        torch.testing.assert_close(loss, base_loss, rtol=2e-2, atol=1e-4, msg=name)
        assert (grad - base_grad).norm() / base_grad.norm() < 5e-2, name
    token = build_path("liger_logits_token", model, b, compile_backend="eager")
    assert token.extra["loss_math"].startswith("GRPO")
    assert token.extra["liger_importance_sampling_level"] == "token"
    loss, grad = _loss_and_head_grad(model, token)
    assert torch.isfinite(loss) and grad.abs().max() > 0


def test_fused_linear_rows_record_their_plan(tiny):
    """The default budget keeps some rows' logits (a 4 − K/M matmul run): the row says so,
    with the plan the call makes (linear_plan.plan_chunks on the counted rows)."""
    from opo_kernels.linear_plan import DEFAULT_LOGITS_BUDGET
    model, b = tiny
    row_bytes = b.vocab * model.get_output_embeddings().weight.element_size()
    general = build_path("opo_fused_linear", model, b, compile_backend="eager").extra
    assert general["logits_budget"] == "default" and not general["on_policy"]
    assert general["held_rows"] == min(b.counted, DEFAULT_LOGITS_BUDGET // row_bytes) > 0
    held = build_path("opo_fused_linear_budget", model, b, compile_backend="eager").extra
    assert held["held_rows"] == b.counted and isinstance(held["logits_budget"], int)
    on_policy = build_path("opo_fused_linear_on_policy", model, b, compile_backend="eager").extra
    assert on_policy["on_policy"] and on_policy["held_rows"] == 0
    assert on_policy["chunk_size"] >= 1


def test_unknown_path_and_settings_are_refused(tiny):
    model, b = tiny
    with pytest.raises(ValueError, match="unknown path"):
        build_path("quack", model, b, compile_backend="eager")
    with pytest.raises(ValueError, match="paths"):
        grid.Settings(paths=("plain", "nope")).check()
    with pytest.raises(ValueError, match="groups of 8"):
        grid.Settings(tokens=(1000,)).check()


# ---- the timed step, the results file, the table ---------------------------------------------


def test_step_runs_end_to_end(tmp_path, monkeypatch):
    from benchmarks.step.__main__ import main
    # the GPU machine's copy of the tree has no .git: the commit comes from the environment
    monkeypatch.setenv("OPO_BENCH_COMMIT", "0123abc")
    paths = "plain,opo_fused_linear,liger_fused_linear"
    rc = main(["--tiny", "--out", str(tmp_path), "--paths", paths, "--steps", "2",
               "--readme", str(tmp_path / "README.md")])
    assert rc == 0
    out = tmp_path / "cpu-tiny.step.json"
    data = report.load(out)  # validates the schema
    assert data["device"] == "cpu-tiny" and data["tiny"] is True
    assert data["commit"] == "0123abc"
    assert [r["path"] for r in data["rows"]] == paths.split(",")
    for r in data["rows"]:
        assert (r["model"], r["tokens"], r["B"], r["L"]) == ("tiny", 128, 8, 16)
        assert r["steps"] == 2 and r["step_ms"] > 0 and r["peak_mem_bytes"] == -1  # no CUDA
        assert 0 < r["loss_ms"] < r["step_ms"] * 1.01  # the head + loss part of the step
        assert r["tokens_per_s"] == pytest.approx(128 / (r["step_ms"] * 1e-3))
    assert data["models"]["tiny"]["params"] > 0 and not data["errors"]
    md = (tmp_path / "cpu-tiny.step.md").read_text()
    assert "NOT GPU measurements" in md and "| tiny | 128 | plain |" in md
    assert (tmp_path / "cpu-tiny.step.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "README.md").exists()  # no README there: nothing written

    # resuming keeps the measured rows and measures only the missing paths
    again = tmp_path / "again"
    assert main(["--tiny", "--out", str(again), "--paths", "plain,trl_head", "--steps", "1",
                 "--resume", str(out)]) == 0
    resumed = report.load(again / "cpu-tiny.step.json")
    assert [r["path"] for r in resumed["rows"]] == paths.split(",") + ["trl_head"]
    assert [r.get("run") for r in resumed["rows"]] == ["resumed"] * 3 + [None]
    assert resumed["rows"][0]["steps"] == 2 and resumed["rows"][3]["steps"] == 1


def test_cli_refuses_tiny_results_in_the_results_folder():
    from benchmarks.step.__main__ import main
    with pytest.raises(SystemExit):
        main(["--tiny", "--out", str(RESULTS_DIR)])
    with pytest.raises(SystemExit):
        main(["--tiny", "--readme", str(ROOT / "README.md")])


def _row(path, ms, peak, model="qwen2.5-0.5b", tokens=8192):
    return {"model": model, "tokens": tokens, "path": path, "step_ms": ms,
            "peak_mem_bytes": peak, "loss_ms": ms / 4, "loss_share": 0.25,
            "tokens_per_s": tokens / (ms * 1e-3), "B": 16, "L": 512, "counted": 5734}


def _data(rows, paths=None):
    """A results file whose run was asked for ``paths`` (default: the rows' paths and cce)."""
    paths = list(dict.fromkeys([r["path"] for r in rows] + ["cce"])) if paths is None else paths
    return {"device": "Test GPU", "torch": "2.x", "triton": "3.x", "transformers": "5.x",
            "commit": "abc", "timer": "cuda-events", "peers": {"trl": "1.16.0"},
            "settings": {"seq_len": 512, "group_size": 8, "counted_fraction": 0.7,
                         "steps": 10, "warmup": 3, "grad_ckpt": True, "paths": paths},
            "models": {"qwen2.5-0.5b": {"params": 1}}, "rows": rows,
            "skipped": [{"model": "qwen2.5-0.5b", "tokens": 8192, "path": "cce",
                         "reason": "cut-cross-entropy not importable"}], "errors": []}


def test_headline_table_and_targets(tmp_path):
    gib = 2**30
    rows = [_row("plain", 100.0, 20 * gib), _row("trl_head", 90.0, 6 * gib),
            _row("liger_fused_linear", 95.0, 5 * gib), _row("opo_logits", 85.0, 12 * gib),
            _row("opo_fused_linear", 78.0, 4 * gib)]
    data = _data(rows)
    report.validate(data)
    t = report.targets(data)
    assert t["best"] == "opo_fused_linear" and t["best_vs_plain"] == pytest.approx(0.78)
    assert t["best_peer"] == "trl_head" and t["best_vs_best_peer"] == pytest.approx(78 / 90)
    assert t["leanest_peer"] == "liger_fused_linear"
    assert t["fused_peak_vs_leanest_peer"] == pytest.approx(0.8)
    table = report.render_table(data)
    # × plain and × best peer (trl_head, 90 ms: plain is no peer)
    assert ("| qwen2.5-0.5b | 8192 | opo_fused_linear | 78.0 | 0.78× | 0.87× | 19.5 | 25% "
            "| 4,096 |") in table
    assert "| trl_head (best peer) | 90.0 | 0.90× | 1.00× |" in table
    assert "| plain | 100.0 | 1.00× | 1.11× |" in table
    assert "our fastest general-mode path, the peers' setting (opo_fused_linear)" in table
    assert "(≤ 0.8: met)" in table and "(trl_head; < 1: met)" in table
    assert "(liger_fused_linear; ≤ 1: met)" in table
    assert "cut-cross-entropy not importable" in table
    assert "on-policy, a setting" not in table  # no on-policy row measured
    # the on-policy path is faster here, but it is not the peers' setting: reported beside
    # the general-mode verdict, never as "our fastest path"
    with_on = _data(rows + [_row("opo_fused_linear_on_policy", 60.0, 4 * gib)])
    t = report.targets(with_on)
    assert t["best"] == "opo_fused_linear" and t["on_policy"] == "opo_fused_linear_on_policy"
    assert t["on_policy_vs_best_peer"] == pytest.approx(60 / 90)
    assert ("on-policy, a setting the peers were not run in (opo_fused_linear_on_policy, "
            "ref_logprobs=None): 0.60× plain's, 0.67× the fastest peer's") in (
        report.render_table(with_on))
    # a slower ours: the verdict says so
    rows[-1]["step_ms"] = 99.0
    rows[-2]["step_ms"] = 99.0
    assert "(≤ 0.8: NOT met)" in report.render_table(_data(rows))

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.START}\nformer table\n{report.END}\ntail\n")
    assert report.update_readme(readme, table)
    assert "former table" not in readme.read_text()
    assert "opo_fused_linear" in readme.read_text()
    readme.write_text("no markers\n")
    assert not report.update_readme(readme, table) and readme.read_text() == "no markers\n"
    assert report.plot(data, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_peers_not_reached_withhold_the_peer_ratios():
    """A time-limited run that stopped before a peer at a shape: the fastest and the leanest
    peer would be whichever was measured first, so "× best peer" and those verdicts wait (a
    peer that cannot run, e.g. not installed, does not hold them back, nor does cce_filtered,
    which is shown but not in the targets)."""
    gib = 2**30
    rows = [_row("plain", 100.0, 20 * gib), _row("trl_head", 90.0, 6 * gib),
            _row("opo_fused_linear", 78.0, 4 * gib)]
    data = _data(rows, paths=["opo_fused_linear", "plain", "trl_head", "cce", "cce_filtered",
                              "liger_fused_linear"])
    data["skipped"].append({"model": "qwen2.5-0.5b", "tokens": 8192, "path": "cce_filtered",
                            "reason": report.TIME_SKIP})
    t = report.targets(data)
    assert t["peers_not_reached"] == ["liger_fused_linear"]
    assert t["best_peer"] is None and t["best_vs_best_peer"] is None
    assert t["leanest_peer"] is None and t["fused_peak_vs_leanest_peer"] is None
    assert t["best_vs_plain"] == pytest.approx(0.78)  # plain was measured
    table = report.render_table(data)
    assert "| opo_fused_linear | 78.0 | 0.78× | – |" in table and "(best peer) |" not in table
    assert "peers not reached in the run's time: liger_fused_linear;" in table
    # the resumed run measured them: the ratios are given
    data["skipped"].pop()
    data["rows"] += [_row("cce_filtered", 80.0, 5 * gib), _row("liger_fused_linear", 95.0,
                                                               3 * gib)]
    t = report.targets(data)
    assert t["peers_not_reached"] == [] and t["best_peer"] == "trl_head"  # not cce_filtered
    assert t["leanest_peer"] == "liger_fused_linear"
    table = report.render_table(data)
    assert "| trl_head (best peer) | 90.0 |" in table
    assert "| cce_filtered | 80.0 | 0.80× | 0.89× |" in table


@pytest.mark.parametrize("breakage", ["no_rows_key", "bad_path", "bad_type", "unknown_model"])
def test_schema_rejects(breakage):
    data = _data([_row("plain", 100.0, 1)])
    if breakage == "no_rows_key":
        del data["rows"]
    elif breakage == "bad_path":
        data["rows"][0]["path"] = "other"
    elif breakage == "bad_type":
        data["rows"][0]["step_ms"] = "100"
    else:
        data["rows"][0]["model"] = "gpt-5"
    with pytest.raises(ValueError, match="step results"):
        report.validate(data)
    json.dumps(data)  # the file is plain JSON


def test_peer_versions_are_recorded():
    v = peers.versions()
    assert v["trl"] and v["transformers"]


@pytest.mark.gpu
def test_step_on_gpu_tiny(tmp_path):
    """A pre-flight of the GPU run: every path of the tiny model on CUDA (the peers' Triton
    kernels compiled, the strong torch through Inductor), CUDA-event timings, peak memory."""
    from benchmarks.step.bench import StepBench
    settings = grid.Settings.tiny_defaults(steps=2, compile_backend="inductor")
    bench = StepBench(settings, tmp_path)
    data = bench.run()
    report.validate(data)
    assert not data["errors"], data["errors"]
    measured = {r["path"] for r in data["rows"]}
    assert {"plain", "torch_compiled", "opo_logits", "opo_fused_linear"} <= measured
    for r in data["rows"]:
        assert r["timer"].startswith("cuda-events") and r["peak_mem_bytes"] > 0
        assert 0 < r["loss_ms"] < r["step_ms"]
    for s in data["skipped"]:  # only a missing peer (or logits_budget=) may skip
        assert any(why in s["reason"] for why in ("not importable", "logits_budget",
                                                   "new in torch 2.13")), s
    # the exact OPO paths compute the same loss on the same model and batch
    losses = [r["loss"] for r in data["rows"] if r["path"] in grid.OPO_MATH
              and r["path"] not in grid.APPROXIMATE and not r["path"].endswith("_on_policy")]
    assert max(losses) - min(losses) <= 1e-2 * max(1.0, abs(losses[0]))
