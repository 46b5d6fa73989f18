"""OPOTrainer's fused loss paths: ``opo_loss_path="fused_linear"`` (the default for a plain
model; ``opo_fused_linear=True`` is its shorthand) is ``fused_linear_opo_loss`` on the final
hidden states and the LM head (the completion logits are never materialized);
"trl_fused_head" is TRL's fused LM head + ``opo_loss_from_logprobs``.

Same tiny Qwen2 / character tokenizer / vowel reward as tests/test_trl_integration.py (whose
helpers this file uses). Checks: training runs and the accumulated gradient of an on-policy
step equals the reference computed from full logits; on one recorded off-policy batch the
loss, metrics and gradient of both fused paths equal those of the logits path on the same
model, with an LM head that has a bias, TRL's temperature, an entropy bonus and a chunk size
that cuts through sequences; the model's own head runs on one position only; DDP over 2
processes; refusals.
"""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from datasets import Dataset  # noqa: E402
from test_trl_integration import (  # noqa: E402
    ACCUM,
    CASES,
    GROUP,
    MICRO,
    PROMPTS,
    TEMPERATURE,
    RecordingOPOTrainer,
    StepCapture,
    check_two_processes,
    make_model,
    make_tokenizer,
    reference_grads,
    train,
    vowel_reward,
)

from opo_kernels.integrations.trl import OPOConfig, OPOTrainer  # noqa: E402

OPO_METRICS = {"opo/omega_mean", "opo/omega_max", "opo/tau", "opo/v_mean", "opo/log_ratio_mean",
               "opo/kl_k3", "opo/penalty"}


def biased_model(vocab_size: int):
    """The tiny Qwen2 with an LM head that has a bias (Qwen2's has none)."""
    model = make_model(vocab_size)
    torch.manual_seed(1)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, vocab_size, bias=True)
    return model


def fused_args(tmp_path, **options):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=MICRO, num_generations=GROUP,
        gradient_accumulation_steps=ACCUM, max_completion_length=6, max_steps=2,
        temperature=TEMPERATURE, learning_rate=1e-2, max_grad_norm=0.0, logging_steps=1,
        seed=0, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
        opo_fused_linear=True,
    )
    return OPOConfig(**{**base, **options})


def make_trainer(model, args, trainer_class=OPOTrainer, **kwargs):
    tokenizer = make_tokenizer()
    return trainer_class(model=model, reward_funcs=vowel_reward, args=args,
                         processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), **kwargs)


def test_fused_linear_on_policy_matches_reference(tmp_path):
    """TRL's default schedule (π_ref = detached current policy: the one-phase fused-linear
    path): the trainer's accumulated gradient equals autograd through the reference loss on full
    logits of the same batches (rewards and groups re-derived independently)."""
    trainer, tokenizer, initial, capture = train(tmp_path, check_step=1, max_steps=2,
                                                 opo_fused_linear=True, opo_chunk_size=7)
    assert trainer.state.global_step == 2
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(),
                                                     initial.parameters()))
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert math.isfinite(h["loss"])
        assert OPO_METRICS <= set(h), sorted(h)
        assert all(math.isfinite(h[k]) for k in OPO_METRICS)
        # entropy_coef = 0, but opo_log_entropy (default) has the kernels compute it in their
        # pass over the chunks' logits: logged without the logits ever being formed
        assert math.isfinite(h["opo/entropy_mean"])
    ref_grads, batches = reference_grads(trainer, tokenizer, capture, {})
    assert "old_per_token_logps" not in batches[0]
    for name, grad in capture.grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=2e-4, atol=2e-6, msg=name)
    assert sum(g.abs().sum() for g in ref_grads.values()) > 0


def _loss_and_grads(trainer, batch, path: str):
    trainer.opo_loss_path = path
    model = trainer.model
    model.zero_grad(set_to_none=True)
    before = {k: len(v) for k, v in trainer._metrics["train"].items()}
    loss = trainer._compute_loss(model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()
               if k.startswith("opo/") and len(v) > before.get(k, 0)}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), metrics, grads


