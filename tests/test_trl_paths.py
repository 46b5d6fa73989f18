"""Which loss path OPOTrainer runs (``opo_loss_path``): "auto" takes, where the model and the
parallelism setup allow them, TRL's fused LM head then the fused-linear loss on an on-policy
schedule, the other way round on an off-policy one, else the completion logits (with a
warning); a path named explicitly that cannot run is refused with its reason. The fused-linear
loss gets the default logits budget (paths.default_logits_budget) unless one is set.

The parallelism setups (accelerate's FSDP version 1 or 2, DeepSpeed ZeRO-3) need accelerators,
so they are simulated on a trainer built on CPU by setting the flags the Trainer reads and
choosing again. The rows of LM-head matmuls each path runs, against GRPOTrainer's, are
counted (the construction paths.py describes). What runs on each path is tested in
test_trl_integration.py, test_trl_fused_linear.py and test_trl_dp.py.
"""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.cpu_only  # CPU-side code (conftest.py)

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from test_trl_fused_linear import _patched_head, _softcapped, fused_args, make_trainer  # noqa: E402
from test_trl_integration import make_model, make_tokenizer  # noqa: E402

from opo_kernels.integrations.trl import paths  # noqa: E402
from opo_kernels.integrations.trl import trainer as trainer_module  # noqa: E402


def _trainer(tmp_path, model=None, **options):
    model = model or make_model(len(make_tokenizer()))
    return make_trainer(model, fused_args(tmp_path, **{"opo_fused_linear": None, **options}))


def _choose_again(trainer, path, monkeypatch, fsdp_version=None, zero3=False,
                  trl_head=True):
    """The trainer's choice for ``path`` under a simulated setup."""
    monkeypatch.setattr(trainer.args, "opo_loss_path", path)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", fsdp_version is not None)
    monkeypatch.setattr(trainer, "_fsdp_version", lambda: fsdp_version)
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", zero3)
    monkeypatch.setattr(trainer_module, "zero3_enabled", lambda: zero3)
    monkeypatch.setattr(trainer_module, "trl_fused_head_available", lambda: trl_head)
    return trainer._choose_loss_path()


def test_defaults(tmp_path):
    """TRL's default schedule (on-policy): TRL's fused head, as GRPOTrainer; a generation
    reused (num_iterations=2) or outliving the accumulation window: the fused-linear loss."""
    assert _trainer(tmp_path).opo_loss_path == "trl_fused_head"
    assert _trainer(tmp_path, num_iterations=2).opo_loss_path == "fused_linear"
    assert _trainer(tmp_path, steps_per_generation=4, gradient_accumulation_steps=2
                    ).opo_loss_path == "fused_linear"
    assert _trainer(tmp_path, steps_per_generation=2, gradient_accumulation_steps=4
                    ).opo_loss_path == "trl_fused_head"


