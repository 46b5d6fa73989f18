"""One real verl actor update on CPU, checked against opo_kernels.reference (run by
tests/test_verl_integration.py in its own process: `python verl_engine_step.py WORKDIR OUT.json`,
with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set for a 1-process gloo group). Its pieces (the
CPU platform, the actor, the rollout, the reference) also serve verl_dp_step.py, the same update
at two data-parallel ranks.

The update is verl 0.9.1's own: ``TrainingWorker.train_mini_batch`` (what
``ActorRolloutRefWorker.update_actor`` runs for the trainer) -> FSDP2 engine ``train_batch`` ->
``ppo_loss`` -> the registered ``opo_kernels`` loss -> backward -> optimizer step, on a batch
whose advantages come from the trainer's ``compute_advantage`` with the ``opo_kernels``
estimator and which the legacy trainer's ``_update_actor`` steps put into no-padding form.

Two things verl 0.9.1 lacks on a CPU-only machine are supplied here, before verl is imported:
- a platform: verl registers CUDA, NPU and ROCm only and falls back to CUDA's, whose
  current_device() needs CUDA; ``PlatformCPU`` (device "cpu", gloo, no memory statistics) is
  installed with verl's ``set_platform``;
- an environment without trl: the FSDP engine imports trl's AutoModelForCausalLMWithValueHead
  whenever trl is importable, and trl >= 1.0 (this project's [trl] extra) no longer has it
  (verl[fsdp] pins trl 0.27). Nothing here uses trl.
"""

import importlib.abc
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Optional