def test_fused_linear_gradient_equals_logits_path(tmp_path):
    """Off-policy (num_iterations=2: TRL's old log-probs are π_ref), non-default loss options,
    entropy bonus, an LM head with a bias, temperature 0.7, 5-row chunks, 3 rows' logits kept
    to the backward: the fused-linear path trains, and on a recorded off-policy batch its
    loss, metrics and gradient, and those of TRL's fused head + opo_loss_from_logprobs, equal
    the logits path's on the same model. A wrong position slice, a missing temperature or
    bias, or a different accumulation scaling would fail here."""
    _, _, loss_options = CASES["off_policy"]
    # the logits of 3 counted rows kept from forward to backward, the others recomputed
    args = fused_args(tmp_path, num_iterations=2, opo_chunk_size=5,
                      opo_logits_budget=3 * len(make_tokenizer()) * 4,
                      **{f"opo_{k}": v for k, v in loss_options.items()})
    model = biased_model(len(make_tokenizer()))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    head_positions = []
    model.lm_head.register_forward_hook(lambda m, i, o: head_positions.append(i[0].shape[1]))
    trainer = make_trainer(model, args, RecordingOPOTrainer, callbacks=[StepCapture(1)])
    trainer.recorded = []
    trainer.train()

    assert trainer.state.global_step == 2
    for name in ("lm_head.weight", "lm_head.bias", "model.embed_tokens.weight"):
        assert not torch.equal(initial[name], dict(model.named_parameters())[name]), name
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert math.isfinite(h["loss"])
        assert OPO_METRICS | {"opo/entropy_mean"} <= set(h), sorted(h)
    # the model's own head ran on one position per sequence in every training forward
    # (generation runs it too, also on one position); never on the completion
    assert head_positions and set(head_positions) == {1}

    batch = next(b for step, b in trainer.recorded if step == 1)
    assert "old_per_token_logps" in batch  # really off-policy
    model.train()
    logits_loss, logits_metrics, logits_grads = _loss_and_grads(trainer, batch, "logits")
    # TRL's fused head (patched in by GRPOTrainer) + opo_loss_from_logprobs: the same loss
    for path in ("fused_linear", "trl_fused_head"):
        loss, metrics, grads = _loss_and_grads(trainer, batch, path)
        assert loss != 0
        torch.testing.assert_close(loss, logits_loss, rtol=1e-5, atol=1e-7, msg=path)
        assert set(metrics) == set(logits_metrics) and "opo/entropy_mean" in metrics, path
        for name, value in logits_metrics.items():
            assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), (path, name)
        for name, grad in logits_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7,
                                       msg=f"{path}: {name}")
    assert logits_grads["lm_head.bias"].abs().sum() > 0
    assert logits_grads["model.embed_tokens.weight"].abs().sum() > 0


def test_fused_linear_two_processes(tmp_path):
    """DDP over 2 CPU processes: the head comes from the unwrapped model, its gradient is
    all-reduced like the others, and the result is the mean of the per-process references."""
    check_two_processes(__file__, tmp_path)


def _ddp_worker(out_dir: str):
    """Runs in each torchrun process (see test_fused_linear_two_processes)."""
    trainer, tokenizer, _, capture = train(Path(out_dir), check_step=0, max_steps=1,
                                           opo_fused_linear=True)
    assert trainer.accelerator.num_processes == 2
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    reference, _ = reference_grads(trainer, tokenizer, capture, {})
    torch.save({"fused_linear": {"captured": capture.grads, "reference": reference}},
               Path(out_dir) / f"rank{trainer.accelerator.process_index}.pt")


# ---- refusals ---------------------------------------------------------------------------------


def _softcapped(model):
    model.config.final_logit_softcapping = 30.0
    return model


