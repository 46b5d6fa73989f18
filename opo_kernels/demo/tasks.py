"""The demo's two verifiable tasks: rollouts, rewards, and what each shows.

- ``sort`` (fixed length): the prompt is ``length`` random digits in 0..digits−1; the policy
  writes ``length`` digits; the reward is the fraction of positions equal to the prompt's digits
  sorted ascending. The best answer that ignores the prompt scores ``constant_baseline`` (0.340
  at 5 digits of 0..7), so a reward above it means the policy reads its prompt.
- ``sort_stop`` (variable length): the prompt is 2..``length`` digits (left-padded); the policy
  writes digits and chooses when to stop with an EOS token (at most length + 1 tokens). The
  reward is the number of positions that match the sorted prompt divided by
  max(answer length, prompt length): stopping early and running on both cost reward. Here a
  loss whose weights push every sampled completion up (every ω > 0) can favour short answers —
  the question the second task puts to OPO's defaults.

Token ids: digits 0..digits−1, SEP = digits, EOS = digits + 1, PAD = digits + 2 (inputs);
the policy's output head covers the digits (``sort``) or the digits and EOS (``sort_stop``,
EOS = output id ``digits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    """tokens: [B, P + 1 + C] prompt, SEP, completion (input ids); completions: [B, C] output
    ids; mask: [B, C] counted tokens (None: all); old: [B, C] log-probs of the sampling policy
    (0 where not counted)."""

    tokens: torch.Tensor
    completions: torch.Tensor
    mask: Optional[torch.Tensor]
    old: torch.Tensor


class Task:
    """Shared rollout machinery; subclasses define prompts, lengths and the reward."""

    name = ""
    title = ""

    def __init__(self, digits: int, length: int):
        self.digits, self.length = digits, length
        self.sep, self.eos, self.pad = digits, digits + 1, digits + 2

    @property
    def prompts_note(self) -> str:
        """What a prompt is, for figure titles."""
        return f"{self.length} digits of 0..{self.digits - 1}"

    # geometry -------------------------------------------------------------------------------
    prompt_len = 0      # P: prompt tokens before SEP
    completion_len = 0  # C
    vocab_out = 0

    @property
    def vocab_in(self) -> int:
        return self.digits + 3

    @property
    def max_len(self) -> int:
        return self.prompt_len + 1 + self.completion_len

    def to_input(self, out_ids: torch.Tensor) -> torch.Tensor:
        return out_ids

    # rollouts ---------------------------------------------------------------------------------
    def completion_logits(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Logits that predict the completion tokens: a [B, C, V] view of the model output."""
        return model(tokens[:, :-1])[:, self.prompt_len:]

    @torch.no_grad()
    def rollout(self, model, prompts: torch.Tensor, group_size: int, gen: torch.Generator,
                device: str) -> Rollout:
        """Sample group_size completions per prompt at temperature 1 (on the CPU generator, so
        every device draws the same tokens for the same policy)."""
        prompts = prompts.repeat_interleave(group_size, dim=0)
        sep = torch.full((prompts.shape[0], 1), self.sep, dtype=prompts.dtype)
        tokens = torch.cat([self.encode_prompts(prompts), sep], dim=1).to(device)
        outs = []
        for _ in range(self.completion_len):
            probs = model(tokens)[:, -1].float().softmax(-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen).to(device)
            outs.append(nxt)
            tokens = torch.cat([tokens, self.to_input(nxt)], dim=1)
        completions = torch.cat(outs, dim=1)
        mask = self.completion_mask(completions)
        old = self.completion_logits(model, tokens).float().log_softmax(-1)
        old = old.gather(-1, completions[..., None])[..., 0]
        if mask is not None:
            old = torch.where(mask, old, 0.0)
        return Rollout(tokens, completions, mask, old)

    def encode_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        return prompts

    def completion_mask(self, completions: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def lengths(self, rollout: Rollout) -> torch.Tensor:
        """[B] counted completion tokens."""
        if rollout.mask is None:
            return torch.full((rollout.completions.shape[0],), float(self.completion_len))
        return rollout.mask.sum(1).float()

    def constant_baseline(self) -> Optional[float]:
        return None


class SortTask(Task):
    """Sort ``length`` digits; fixed-length answers (module docstring)."""

    name = "sort"
    title = "sort the digits (fixed length)"

    def __init__(self, digits: int, length: int):
        super().__init__(digits, length)
        self.prompt_len = self.completion_len = length
        self.vocab_out = digits

    def make_prompts(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.digits, (n, self.length), generator=gen)

    def reward(self, prompts: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """Fraction of positions equal to the sorted prompt: [B, L] -> [B] float32."""
        target = prompts.to(rollout.completions.device).sort(dim=1).values
        return (rollout.completions == target).float().mean(dim=1)

    def constant_baseline(self) -> Optional[float]:
        """Expected reward of the best prompt-independent answer (exact; None if too many
        prompts): position i should be the most frequent i-th smallest digit of the prompt."""
        digits, length = self.digits, self.length
        if digits ** length > 2 ** 20:
            return None
        codes = torch.arange(digits ** length)
        prompts = torch.stack([(codes // digits ** i) % digits for i in range(length)], dim=1)
        counts = F.one_hot(prompts.sort(dim=1).values, digits).sum(dim=0)  # [length, digits]
        return (counts.max(dim=1).values.sum() / (length * digits ** length)).item()


class SortStopTask(Task):
    """Sort 2..``length`` digits and stop with EOS (module docstring). Prompts are stored as
    [n, length] with −1 in the unused leading slots."""

    name = "sort_stop"
    title = "sort the digits, then stop (variable length)"
    min_len = 2

    @property
    def prompts_note(self) -> str:
        return f"{self.min_len}-{self.length} digits of 0..{self.digits - 1}"

    def __init__(self, digits: int, length: int):
        super().__init__(digits, length)
        self.prompt_len = length
        self.completion_len = length + 1
        self.vocab_out = digits + 1  # digits and EOS (output id `digits`)

    def make_prompts(self, n: int, gen: torch.Generator) -> torch.Tensor:
        digits = torch.randint(0, self.digits, (n, self.length), generator=gen)
        sizes = torch.randint(self.min_len, self.length + 1, (n,), generator=gen)
        unused = torch.arange(self.length)[None, :] < (self.length - sizes)[:, None]
        return torch.where(unused, -1, digits)  # left-padded

    def encode_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        return torch.where(prompts < 0, self.pad, prompts)

    def to_input(self, out_ids: torch.Tensor) -> torch.Tensor:
        return torch.where(out_ids == self.digits, self.eos, out_ids)

    def completion_mask(self, completions: torch.Tensor) -> torch.Tensor:
        """Tokens up to and including the first EOS (all of them without an EOS)."""
        is_eos = (completions == self.digits).long()
        before = is_eos.cumsum(1) - is_eos  # EOS tokens strictly before each position
        return before == 0

    def reward(self, prompts: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """(# positions matching the sorted prompt) / max(answer length, prompt length)."""
        prompts = prompts.to(rollout.completions.device)
        size = (prompts >= 0).sum(1)
        # the sorted digits first, the unused slots last (as a value no output id takes)
        target = torch.where(prompts < 0, self.digits + 100, prompts).sort(dim=1).values
        out = rollout.completions
        is_eos = out == self.digits
        answer_len = torch.where(is_eos.any(1), is_eos.float().argmax(1),
                                 torch.full_like(size, out.shape[1]))
        pos = torch.arange(self.length, device=out.device)[None, :]
        hits = (out[:, :self.length] == target) & (pos < answer_len[:, None]) \
            & (pos < size[:, None])
        return hits.sum(1).float() / torch.maximum(answer_len, size).clamp(min=1).float()
