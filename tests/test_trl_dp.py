"""OPOTrainer's fused loss paths under FSDP2 at 2 ranks on CPU (gloo, torchrun): loss, ∂hidden
and ∂weight equal the single process.

accelerate runs FSDP only on accelerators, so the ranks shard the model themselves, with
accelerate's own ``fsdp2_prepare_model`` (what an FSDP2 run of the Trainer does) or by hand,
then run ``OPOTrainer._compute_loss`` (``opo_loss_path="fused_linear"``, and once
"trl_fused_head") and the backward on a batch of their own. Layouts:

- accelerate: decoder layers, embeddings and a tail unit [final norm, lm_head] that stays
  unsharded after the forward; the head weight is whole when the loss reads it;
- accelerate, tied embeddings (the LM head weight is the embedding's, as in Qwen2.5-0.5B): the
  tail unit holds both;
- head resharded: lm_head in its own unit with reshard_after_forward=True, so the weight is a
  sharded DTensor after the forward and the loss must all-gather it (``unshard_head``); with
  TRL's fused head too, which would otherwise read it through DTensor's full_tensor(), whose
  gradient FSDP does not average over the ranks.

Off-policy batches (two phases) and on-policy ones (one phase: the gradients are formed in the
forward) both run. The reference is the same trainer code in this (single) process on each
rank's batch with the unsharded model: each rank's loss and ∂hidden equal its batch's, and
the sharded gradients FSDP returns (∂weight included, as a DTensor sharded on dim 0) equal
the mean of the two batches' gradients (FSDP averages over ranks, as DDP does).

A failing rank never hangs the other: torchrun ends the group when one rank exits with an
error, the process group has a 120 s timeout, and the launch a 600 s one.
"""

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cpu_only  # gloo and the interpreter (conftest.py)

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6",
                allow_module_level=True)

from datasets import Dataset  # noqa: E402
from test_trl_integration import (  # noqa: E402
    GROUP,
    MICRO,
    PROMPTS,
    TEMPERATURE,
    make_model,
    make_tokenizer,
    vowel_reward,
)

from opo_kernels.integrations.trl import OPOConfig, OPOTrainer  # noqa: E402
from opo_kernels.integrations.trl.batches import pack_groups  # noqa: E402

PROMPT_LEN, COMPLETION_LEN = 4, 5
# run -> (FSDP layout, tied embeddings, off-policy batch, loss path)
LAYOUTS = {"accelerate": ("accelerate", False, True, "fused_linear"),
           "accelerate-tied": ("accelerate", True, False, "fused_linear"),
           "head-resharded": ("head-resharded", False, True, "fused_linear"),
           "head-resharded-trl-head": ("head-resharded", False, False, "trl_fused_head")}


def make_trainer(model, out_dir, path: str):
    args = OPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=MICRO, num_generations=GROUP,
        max_completion_length=COMPLETION_LEN, temperature=TEMPERATURE, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", seed=0, opo_loss_path=path,
    )
    trainer = OPOTrainer(model=model, reward_funcs=vowel_reward, args=args,
                         processing_class=make_tokenizer(),
                         train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def make_batch(rank: int, vocab_size: int, off_policy: bool) -> dict:
    """One micro-batch of 2 groups of GROUP completions, as OPOTrainer packs it: left-padded
    prompts, right-padded completions (one empty), one completion no reward scored."""
    gen = torch.Generator().manual_seed(100 + rank)
    ids = lambda *shape: torch.randint(2, vocab_size, shape, generator=gen)  # noqa: E731
    prompt_mask = torch.ones(MICRO, PROMPT_LEN, dtype=torch.long)
    prompt_mask[:GROUP, :1] = 0
    lengths = torch.randint(1, COMPLETION_LEN + 1, (MICRO,), generator=gen)
    lengths[1] = 0
    completion_mask = (torch.arange(COMPLETION_LEN) < lengths[:, None]).long()
    batch = {
        "prompt_ids": ids(MICRO // GROUP, 1, PROMPT_LEN).expand(-1, GROUP, -1)
        .reshape(MICRO, PROMPT_LEN) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": ids(MICRO, COMPLETION_LEN) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": torch.randn(MICRO, generator=gen),
        "opo_rewards": torch.randn(MICRO, generator=gen),
        "opo_scorable": torch.arange(MICRO) != 4,
    }
    if off_policy:
        batch["old_per_token_logps"] = -3 * torch.rand(MICRO, COMPLETION_LEN, generator=gen)
    return pack_groups(batch, MICRO, GROUP)


def loss_and_grads(trainer, model, batch):
    """(loss, ∂hidden [B, C, H] (fused-linear path; else None), {name: ∂param}) of one
    ``_compute_loss`` and backward;
    sharded gradients come back whole (``full_tensor``, a collective); "head": the LM head
    weight's gradient (tied: the embedding's) and, sharded, "head_local": (this rank's
    shard, its placements)."""
    captured = {}
    completion_hidden = trainer._opo_completion_hidden

    def capture(*args, **kwargs):
        hidden, weight, bias, outputs = completion_hidden(*args, **kwargs)
        hidden.retain_grad()
        captured["hidden"] = hidden
        return hidden, weight, bias, outputs

    trainer._opo_completion_hidden = capture
    model.zero_grad(set_to_none=True)
    model.train()
    loss = trainer._compute_loss(model, batch)
    loss.backward()
    del trainer._opo_completion_hidden
    hidden = captured.get("hidden")
    grads = {}
    head = model.get_output_embeddings().weight
    for name, param in model.named_parameters():
        grad = param.grad
        if hasattr(grad, "full_tensor"):
            if param is head:
                grads["head_local"] = (grad.to_local().clone(), str(grad.placements))
            grad = grad.full_tensor()
        grads[name] = grad.detach().clone()
        if param is head:
            grads["head"] = grads[name]
    return loss.detach(), None if hidden is None else hidden.grad.detach().clone(), grads


@pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) < (2, 11),
    reason="FSDP2 over gloo in torch 2.8 sums the ranks' gradients where it should average "
           "them (ReduceOp.AVG, which gloo does not apply): every parameter's gradient comes "
           "out 2x at two ranks, the model's alike; averaged in torch 2.11 and 2.13")
