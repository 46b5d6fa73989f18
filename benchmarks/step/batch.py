"""The model (random weights from a transformers config) and the RL micro-batch of one step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from benchmarks.inputs import sequence_lengths
from benchmarks.peers import group_advantages
from benchmarks.step.grid import COUNTED_FRACTION, GROUP_SIZE, MODELS, REF_NOISE


def build_model(name: str, device: torch.device, grad_ckpt: bool, seed: int = 0):
    """A causal LM of ``grid.MODELS[name]``'s shape, random init (seeded), bf16 parameters on
    ``device``, train mode, no KV cache; gradient checkpointing (non-reentrant) if asked."""
    import transformers

    cls_name, kwargs = MODELS[name]
    config = getattr(transformers, cls_name)(**kwargs, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.train()
    if grad_ckpt:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def build_optimizer(model) -> torch.optim.Optimizer:
    """AdamW over every parameter (fused on CUDA), its state created now (one step on zero
    gradients), so that the memory baseline holds the model AND the optimizer state. lr = 0:
    the update runs in full but leaves the weights as they are, so every path of a run sees
    the same model."""
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = params[0].device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, **({"fused": True} if cuda else {}))
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


@dataclass
class StepBatch:
    """One micro-batch. L = seq_len positions; the loss reads T = L − 1 label positions.

    input_ids:      [B, L] int64 (prompt, completion, then padding)
    attention_mask: [B, L] int64, 1 on prompt + completion
    labels_full:    [B, L] int64, −100 except on completion tokens (TRL / CCE targets)
    labels:         [B, T] int64 = input_ids[:, 1:] (position t predicts token t+1)
    mask:           [B, T] int64 0/1, 1 where the label is a completion token (counted)
    old_logprobs:   [B, T] float32, the model's own log-probs + N(0, REF_NOISE²)
    rewards:        [B] float32; advantages: [B] float32 normalized in groups (Liger's input)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels_full: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    vocab: int
    group_size: int = GROUP_SIZE

    @property
    def B(self) -> int:
        return self.input_ids.shape[0]

    @property
    def L(self) -> int:
        return self.input_ids.shape[1]

    @property
    def counted(self) -> int:
        return int(self.mask.sum())

    def describe(self) -> Dict[str, object]:
        return {"B": self.B, "L": self.L, "tokens": self.B * self.L, "counted": self.counted,
                "group_size": self.group_size}


def make_batch(model, tokens: int, seq_len: int, prompt_len: int, seed: int = 0,
               old_logprobs: Optional[torch.Tensor] = None) -> StepBatch:
    """tokens / seq_len sequences: a prompt of prompt_len tokens, a completion whose lengths are
    drawn uniform in [0.4, 1]·(seq_len − prompt_len) and adjusted so that COUNTED_FRACTION of
    the positions count, random token ids. old_logprobs: given, or the model's own (no grad, a
    sequence at a time) + noise."""
    from opo_kernels.reference import chunked_logprobs

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    b = tokens // seq_len
    if b * seq_len != tokens or b % GROUP_SIZE:
        raise ValueError(f"tokens={tokens} must be a multiple of {GROUP_SIZE}·seq_len")
    gen = torch.Generator().manual_seed(seed)
    completion = torch.tensor(sequence_lengths(round(COUNTED_FRACTION * tokens), b,
                                               seq_len - prompt_len, gen))
    ids = torch.randint(0, vocab, (b, seq_len), generator=gen)
    pos = torch.arange(seq_len)[None, :]
    attention = (pos < prompt_len + completion[:, None]).long()
    is_completion = (pos >= prompt_len) & (attention != 0)
    labels_full = torch.where(is_completion, ids, -100)
    mask = is_completion[:, 1:].long()
    rewards = torch.randn(b, generator=gen)
    advantages = group_advantages(rewards, GROUP_SIZE)
    batch = StepBatch(ids.to(device), attention.to(device), labels_full.to(device),
                      ids[:, 1:].contiguous().to(device), mask.to(device), None,
                      rewards.to(device), advantages.to(device), vocab)
    if old_logprobs is None:
        with torch.no_grad():
            own = torch.cat([
                chunked_logprobs(model(input_ids=batch.input_ids[i:i + 1],
                                       attention_mask=batch.attention_mask[i:i + 1]
                                       ).logits[:, :-1], batch.labels[i:i + 1])
                for i in range(b)])
        noise = REF_NOISE * torch.randn(own.shape, generator=gen)
        old_logprobs = own.float() + noise.to(device)
    batch.old_logprobs = old_logprobs
    return batch