class _HideTRL(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "trl" or name.startswith("trl."):
            raise ModuleNotFoundError(f"{name} (hidden: verl 0.9.1's engine needs trl < 1.0)")
        return None


assert "trl" not in sys.modules
sys.meta_path.insert(0, _HideTRL())

import torch  # noqa: E402
from verl.plugin.platform import platform_manager  # noqa: E402
from verl.plugin.platform.platform_cuda import PlatformCUDA  # noqa: E402


class _CpuModule:
    """torch.cpu plus the memory and name queries verl logs."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    def max_memory_allocated(self, *args, **kwargs):
        return 0

    max_memory_reserved = memory_allocated = memory_reserved = max_memory_allocated

    def mem_get_info(self, *args, **kwargs):
        return 0, 0

    def get_device_name(self, *args, **kwargs):
        return "CPU"

    def empty_cache(self):
        pass

    def reset_peak_memory_stats(self, *args, **kwargs):
        pass


class PlatformCPU(PlatformCUDA):
    device_name = property(lambda self: "cpu")
    device_module = property(lambda self: _CpuModule())

    def is_available(self):
        return True

    def current_device(self):
        return "cpu"

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def empty_cache(self):
        pass

    def set_allocator_settings(self, settings):
        pass

    def communication_backend_name(self):
        return "gloo"


platform_manager.set_platform(PlatformCPU())
# the FSDP engine is registered for devices "cuda"/"npu": select that registration
os.environ["VERL_ENGINE_DEVICE"] = "cuda"

import numpy as np  # noqa: E402
import transformers  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.trainer.config import CheckpointConfig  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import (  # noqa: E402
    FSDPActorConfig,
    FSDPEngineConfig,
    FSDPOptimizerConfig,
    HFModelConfig,
)
from verl.workers.config.engine import TrainingWorkerConfig  # noqa: E402
from verl.workers.engine_workers import TrainingWorker  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import opo_kernels.integrations.verl as ov  # noqa: E402
from opo_kernels import reference  # noqa: E402

K = 3            # rollout.n
PROMPTS = 4      # one mini-batch of 12 responses, two micro-batches of 6 (2 groups each)
MICRO = 2 * K
VOCAB, PROMPT_LEN, RESP_LEN = 40, 4, 5
LR = 1000.0      # SGD: the step is -LR * gradient; a large LR keeps fp32 rounding of the
                 # parameter difference ~1e-7 of the gradient


def save_model(model_dir: str):
    """A tiny random Qwen2 (fp32), the same for every caller (seeded)."""
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False,
    )).save_pretrained(model_dir)


def build_actor(model_dir: str, micro: int = MICRO, mini_prompts: int = PROMPTS,
                max_tokens: Optional[int] = None):
    """The actor as ActorRolloutRefWorker.init_model builds it: fp32 end to end, SGD (so the step
    is -lr * gradient), no gradient clipping; micro: rows per micro-batch on one rank;
    mini_prompts: actor.ppo_mini_batch_size (prompts per optimizer step, all ranks);
    max_tokens: actor.use_dynamic_bsz=True with this ppo_max_token_len_per_gpu (micro-batches
    cut by token count; micro unused)."""
    model_config = HFModelConfig(path=model_dir, load_tokenizer=False,
                                 override_config={"attn_implementation": "eager"},
                                 enable_gradient_checkpointing=False)
    engine_config = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False,
                                     mixed_precision={"param_dtype": "fp32",
                                                      "reduce_dtype": "fp32",
                                                      "buffer_dtype": "fp32"})
    engine_config.micro_batch_size_per_gpu = micro
    engine_config.use_dynamic_bsz = max_tokens is not None
    engine_config.max_token_len_per_gpu = max_tokens
    actor = TrainingWorker(config=TrainingWorkerConfig(
        model_type="language_model", model_config=model_config, engine_config=engine_config,
        optimizer_config=FSDPOptimizerConfig(optimizer="SGD", lr=LR, clip_grad=1e9,
                                             weight_decay=0.0),
        checkpoint_config=CheckpointConfig()))
    actor.reset()
    actor_config = FSDPActorConfig(strategy="fsdp2", rollout_n=K, ppo_mini_batch_size=mini_prompts,
                                   ppo_micro_batch_size_per_gpu=micro,
                                   use_dynamic_bsz=max_tokens is not None,
                                   ppo_max_token_len_per_gpu=max_tokens or 16384,
                                   policy_loss=ov.OPOPolicyLossConfig())
    actor_config.model_config = model_config  # the adaptive tau's V comes from hf_config
    actor.set_loss_fn(partial(ppo_loss, config=actor_config))
    return actor


def make_rollout_data(seed: int = 1, prompts: int = PROMPTS) -> DataProto:
    """A rollout batch as the trainer holds it before its advantages: left-padded prompts,
    right-padded responses, prompt groups of K adjacent rows, outcome rewards on the last token,
    old log-probs from some earlier policy."""
    num = prompts * K
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(1, PROMPT_LEN + 1, (prompts,), generator=g).repeat_interleave(K)
    rlen = torch.randint(1, RESP_LEN + 1, (num,), generator=g)
    prompt_ids = torch.zeros(num, PROMPT_LEN, dtype=torch.long)
    responses = torch.zeros(num, RESP_LEN, dtype=torch.long)
    attention = torch.zeros(num, PROMPT_LEN + RESP_LEN, dtype=torch.long)
    for i in range(num):
        p, r = int(plen[i]), int(rlen[i])
        prompt_ids[i, PROMPT_LEN - p:] = torch.randint(2, VOCAB, (p,), generator=g)
        responses[i, :r] = torch.randint(2, VOCAB, (r,), generator=g)
        attention[i, PROMPT_LEN - p:PROMPT_LEN + r] = 1
    response_mask = attention[:, PROMPT_LEN:].clone()
    response_mask[4] = 0  # a response that counts no token (like verl's padding samples)
    old = (-2 * torch.rand(num, RESP_LEN, generator=g)) * response_mask
    token_rewards = torch.zeros(num, RESP_LEN)
    token_rewards[torch.arange(num), rlen - 1] = torch.rand(num, generator=g)
    return DataProto.from_dict(
        tensors={"input_ids": torch.cat([prompt_ids, responses], 1), "attention_mask": attention,
                 "position_ids": (attention.cumsum(1) - 1).clamp(min=0), "prompts": prompt_ids,
                 "responses": responses, "response_mask": response_mask, "old_log_probs": old,
                 "token_level_rewards": token_rewards},
        non_tensors={"uid": np.repeat([f"p{i}" for i in range(prompts)], K).astype(object)})


def update_batch(data: DataProto, global_rows: int, force_group_size: Optional[int] = None):
    """What the legacy trainer's _update_actor sends the workers for this rank's rows:
    no-padding form and the update's metadata (one mini-batch of global_rows responses over
    all ranks; force_group_size: what opo_kernels' _update_actor adds with use_dynamic_bsz)."""
    batch = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(batch, calculate_entropy=False, global_batch_size=global_rows,
                         mini_batch_size=global_rows, epochs=1, seed=42,
                         dataloader_kwargs={"shuffle": False}, compute_loss=True,
                         temperature=1.0)
    if force_group_size is not None:
        tu.assign_non_tensor(batch, force_group_size=force_group_size)
    return batch


def run_update(actor, data: DataProto, global_rows: int, force_group_size: Optional[int] = None):
    """train_mini_batch on ``update_batch``; returns its metrics."""
    return actor.train_mini_batch(update_batch(data, global_rows, force_group_size))["metrics"]


def dynamic_micro_batches(data: DataProto, max_tokens: int, global_rows: Optional[int] = None,
                          dp_group=None):
    """The rows of each micro-batch verl's use_dynamic_bsz forms from this rank's ``data``
    with a token budget of max_tokens and runs of K rows kept whole, as the engine calls it
    (dp_group: the ranks agree on the number of micro-batches; every rank must call it)."""
    from verl.utils.seqlen_balancing import rearrange_micro_batches

    batch = update_batch(data, global_rows or len(data))
    _, indices = rearrange_micro_batches(batch, max_token_len=max_tokens, dp_group=dp_group,
                                         force_group_size=K)
    return [list(rows) for rows in indices]


def full_params(actor):
    """Every parameter, whole (an all-gather of the FSDP shards: every rank must call it)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in actor.engine.module.named_parameters()}


def reference_loss(model_dir: str, data: DataProto, micro_batches):
    """Σ_mb rows/global_batch_size · OPO(mb) by autograd through opo_kernels.reference, on a
    plain HF forward of each sequence alone (no padding, no packing); micro_batches: the row
    indices of each micro-batch (over all ranks), groups by uid."""
    model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                          dtype=torch.float32)
    b = data.batch
    num = b["input_ids"].shape[0]
    plen = b["attention_mask"][:, :PROMPT_LEN].sum(1)
    rlen = b["attention_mask"][:, PROMPT_LEN:].sum(1)
    logits = torch.zeros(num, RESP_LEN, VOCAB)
    for i in range(num):
        keep = b["attention_mask"][i].bool()
        seq_logits = model(input_ids=b["input_ids"][i, keep][None],
                           position_ids=b["position_ids"][i, keep][None]).logits[0]
        p, r = int(plen[i]), int(rlen[i])
        logits[i, :r] = seq_logits[p - 1:p + r - 1]  # logits that predict response tokens
    rewards = b["token_level_rewards"].sum(-1)
    uid = list(data.non_tensor_batch["uid"])
    group_of = {u: g for g, u in enumerate(sorted(set(uid)))}
    loss = 0.0
    for rows in micro_batches:
        rows = torch.as_tensor(list(rows))
        group_ids = torch.tensor([group_of[uid[i]] for i in rows.tolist()])
        loss = loss + (len(rows) / num) * reference.opo_loss(
            logits[rows], b["responses"][rows], b["old_log_probs"][rows], rewards[rows],
            mask=b["response_mask"][rows].bool(), group_ids=group_ids)
    loss.backward()
    return model, loss


def step_errors(model, before, after):
    """Per parameter: max|(θ_before − θ_after)/lr − reference grad| / max|reference grad|."""
    errors = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        step = (before[name] - after[name]) / LR
        errors[name] = (step - grad).abs().max().item() / max(grad.abs().max().item(), 1e-12)
    return errors


def main(workdir: str, out_path: str, max_tokens: Optional[int] = None):
    """max_tokens: use_dynamic_bsz with that token budget per micro-batch (else fixed
    micro-batches of MICRO rows)."""
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    model_dir = os.path.join(workdir, "model")
    save_model(model_dir)
    actor = build_actor(model_dir, max_tokens=max_tokens)
    data = compute_advantage(make_rollout_data(), adv_estimator=ov.ESTIMATOR)

    num = len(data)
    if max_tokens is None:
        micro_batches = [list(range(s, s + MICRO)) for s in range(0, num, MICRO)]
    else:
        micro_batches = dynamic_micro_batches(data, max_tokens)
    before = full_params(actor)
    metrics = run_update(actor, data, num, None if max_tokens is None else K)
    after = full_params(actor)

    model, loss = reference_loss(model_dir, data, micro_batches)
    errors = step_errors(model, before, after)
    Path(out_path).write_text(json.dumps({
        "micro_batches": micro_batches,
        "loss_engine": float(sum(metrics["loss"])), "loss_reference": loss.item(),
        "grad_norm": float(metrics["grad_norm"][0]), "errors": errors,
        "worst_rel_error": max(errors.values()),
        "tau": [float(t) for t in metrics["actor/opo_tau"]]}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