def _scaled(model):
    model.config.logit_scale = 0.0625
    return model


def _wrapped_head(model):
    model.lm_head = torch.nn.Sequential(model.lm_head)
    return model


def _patched_head(model):
    head = model.lm_head
    head.forward = lambda x: torch.nn.functional.linear(x, head.weight) * 2
    return model


@pytest.mark.parametrize("change, match", [
    (_softcapped, "final_logit_softcapping=30.0"),
    (_scaled, "logit_scale=0.0625"),
    (_wrapped_head, "plain torch.nn.Linear LM head, got Sequential"),
    (_patched_head, "with a patched forward"),
], ids=["softcapping", "logit_scale", "not-linear", "patched-forward"])
def test_fused_linear_refuses_models(tmp_path, change, match):
    model = change(make_model(len(make_tokenizer())))
    with pytest.raises(ValueError, match=match):
        make_trainer(model, fused_args(tmp_path))
    make_trainer(model, fused_args(tmp_path, opo_fused_linear=False))  # the logits path is fine


def test_fused_linear_refuses_a_head_it_does_not_reproduce(tmp_path):
    """A transform the config does not announce (here a forward hook that scales the logits)
    is caught by the first loss call, which compares the head on hidden_states[-1] with the
    model's own logits."""
    model = make_model(len(make_tokenizer()))
    model.lm_head.register_forward_hook(lambda module, inputs, output: output * 2)
    trainer = make_trainer(model, fused_args(tmp_path, max_steps=1))
    with pytest.raises(RuntimeError, match="does not reproduce the model's logits"):
        trainer.train()


@pytest.mark.parametrize("options, match", [
    ({"opo_chunk_size": 0}, "opo_chunk_size must be an int >= 1"),
    ({"opo_chunk_size": 2.5}, "opo_chunk_size must be an int >= 1"),
    ({"opo_logits_budget": -1}, "opo_logits_budget must be an int >= 0"),
    ({"opo_logits_budget": 8, "opo_fused_linear": False}, "opo_logits_budget only applies"),
    ({"opo_chunk_size": 8, "opo_fused_linear": False}, "only applies to the 'fused_linear'"),
    ({"opo_chunk_size": 8, "opo_fused_linear": None, "opo_loss_path": "trl_fused_head"},
     "only applies to the 'fused_linear'"),
    ({"opo_loss_path": "logits"}, "opo_fused_linear=True asks for opo_loss_path='fused_linear'"),
    ({"opo_fused_linear": None, "opo_loss_path": "hidden"}, "opo_loss_path must be one of"),
    ({"opo_fused_linear": 1}, "opo_fused_linear must be True, False or None"),
], ids=["zero", "float", "budget", "budget-logits", "without-fused", "trl-head", "conflict",
        "unknown-path", "flag-int"])
def test_fused_linear_config_refuses(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        fused_args(tmp_path, **options)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])


@pytest.mark.parametrize("path", ["fused_linear", "logits"])
def test_cast_lm_head_to_fp32_under_mixed_precision(tmp_path, path):
    """bf16 model, bf16 autocast, cast_lm_head_to_fp32 and num_iterations=2: TRL takes the old
    log-probs (π_ref) from its fused head in fp32 with autocast off, so at the first step (the
    parameters that sampled the batch) the log-ratio must be ~0 on every path. It was ~5e-5
    here (the head run in bf16 against an fp32 π_ref: noise in v, p̃, τ and the penalty)."""
    model = make_model(len(make_tokenizer())).to(torch.bfloat16)
    args = fused_args(tmp_path, bf16=True, num_iterations=2, cast_lm_head_to_fp32=True,
                      opo_loss_path=path, opo_fused_linear=None, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(model, args)
        trainer.train()
    assert trainer.opo_loss_path == path
    first = trainer.state.log_history[0]
    assert abs(first["opo/log_ratio_mean"]) < 1e-6, first
    assert first["opo/kl_k3"] < 1e-10, first