@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("setup, auto", [
    ({}, ("trl_fused_head", "fused_linear")),
    ({"fsdp_version": 2}, ("trl_fused_head", "fused_linear")),  # fused-linear unshards the head
    ({"fsdp_version": 1}, ("trl_fused_head", "trl_fused_head")),
    ({"zero3": True}, ("trl_fused_head", "trl_fused_head")),
    ({"trl_head": False}, ("fused_linear", "fused_linear")),
    ({"zero3": True, "trl_head": False}, ("logits", "logits")),
], ids=["single", "fsdp2", "fsdp1", "zero3", "old-trl", "zero3-old-trl"])
def test_auto_by_parallelism(tmp_path, monkeypatch, setup, auto, off_policy):
    trainer = _trainer(tmp_path, num_iterations=2 if off_policy else 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = _choose_again(trainer, "auto", monkeypatch, **setup)
    assert path == auto[off_policy]
    # only the costly fallback (the materialized logits) warns
    assert any("runs 'logits'" in str(w.message) for w in caught) == (path == "logits")


@pytest.mark.parametrize("setup, match", [
    ({"fsdp_version": 1}, "FSDP version 1 .* use FSDP2"),
    ({"zero3": True}, "ZeRO-3 .* opo_loss_path='trl_fused_head'"),
], ids=["fsdp1", "zero3"])
def test_fused_linear_refused_by_parallelism(tmp_path, monkeypatch, setup, match):
    trainer = _trainer(tmp_path)
    with pytest.raises(NotImplementedError, match=match):
        _choose_again(trainer, "fused_linear", monkeypatch, **setup)


def test_trl_head_refused_without_it(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    with pytest.raises(NotImplementedError, match="TRL's fused LM head .* TRL >= 1.16"):
        _choose_again(trainer, "trl_fused_head", monkeypatch, trl_head=False)


def test_auto_by_model(tmp_path):
    """A logit transform TRL's head applies (softcapping): TRL's head, also off-policy. A head
    no fused path reproduces (a patched forward): the logits, with a warning that says why."""
    tokenizer = make_tokenizer()
    assert _trainer(tmp_path, _softcapped(make_model(len(tokenizer))),
                    num_iterations=2).opo_loss_path == "trl_fused_head"
    with pytest.warns(UserWarning, match="runs 'logits'; passed over: trl_fused_head, "
                                         "fused_linear: needs .*patched") as caught:
        trainer = _trainer(tmp_path, _patched_head(make_model(len(tokenizer))))
    assert trainer.opo_loss_path == "logits"
    # both refused for one reason: said once, without the paths' own names or advice
    # (transformers >= 5.2x adds deprecation warnings of its own to the record: ours by text)
    ours = [str(w.message) for w in caught if "passed over:" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = ours[0]
    assert message.count("needs a plain torch.nn.Linear LM head") == 1, message
    assert message.count("opo_loss_path=") == 1, message  # opo_loss_path='auto' only
    with pytest.raises(ValueError, match="opo_chunk_size applies to the 'fused_linear' loss "
                                         "path, but this trainer runs 'logits'"), \
            pytest.warns(UserWarning, match="runs 'logits'"):
        _trainer(tmp_path, _patched_head(make_model(len(tokenizer))), opo_chunk_size=8)


def test_fallback_warning_gives_each_reason_once(tmp_path, monkeypatch):
    """Refused for different reasons (ZeRO-3, a TRL without the fused head): each path with
    its own reason, once."""
    trainer = _trainer(tmp_path, num_iterations=2)  # off-policy: fused-linear first
    with pytest.warns(UserWarning) as caught:
        _choose_again(trainer, "auto", monkeypatch, zero3=True, trl_head=False)
    message = str(caught[0].message)
    expected = ("OPOTrainer: opo_loss_path='auto' runs 'logits'; passed over: fused_linear: "
                "DeepSpeed ZeRO-3 gathers the LM head weight only inside the head's own "
                "forward; opo_loss_path='trl_fused_head' runs TRL's fused LM head, which "
                "gathers it; trl_fused_head: needs TRL's fused LM head "
                "(trl.trainer.utils.add_fused_lm_head, TRL >= 1.16)")
    assert message == expected


def test_explicit_paths(tmp_path):
    """Each path named explicitly runs where it can; opo_fused_linear is its shorthand."""
    for path in ("fused_linear", "trl_fused_head", "logits"):
        assert _trainer(tmp_path, opo_loss_path=path).opo_loss_path == path
    assert _trainer(tmp_path, opo_fused_linear=False).opo_loss_path == "logits"
    assert _trainer(tmp_path, opo_fused_linear=True).opo_loss_path == "fused_linear"
    with pytest.raises(ValueError, match="final_logit_softcapping"):  # named, so not replaced
        _trainer(tmp_path, _softcapped(make_model(len(make_tokenizer()))),
                 opo_loss_path="fused_linear")


def test_choose_path_rules():
    problem = (ValueError, "no")
    assert paths.choose_path("auto", {}) == ("trl_fused_head", [])
    assert paths.choose_path("auto", {}, off_policy=True) == ("fused_linear", [])
    assert paths.choose_path("auto", {"trl_fused_head": problem}) == \
        ("fused_linear", ["trl_fused_head: no"])
    assert paths.choose_path("auto", {"fused_linear": problem, "trl_fused_head": None},
                             off_policy=True) == ("trl_fused_head", ["fused_linear: no"])
    # one reason for both: said once, naming both paths; different reasons: each its own
    assert paths.choose_path("auto", {"fused_linear": problem, "trl_fused_head": problem}) == \
        ("logits", ["trl_fused_head, fused_linear: no"])
    assert paths.choose_path("auto", {"fused_linear": (ValueError, "a"),
                                      "trl_fused_head": (ValueError, "b")}) == \
        ("logits", ["trl_fused_head: b", "fused_linear: a"])
    long = (ValueError, "OPOTrainer: it cannot; set opo_loss_path='logits'")
    assert paths.choose_path("auto", {"fused_linear": long, "trl_fused_head": None},
                             off_policy=True) == ("trl_fused_head", ["fused_linear: it cannot"])
    # the path's own name in its message (as find_lm_head words it) is not repeated
    named = {path: (ValueError, f"OPOTrainer: opo_loss_path={path!r} needs a plain head; set "
                                "opo_loss_path='logits'") for path in ("fused_linear",
                                                                       "trl_fused_head")}
    assert paths.choose_path("auto", named, off_policy=True) == \
        ("logits", ["fused_linear, trl_fused_head: needs a plain head"])
    unsupported = (NotImplementedError, "OPOTrainer: opo_loss_path='fused_linear' is not "
                   "supported here: FSDP version 1; set opo_loss_path='logits'")
    assert paths.choose_path("auto", {"fused_linear": unsupported, "trl_fused_head": None},
                             off_policy=True) == ("trl_fused_head",
                                                  ["fused_linear: FSDP version 1"])

    with pytest.raises(ValueError, match="^no$"):
        paths.choose_path("trl_fused_head", {"trl_fused_head": problem})
    with pytest.raises(ValueError, match="opo_loss_path must be one of"):
        paths.choose_path("hidden", {})


def test_logits_budget(tmp_path, monkeypatch):
    """The fused-linear loss gets min(TRL's tile in the compute dtype, 4·V·H) bytes by default
    (here 4·V·H: a tiny head), or opo_logits_budget; the option is refused where the trainer
    does not run that path."""
    assert paths.default_logits_budget(151936, 896, 2) == 4096 * 32768 * 2
    assert paths.default_logits_budget(100, 8, 2) == 4 * 100 * 8
    seen = []
    fused = trainer_module.fused_linear_opo_loss_with_config

    def recording(*args, **kwargs):
        seen.append(kwargs["logits_budget"])
        return fused(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "fused_linear_opo_loss_with_config", recording)
    for budget, expected in ((None, 4 * len(make_tokenizer()) * 32), (0, 0)):
        trainer = _trainer(tmp_path, max_steps=1, opo_loss_path="fused_linear",
                           opo_logits_budget=budget)
        trainer.train()
        assert seen and set(seen) == {expected}
        seen.clear()
    with pytest.raises(ValueError, match="opo_logits_budget applies to the 'fused_linear' .* "
                                         "runs 'trl_fused_head'.* on-policy schedule"):
        _trainer(tmp_path, opo_logits_budget=2**20)


# ---- what each path computes, counted ---------------------------------------------------------


class HeadMatmuls(TorchDispatchMode):
    """Rows of LM-head matmuls: every mm / addmm whose three dimensions include V and H (one
    [R, H] x [H, V] product or a gradient of one) adds R = m·k·n / (V·H)."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default,
           torch.ops.aten.addmm.out, torch.ops.aten.addmm_.default, torch.ops.aten.mm.dtype_out,
           torch.ops.aten.addmm.dtype_out}

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            a, b = (args[0], args[1]) if "mm." in str(func) and "addmm" not in str(func) \
                else (args[1], args[2])
            dims = [a.shape[0], a.shape[1], b.shape[1]]
            if self.vocab in dims and self.hidden in dims:
                dims.remove(self.vocab)
                dims.remove(self.hidden)
                self.rows += dims[0]
        return func(*args, **(kwargs or {}))


def _counted_rows(trainer, model, inputs, vocab, hidden) -> int:
    counter = HeadMatmuls(vocab, hidden)
    model.zero_grad(set_to_none=True)
    with counter:
        trainer._compute_loss(model, inputs).backward()
    return counter.rows


def test_head_matmuls(tmp_path, monkeypatch):
    """Per micro-batch of M counted completion tokens, in rows of LM-head matmuls: GRPOTrainer
    4·M (TRL's fused head: forward, recomputed logits, two gradients; scored only at the
    counted positions, as on a GPU); OPOTrainer's default on-policy the same 4·M (the same
    head); the fused-linear loss 3·M on-policy and 4·M − K off-policy (K rows' logits kept),
    plus B for the model's own head at one position per sequence; the logits 3·B·(C + 1)."""
    from datasets import Dataset
    from test_trl_dp import COMPLETION_LEN, make_batch
    from test_trl_integration import vowel_reward
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import utils as trl_utils

    from opo_kernels.integrations.trl.batches import unpack_groups

    # TRL scores only the counted positions on Triton devices, every position elsewhere:
    # counted ones here too, as on the GPU
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    tokenizer = make_tokenizer()
    vocab, hidden, kept = len(tokenizer), 32, 5
    results = {}
    for off_policy in (False, True):
        batch = make_batch(0, vocab, off_policy)
        batch["opo_scorable"] = torch.ones_like(batch["opo_scorable"])
        flat, _ = unpack_groups(batch)
        mask = flat["completion_mask"].bool()
        m, b = int(mask.sum()), mask.shape[0]
        grpo_inputs = {k: v for k, v in flat.items() if not k.startswith("opo_")}
        grpo_inputs["num_items_in_batch"] = mask.sum().float()
        args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6,
                          num_generations=3, use_cpu=True, bf16=False, report_to="none")
        grpo = GRPOTrainer(model=make_model(vocab), reward_funcs=vowel_reward, args=args,
                           processing_class=tokenizer,
                           train_dataset=Dataset.from_dict({"prompt": ["ab"]}))
        grpo.current_gradient_accumulation_steps = 1
        results["grpo", off_policy] = _counted_rows(grpo, grpo.model, grpo_inputs, vocab, hidden)
        assert results["grpo", off_policy] == 4 * m
        budget = {"opo_logits_budget": kept * vocab * 4}  # K = 5 rows of fp32 logits
        for path, options in (("auto", {}), ("fused_linear", budget), ("logits", {})):
            trainer = _trainer(tmp_path, opo_loss_path=path, **options)
            trainer.current_gradient_accumulation_steps = 1
            trainer.model.train()
            _counted_rows(trainer, trainer.model, batch, vocab, hidden)  # checks the head once
            results[path, off_policy] = _counted_rows(trainer, trainer.model, batch, vocab,
                                                      hidden)
        expected_fused = (4 * m - kept if off_policy else 3 * m) + b
        assert results["fused_linear", off_policy] == expected_fused
        assert results["logits", off_policy] == 3 * b * (COMPLETION_LEN + 1)
        assert results["auto", off_policy] == 4 * m  # the default schedule: TRL's head
        # besides the model's own head on B positions, the fused-linear loss runs fewer rows
        # than TRL's head (B is one position per sequence: small against M at real sizes)
        assert results["fused_linear", off_policy] - b < results["grpo", off_policy]


def test_logits_path_reuses_the_loss_plan_step_after_step(tmp_path, monkeypatch):
    """On the logits path the loss's per-signature work (checks, launches, workspace layout:
    opo_kernels/call_plan.py) is done once, not on every micro-batch."""
    from test_trl_dp import make_batch

    from opo_kernels import call_plan, fused_opo

    built = []
    original = call_plan.CallPlan.__init__
    monkeypatch.setattr(call_plan.CallPlan, "__init__",
                        lambda self, *a, **k: built.append(1) or original(self, *a, **k))
    tokenizer = make_tokenizer()
    trainer = _trainer(tmp_path, opo_loss_path="logits")
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    for off_policy in (False, True):
        batch = make_batch(0, len(tokenizer), off_policy)
        fused_opo._CALL_PLANS.plans.clear()  # (plans of earlier tests in this process)
        trainer._compute_loss(trainer.model, batch).backward()
        first = len(built)
        assert first >= 1
        trainer._compute_loss(trainer.model, batch).backward()
        assert len(built) == first
        built.clear()
