"""OPOTrainer reads the loss's deferred value checks (validate="deferred") where no later loss
call would: at the end of training, before and at the end of evaluation, before a checkpoint
save; under torch.distributed every process raises when one found bad input
(opo_kernels/integrations/trl/deferred_checks.py).

On the CPU a call's counts are ready at its backward, which then raises; the GPU case, where
the copy may still be in flight at the backward (validation.py), is simulated by making
``Deferred.ready`` return False, so only a later call or check_deferred reads the counts. The
bad value is a non-finite ref log-prob (TRL's old log-probs: an off-policy schedule) at a
counted token of the last loss call, on the two paths that defer (the fused-linear loss reads
its checks at the call).
"""

import itertools
import os
import re

import pytest
import torch
from ranks import run_ranks

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from datasets import Dataset  # noqa: E402
from test_trl_fused_linear import fused_args  # noqa: E402
from test_trl_integration import PROMPTS, make_model, make_tokenizer, vowel_reward  # noqa: E402

from opo_kernels import validation  # noqa: E402
from opo_kernels.from_logprobs import opo_loss_from_logprobs  # noqa: E402
from opo_kernels.integrations.trl import OPOTrainer  # noqa: E402
from opo_kernels.integrations.trl.deferred_checks import check_deferred_agreed  # noqa: E402
from opo_kernels.integrations.trl.paths import trl_fused_head_available  # noqa: E402

# the default on-policy path where TRL has its fused LM head (TRL >= 1.16)
PATH = "trl_fused_head" if trl_fused_head_available() else "logits"


@pytest.fixture(autouse=True)
def _nothing_pending():
    validation._PENDING.clear()
    yield
    validation._PENDING.clear()


class BadLastCall(OPOTrainer):
    """Puts a NaN ref log-prob (TRL's old log-probs) at the first counted token of loss call
    ``bad_call`` (counted in the mode ``bad_mode``: "train" or "eval") and records that call's
    number."""

    bad_call, bad_mode, failing_call, calls = None, "train", None, None

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        self.calls[mode] += 1
        if mode != self.bad_mode or self.calls[mode] != self.bad_call:
            return super()._compute_loss(model, inputs)
        inputs = dict(inputs)  # packed: [groups, K, ...]
        counted = inputs["completion_mask"].bool() & inputs["opo_scorable"][..., None]
        ref = inputs["old_per_token_logps"].clone()
        ref[tuple(counted.nonzero()[0])] = float("nan")
        inputs["old_per_token_logps"] = ref
        loss = super()._compute_loss(model, inputs)
        self.failing_call = validation._PENDING[-1].call
        return loss


def _trainer(tmp_path, path, **options):
    tokenizer = make_tokenizer()
    # num_iterations=2: each generation serves two optimizer steps, so TRL keeps old log-probs
    args = fused_args(tmp_path, opo_fused_linear=None, opo_loss_path=path, num_iterations=2,
                      max_steps=1, **options)
    trainer = BadLastCall(model=make_model(len(tokenizer)), reward_funcs=vowel_reward,
                          args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                          eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}))
    trainer.calls = {"train": 0, "eval": 0}
    return trainer


def _assert_names_failing_call(error, trainer, when):
    """The error is raised by the check ``when`` and names the bad call (its number, the
    shape and dtype of its log-probs or logits: 6 completions of 6 tokens) and its bad
    argument."""
    assert trainer.failing_call is not None
    source = (rf"logits \[6, 6, {len(make_tokenizer())}\]" if trainer.opo_loss_path == "logits"
              else r"logprobs \[6, 6\]")
    assert re.match(rf"OPOTrainer, {when}: validate='deferred': the value checks of call "
                    rf"{trainer.failing_call} \({source} float32\) found bad input: "
                    r"ref_logprobs: 1 non-finite", str(error.value)), str(error.value)


@pytest.mark.parametrize("path", ["trl_fused_head", "logits"])
def test_last_training_call_raises_at_the_end_of_training(tmp_path, monkeypatch, path):
    if path != PATH and path != "logits":
        pytest.skip("this TRL has no fused LM head (TRL >= 1.16)")
    monkeypatch.setattr(validation.Deferred, "ready", lambda self: False)  # copy in flight
    trainer = _trainer(tmp_path, path)
    assert trainer.opo_loss_path == path
    trainer.bad_call = 2  # max_steps=1 x gradient_accumulation_steps=2: the last one
    with pytest.raises(ValueError) as error:
        trainer.train()
    _assert_names_failing_call(error, trainer, "at the end of training")
    assert trainer.calls["train"] == 2
    assert not validation._PENDING


def test_checks_before_a_checkpoint_save(tmp_path, monkeypatch):
    monkeypatch.setattr(validation.Deferred, "ready", lambda self: False)
    trainer = _trainer(tmp_path, PATH, save_strategy="steps", save_steps=1)
    trainer.bad_call = 2
    with pytest.raises(ValueError) as error:
        trainer.train()
    _assert_names_failing_call(error, trainer, "before saving a checkpoint")
    assert not list(tmp_path.glob("checkpoint-*"))  # nothing written after the bad step


def test_checks_before_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr(validation.Deferred, "ready", lambda self: False)
    trainer = _trainer(tmp_path, "logits", eval_strategy="steps", eval_steps=1,
                       per_device_eval_batch_size=6)
    trainer.bad_call = 2
    with pytest.raises(ValueError) as error:
        trainer.train()
    _assert_names_failing_call(error, trainer, "before evaluation")
    assert trainer.calls["eval"] == 0


def test_evaluation_calls_raise_at_the_end_of_evaluation(tmp_path):
    """Evaluation's loss calls have no backward: without the check at its end, the last
    one's bad input would go unraised (here on the CPU, no simulation needed)."""
    trainer = _trainer(tmp_path, PATH, per_device_eval_batch_size=6)
    trainer.bad_mode, trainer.bad_call = "eval", 1
    trainer.train()  # nothing bad in training
    with pytest.raises(ValueError) as error:
        trainer.evaluate()
    _assert_names_failing_call(error, trainer, "at the end of evaluation")
    assert trainer.calls["eval"] == 1


# ---- agreed over processes -----------------------------------------------------------------


def _rank(rank: int, world: int, port: int, bad_rank: int) -> None:
    """One process: a good deferred loss call and the agreed check (no error), then a
    deferred call with bad input on ``bad_rank`` and the agreed check (an error on each)."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        validation._CALLS = itertools.count(1)
        logprobs = -torch.rand(6, 4) - 0.1
        for bad in (False, True):
            ref = logprobs.clone()
            if bad and rank == bad_rank:
                ref[2, 1] = float("inf")
            with torch.no_grad():  # no backward: only the check reads the counts
                opo_loss_from_logprobs(logprobs, ref, torch.arange(6.0), group_size=3,
                                       vocab_size=16, validate="deferred")
            if not bad:
                check_deferred_agreed("at the end of training")
                continue
            try:
                check_deferred_agreed("at the end of training")
            except ValueError as err:
                message = str(err)
            else:
                raise AssertionError(f"rank {rank} did not raise")
        if rank == bad_rank:
            assert message.startswith("OPOTrainer, at the end of training: validate='deferred':"
                                      " the value checks of call 2 (logprobs [6, 4] float32)"), \
                message
            assert "ref_logprobs" in message, message
        else:
            assert f"found bad input on process(es) [{bad_rank}]" in message, message
        assert not validation._PENDING
    finally:
        dist.destroy_process_group()


def test_every_process_raises_when_one_found_bad_input():
    run_ranks(_rank, 2, 1)
