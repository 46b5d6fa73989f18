"""A minimal RL loop with ``opo_kernels.opo_loss`` and nothing else: plain PyTorch, no trainer.

Task (rule-based reward): given one prompt token, repeat it. A completion of up to --length
tokens ends at the first EOS; its reward is the fraction of --length positions that repeat the
prompt. Each step samples --group completions per prompt from a tiny GRU language model,
scores them, and takes --updates-per-batch optimizer steps on the OPO loss:

    π_ref = the sampling policy: its per-token log-probs are recorded while sampling and passed
            as ref_logprobs (with one update per batch, ref_logprobs=None is equivalent: π_ref
            is then the detached current policy, i.e. on-policy).
    logits[:, :-1] (a view, not a copy) predict the completion tokens; the mask counts the
            tokens up to and including the first EOS.

Loss options: the example uses the paper's literal level "sequence" (δ_s = Σ_t Δ_t). With the
package default "sequence_mean" (δ_s = mean_t Δ_t) and the default uncentered "seed" weights,
which are all positive, every sampled completion's MEAN log-prob is pushed up; that favours
short completions (a 1-token EOS completion puts its whole weight on one token), and on this
task, which rewards long ones, the reward then falls. Try ``--level sequence_mean`` and
``--level sequence_mean --center-weights`` to see both.

Runs on CPU in seconds (backend "auto" uses the PyTorch reference there, or the Triton kernels
under TRITON_INTERPRET=1; on CUDA it uses the fused kernels):

    python examples/minimal_loop.py --steps 60

What it prints: the loss it reports is the value of the last update of each batch. With one
update per batch (the default) that update is on-policy: π_θ = π_ref, so every v = 0 and the
loss is exactly 0 (up to rounding: ±0.0000), while its gradient is not 0 (∂L/∂v = −ω/M). The
gradient norm and the reward are the numbers to watch. With ``--updates-per-batch 2`` the second
update is off-policy and its loss is no longer 0.
"""

from __future__ import annotations

import argparse
import time

import torch

from opo_kernels import opo_loss

EOS = 0


class TinyLM(torch.nn.Module):
    """Embedding -> GRU -> linear head: [B, L] tokens -> [B, L, V] next-token logits."""

    def __init__(self, vocab: int, hidden: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.rnn = torch.nn.GRU(hidden, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens, state=None):
        out, state = self.rnn(self.embed(tokens), state)
        return self.head(out), state


@torch.no_grad()
def sample(model, prompts, length: int, temperature: float):
    """Completions [B, length], their mask [B, length] and sampling log-probs [B, length]."""
    logits, state = model(prompts[:, None])
    tokens, logprobs = [], []
    for _ in range(length):
        log_p = torch.log_softmax(logits[:, -1].float() / temperature, dim=-1)
        token = torch.multinomial(log_p.exp(), 1)
        tokens.append(token)
        logprobs.append(log_p.gather(1, token))
        logits, state = model(token, state)
    tokens, logprobs = torch.cat(tokens, 1), torch.cat(logprobs, 1)
    # count every token up to and including the first EOS
    after_eos = (tokens == EOS).int().cumsum(1) - (tokens == EOS).int()
    return tokens, after_eos == 0, logprobs


def reward(prompts, tokens, mask):
    """Fraction of the completion's positions that repeat the prompt token."""
    return ((tokens == prompts[:, None]) & mask).float().sum(1) / tokens.shape[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    parser.add_argument("--group", type=int, default=6, help="completions per prompt")
    parser.add_argument("--length", type=int, default=8, help="max completion length")
    parser.add_argument("--vocab", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--updates-per-batch", type=int, default=1)
    parser.add_argument("--level", default="sequence",
                        choices=["sequence", "sequence_mean", "token"])
    parser.add_argument("--center-weights", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = TinyLM(args.vocab).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = []
    start = time.perf_counter()
    if args.updates_per_batch == 1:
        print("one update per batch: on-policy, so the loss value is 0 (v = 0 at π = π_ref) "
              "while its gradient is not; watch the reward and the gradient norm")
    for step in range(args.steps):
        # rollouts: each prompt `group` times in a row, so group_size=group below
        prompts = torch.randint(1, args.vocab, (args.prompts,), device=device)
        prompts = prompts.repeat_interleave(args.group)
        tokens, mask, old_logprobs = sample(model, prompts, args.length, args.temperature)
        rewards = reward(prompts, tokens, mask)

        for _ in range(args.updates_per_batch):
            logits, _ = model(torch.cat([prompts[:, None], tokens], 1))  # [B, 1 + length, V]
            loss, metrics = opo_loss(
                logits[:, :-1], tokens, old_logprobs, rewards, mask=mask,
                group_size=args.group, temperature=args.temperature, level=args.level,
                center_weights=args.center_weights, return_metrics=True,
                grad_to_base=True,  # the gradient of logits written whole: no slice backward
            )
            optimizer.zero_grad()
            loss.backward()
            # the norm only (max_norm=inf clips nothing): on-policy the loss is 0, this is not
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            optimizer.step()

        history.append(rewards.mean().item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  reward {history[-1]:.3f}  loss {loss.item():+.4f}  "
                  f"grad norm {grad_norm.item():.3f}  tau {metrics['tau'].item():.3f}  "
                  f"omega_mean {metrics['omega_mean'].item():.3f}  "
                  f"kl_k3 {metrics['kl_k3'].item():.2e}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s on {device}; mean reward "
          f"first 10: {sum(history[:10]) / len(history[:10]):.3f}, "
          f"last 10: {sum(history[-10:]) / len(history[-10:]):.3f}")
    return history


if __name__ == "__main__":
    main()