def test_fused_linear_fsdp2_two_ranks(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", __file__, str(tmp_path)], check=True, env=env,
                   timeout=600)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    vocab_size = len(make_tokenizer())
    for run, (layout, tied, off_policy, path) in LAYOUTS.items():
        model = make_model(vocab_size, tied=tied)
        trainer = make_trainer(model, tmp_path, path)
        refs = [loss_and_grads(trainer, model, make_batch(r, vocab_size, off_policy))
                for r in range(2)]
        assert not torch.equal(refs[0][2]["head"], refs[1][2]["head"])  # different batches
        for r, result in enumerate(ranks):
            loss, grad_hidden, grads, gathered = result[run]
            # the head-resharded layout really gathered a sharded weight; accelerate's tail
            # unit kept it whole after the forward
            assert gathered == (layout == "head-resharded"), run
            torch.testing.assert_close(loss, refs[r][0], rtol=1e-6, atol=1e-7,
                                       msg=f"{run} rank {r}: loss")
            if path == "fused_linear":
                torch.testing.assert_close(grad_hidden, refs[r][1], rtol=1e-5, atol=1e-7,
                                           msg=f"{run} rank {r}: grad hidden")
            assert set(grads) == set(refs[0][2]) | {"head_local"}
            for name, ref in refs[0][2].items():
                expected = (ref + refs[1][2][name]) / 2
                torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-7,
                                           msg=f"{run} rank {r}: {name}")
            local, placements = grads["head_local"]
            assert placements == "(Shard(dim=0),)", placements
            expected = torch.chunk((refs[0][2]["head"] + refs[1][2]["head"]) / 2, 2)[r]
            torch.testing.assert_close(local, expected, rtol=1e-5, atol=1e-7,
                                       msg=f"{run} rank {r}: this rank's shard of ∂weight")
        assert refs[0][2]["head"].abs().sum() > 0


def _shard(model, layout: str) -> None:
    """FSDP2 on the model in place: accelerate's own preparation, or the head alone in a
    unit that reshards after the forward."""
    from torch.distributed.fsdp import fully_shard

    if layout.startswith("accelerate"):
        import types

        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=True)
        # the parts of an Accelerator that fsdp2_prepare_model reads
        accelerator = types.SimpleNamespace(
            state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
            mixed_precision="no", is_main_process=torch.distributed.get_rank() == 0,
            device=torch.device("cpu"))
        fsdp2_prepare_model(accelerator, model)
    else:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head, reshard_after_forward=True)
        fully_shard(model)


def _fsdp_worker(out_dir: str) -> None:
    """Runs in each torchrun process (see test_fused_linear_fsdp2_two_ranks)."""
    import torch.distributed as dist

    from opo_kernels.integrations.trl import trainer as trainer_module

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    vocab_size = len(make_tokenizer())
    unshard_head = trainer_module.unshard_head
    gathered = []  # per call: was the head weight sharded when the loss asked for it

    def recording_unshard(model, head):
        was_sharded = hasattr(head.weight, "full_tensor")
        unshard_head(model, head)
        assert not hasattr(head.weight, "full_tensor")  # whole for the loss
        gathered.append(was_sharded)

    trainer_module.unshard_head = recording_unshard
    results = {}
    for run, (layout, tied, off_policy, path) in LAYOUTS.items():
        gathered.clear()
        model = make_model(vocab_size, tied=tied)
        trainer = make_trainer(model, out_dir, path)
        _shard(model, layout)
        loss, grad_hidden, grads = loss_and_grads(trainer, model,
                                                  make_batch(rank, vocab_size, off_policy))
        # resharded after the backward
        assert hasattr(model.get_output_embeddings().weight, "full_tensor")
        results[run] = (loss, grad_hidden, grads, gathered == [True])
    trainer_module.unshard_head = unshard_head
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":  # TRITON_INTERPRET comes from the test's environment (conftest)
    _fsdp_worker(sys.argv[1])
