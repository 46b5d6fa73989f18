"""End-to-end demo: RL-train a tiny transformer with OPO (``opo_kernels.opo_loss``) and GSPO.

    python -m opo_kernels.demo                  # 4 seeds x 300 steps (< 5 min on 2 CPU cores)
    python -m opo_kernels.demo --quick          # 2 seeds x 150 steps (about a minute)
    python -m opo_kernels.demo --device cuda    # fused Triton kernels (backend="auto")

Task: "sort the digits". The prompt is ``length`` random digits (0..digits−1) and a separator;
the policy writes ``length`` digits and the reward is the fraction of positions that match the
prompt's digits sorted ascending (partial credit in steps of 1/length, checked by a rule).
Why this task: a random-init model scores 1/digits per position, and the reward has a ladder
of easy-to-hard credit that gives signal from the first step: the per-position marginals
(small digits first, large digits last) are learnable without looking at the prompt, then the
first and last positions (the prompt's min and max), then the middle. The best answer that
ignores the prompt scores 0.340 at the default 5 digits of 0..7 (exact, ``constant_baseline``;
dashed line in the plot), so a reward above it shows the policy reads the prompt. For copying
or reversing, every prompt-independent answer scores 1/digits: no signal until attention to the
right position forms by chance. Everything is learned from the reward alone (no supervised
warm start), in a few hundred steps of a 2-layer model on 2 CPU cores.

Policy: a small pre-LN GPT written here (causal ``scaled_dot_product_attention``), random init,
input vocabulary = digits + separator, output head = digits only, completion of fixed length
(every completion token is counted; no mask needed).

Rollouts and updates, identical for both methods: each step draws ``prompts`` prompts (the
prompt stream depends only on the seed), samples ``group_size`` = 6 completions per prompt at
temperature 1 (6 rollouts per prompt as in the paper), records the sampling policy's per-token
log-probs ``old`` and makes ``inner_steps`` = 2 Adam steps on the batch, so that the second step
is off-policy (π ≠ π_old) and the ratio machinery of both methods acts. Gradients are clipped
to a total norm of 1 (the logged ``grad_norm`` is the norm before clipping, averaged over the
inner steps of a training step).

- OPO: ``opo_loss(logits, completion, old, rewards, group_size=6, alpha, mu, backend=...)``
  with every other option at the package default (SPEC: seed weights, ratio coordinates,
  sequence_mean level, adaptive τ, reward temperature 0.15; ``ref_logprobs`` = π_old).
- GSPO (Zheng et al. 2025, arXiv 2507.18071): s_i = exp(mean_t(log π − log π_old)),
  A_i = (r_i − mean_group r)/(std_group r + 1e-6),
  loss = −mean_i min(s_i·A_i, clip(s_i, 1 − ε_low, 1 + ε_high)·A_i) with the paper's
  ε_low = 3e-4, ε_high = 4e-4 (``--gspo-eps`` changes them).

Both runs of a seed start from the same weights and see the same prompts; their sampling
generators start from the same seed too (samples differ once the policies differ).

Outputs in ``--out`` (default ./opo_demo): ``curves.json`` (per-step mean rollout reward and
pre-clipping gradient norm of each method: the mean over seeds at the top level, every seed
under ``per_seed``) and ``curves.png`` (reward with a moving average, gradient norm).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused_opo import opo_loss

METHODS = ("opo", "gspo")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """All settings of a demo run (defaults: the figure in docs/demo_curves.png)."""

    steps: int = 300
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    prompts: int = 16              # prompts per step
    group_size: int = 6            # samples per prompt (paper: 6)
    inner_steps: int = 2           # optimizer steps per rollout batch
    digits: int = 8                # digit alphabet 0..digits-1
    length: int = 5                # prompt and completion length
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    alpha: float = 0.6
    mu: float = 1.0
    gspo_eps: List[float] = field(default_factory=lambda: [3e-4, 4e-4])
    backend: str = "auto"
    device: str = "cpu"
    threads: int = 1               # torch CPU threads (tiny ops: more threads only contend)
    smooth: int = 20               # moving-average window of the plot
    last: int = 30                 # the summary averages the reward over the last steps


QUICK = dict(steps=150, seeds=[0, 1])


# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Causal transformer: tokens [B, T] (ids < vocab_in) -> logits [B, T, vocab_out]."""

    def __init__(self, vocab_in: int, vocab_out: int, max_len: int, d_model: int,
                 n_layer: int, n_head: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_in, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_out)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------------------------
# Task: sort the digits
# --------------------------------------------------------------------------------------------


def make_prompts(cfg: DemoConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """n prompts [n, length] of digits (on the CPU generator, so every device sees the same)."""
    return torch.randint(0, cfg.digits, (n, cfg.length), generator=gen)


def reward(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Fraction of positions equal to the sorted prompt: [B, L], [B, L] -> [B] float32."""
    return (completions == prompts.sort(dim=1).values).float().mean(dim=1)


def constant_baseline(digits: int, length: int) -> Optional[float]:
    """Expected reward of the best prompt-independent answer (exact; None if too many prompts).

    Position i of the answer should be the most frequent i-th smallest digit of the prompt.
    """
    if digits ** length > 2 ** 20:
        return None
    codes = torch.arange(digits ** length)
    prompts = torch.stack([(codes // digits ** i) % digits for i in range(length)], dim=1)
    counts = F.one_hot(prompts.sort(dim=1).values, digits).sum(dim=0)  # [length, digits]
    return (counts.max(dim=1).values.sum() / (length * digits ** length)).item()


@torch.no_grad()
def rollout(model: TinyGPT, cfg: DemoConfig, prompts: torch.Tensor, gen: torch.Generator):
    """Sample group_size completions per prompt (temperature 1).

    Returns (tokens [B, 2L+1]: prompt, separator, completion; completions [B, L];
    old per-token log-probs [B, L] of the sampling policy), B = prompts * group_size.
    """
    prompts = prompts.repeat_interleave(cfg.group_size, dim=0)
    sep = torch.full((prompts.shape[0], 1), cfg.digits, dtype=prompts.dtype)
    tokens = torch.cat([prompts, sep], dim=1).to(cfg.device)
    for _ in range(cfg.length):
        probs = model(tokens)[:, -1].float().softmax(-1)
        # sample on the CPU generator: identical draws on every device for the same policy
        nxt = torch.multinomial(probs.cpu(), 1, generator=gen).to(cfg.device)
        tokens = torch.cat([tokens, nxt], dim=1)
    completions = tokens[:, cfg.length + 1:]
    old = completion_logits(model, tokens, cfg).float().log_softmax(-1)
    old = old.gather(-1, completions[..., None])[..., 0]
    return tokens, completions, old


def completion_logits(model: TinyGPT, tokens: torch.Tensor, cfg: DemoConfig) -> torch.Tensor:
    """Logits that predict the completion tokens: a [B, L, V] view of the model output."""
    return model(tokens[:, :-1])[:, cfg.length:]


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def opo_objective(logits, completions, old, rewards, cfg: DemoConfig):
    """The package's OPO loss, package defaults except alpha/mu/backend.

    Returns (loss, {"tau": the adaptive τ of this call}).
    """
    loss, metrics = opo_loss(logits, completions, old, rewards, group_size=cfg.group_size,
                             alpha=cfg.alpha, mu=cfg.mu, backend=cfg.backend,
                             return_metrics=True)
    return loss, {"tau": metrics["tau"]}


def gspo_objective(logits, completions, old, rewards, cfg: DemoConfig):
    """GSPO: sequence-level ratio (length-normalized), clipped, group-normalized advantages.

    Returns (loss, {"clip_frac": fraction of sequences whose clipped term is active, i.e.
    that get no gradient}).
    """
    logp = logits.float().log_softmax(-1).gather(-1, completions[..., None])[..., 0]
    ratio = torch.exp((logp - old).mean(dim=1))
    groups = rewards.view(-1, cfg.group_size)
    adv = ((groups - groups.mean(1, keepdim=True))
           / (groups.std(1, keepdim=True) + 1e-6)).view(-1)
    eps_low, eps_high = cfg.gspo_eps
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped * adv).mean()
    inactive = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    return loss, {"clip_frac": inactive.float().mean()}


OBJECTIVES = {"opo": opo_objective, "gspo": gspo_objective}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the "demo" extra; without it, train silently
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)


def train(method: str, cfg: DemoConfig, seed: int, progress: bool = True) -> Dict[str, list]:
    """One RL run. Returns {"reward": [steps], "grad_norm": [steps], "seconds": float} and the
    method's diagnostic per step: OPO "tau" (mean over inner steps), GSPO "clip_frac" (on the
    off-policy inner steps, i.e. all but the first; empty with --inner-steps 1).
    """
    objective = OBJECTIVES[method]
    torch.manual_seed(seed)
    model = TinyGPT(cfg.digits + 1, cfg.digits, 2 * cfg.length + 1, cfg.d_model, cfg.n_layer,
                    cfg.n_head).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    prompt_gen = torch.Generator().manual_seed(10_000 + seed)
    sample_gen = torch.Generator().manual_seed(20_000 + seed)
    rewards_log: List[float] = []
    norms_log: List[float] = []
    stats_log: Dict[str, List[float]] = {}
    bar = _progress(cfg.steps, f"{method} seed {seed}", progress)
    start = time.perf_counter()
    for _ in range(cfg.steps):
        prompts = make_prompts(cfg, cfg.prompts, prompt_gen)
        model.eval()
        tokens, completions, old = rollout(model, cfg, prompts, sample_gen)
        rewards = reward(prompts.repeat_interleave(cfg.group_size, 0).to(cfg.device),
                         completions)
        model.train()
        norms, stats = [], {}
        for inner in range(cfg.inner_steps):
            logits = completion_logits(model, tokens, cfg)
            loss, info = objective(logits, completions, old, rewards, cfg)
            for key, value in info.items():
                if key != "clip_frac" or inner > 0:  # on-policy: ratio 1, nothing clipped
                    stats.setdefault(key, []).append(value.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            opt.step()
        rewards_log.append(rewards.mean().item())
        norms_log.append(torch.stack(norms).mean().item())
        for key, values in stats.items():
            stats_log.setdefault(key, []).append(torch.stack(values).mean().item())
        if bar is not None:
            window = rewards_log[-cfg.smooth:]
            bar.set_postfix(reward=f"{sum(window) / len(window):.3f}",
                            gnorm=f"{norms_log[-1]:.3g}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"reward": rewards_log, "grad_norm": norms_log, **stats_log,
            "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over the last `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarize(per_seed: Dict[str, Dict[str, dict]], last: int) -> Dict[str, dict]:
    """Per method, over seeds: final reward (mean of the last `last` steps), mean reward over
    all steps (the area under the curve: learning speed) and mean grad norm."""
    out = {}
    for method in METHODS:
        runs = [per_seed[s][method] for s in per_seed]
        finals = [_mean(r["reward"][-last:]) for r in runs]
        overall = [_mean(r["reward"]) for r in runs]
        norms = [_mean(r["grad_norm"]) for r in runs]
        out[method] = {"final_reward_mean": _mean(finals), "final_reward_std": _std(finals),
                       "final_reward_per_seed": finals, "reward_all_steps_mean": _mean(overall),
                       "grad_norm_mean": _mean(norms),
                       "seconds_per_run": _mean([r["seconds"] for r in runs])}
        for key in ("tau", "clip_frac"):
            if runs[0].get(key):
                out[method][key + "_mean"] = _mean([_mean(r[key]) for r in runs])
    return out


def format_summary(summary: Dict[str, dict], n_seeds: int, last: int) -> str:
    """The printed table (markdown): one row per method."""
    spread = f", mean ± std over {n_seeds} seeds" if n_seeds > 1 else ""
    rows = [f"| method | final reward (last {last} steps{spread}) | per seed | mean reward "
            "(all steps) | mean grad norm (pre-clip) | diagnostic | s/run |",
            "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        s = summary[method]
        final = f"{s['final_reward_mean']:.3f}"
        if n_seeds > 1:
            final += f" ± {s['final_reward_std']:.3f}"
        seeds = " ".join(f"{v:.3f}" for v in s["final_reward_per_seed"])
        diag = (f"mean τ {s['tau_mean']:.3f}" if "tau_mean" in s else
                f"clipped on 2nd+ update {s['clip_frac_mean']:.0%}" if "clip_frac_mean" in s
                else "")
        rows.append(f"| {method.upper()} | {final} | {seeds} | {s['reward_all_steps_mean']:.3f} "
                    f"| {s['grad_norm_mean']:.3g} | {diag} | {s['seconds_per_run']:.1f} |")
    return "\n".join(rows)


def plot_curves(curves: dict, path: str, smooth: int) -> None:
    """Two panels (reward with a moving average; pre-clipping grad norm), both methods."""
    import matplotlib  # lazy: only the demo needs it (extra "demo")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"opo": "tab:blue", "gspo": "tab:orange"}
    per_seed = curves["per_seed"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title in ((axes[0], "reward", "rollout reward (fraction of digits sorted)"),
                           (axes[1], "grad_norm", "gradient norm (before clipping)")):
        for method in METHODS:
            seeds = [per_seed[s][method][key] for s in per_seed]
            steps = range(1, len(seeds[0]) + 1)
            smoothed = [moving_average(c, smooth) for c in seeds]
            mean_curve = curves[method][key]
            ax.plot(steps, mean_curve, color=colors[method], alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(mean_curve, smooth), color=colors[method],
                    linewidth=2, label=f"{method.upper()} (moving avg {smooth})")
            if len(seeds) > 1:  # band: min..max over seeds of the smoothed curve
                lo = [min(v) for v in zip(*smoothed)]
                hi = [max(v) for v in zip(*smoothed)]
                ax.fill_between(steps, lo, hi, color=colors[method], alpha=0.15, linewidth=0)
        if key == "reward" and curves["config"].get("constant_baseline") is not None:
            ax.axhline(curves["config"]["constant_baseline"], color="gray", linestyle="--",
                       linewidth=1, label="best prompt-independent answer")
        ax.set_title(title)
        ax.set_xlabel("training step (one rollout batch)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_yscale("log")
    c = curves["config"]
    seeds_note = (f"mean of {len(per_seed)} seeds, band = min..max of seeds"
                  if len(per_seed) > 1 else f"seed {next(iter(per_seed))}")
    fig.suptitle(f"OPO vs GSPO, sort {c['length']} digits (0..{c['digits'] - 1}), "
                 f"{c['prompts']} prompts x {c['group_size']} samples, "
                 f"{c['inner_steps']} updates/batch; {seeds_note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, out_dir: str, progress: bool = True, plot: bool = True) -> dict:
    """Train both methods for every seed, write curves.json (+ curves.png); return the curves."""
    os.makedirs(out_dir, exist_ok=True)
    per_seed: Dict[str, Dict[str, dict]] = {}
    start = time.perf_counter()
    for seed in cfg.seeds:
        per_seed[str(seed)] = {m: train(m, cfg, seed, progress) for m in METHODS}
    summary = summarize(per_seed, min(cfg.last, cfg.steps))
    curves = {m: {k: [_mean(v) for v in zip(*(per_seed[s][m][k] for s in per_seed))]
                  for k in ("reward", "grad_norm")} for m in METHODS}
    curves.update({
        "config": {**asdict(cfg), "torch": torch.__version__,
                   "opo_kernels_backend": _resolved_backend(cfg),
                   "constant_baseline": constant_baseline(cfg.digits, cfg.length)},
        "per_seed": per_seed,
        "summary": summary,
        "total_seconds": time.perf_counter() - start,
    })
    with open(os.path.join(out_dir, "curves.json"), "w", encoding="utf-8") as f:
        json.dump(curves, f, indent=1)
    if plot:
        try:
            plot_curves(curves, os.path.join(out_dir, "curves.png"), cfg.smooth)
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[demo]'): curves.png skipped",
                  file=sys.stderr)
    return curves


def _resolved_backend(cfg: DemoConfig) -> str:
    from .utils import use_triton

    return "triton" if use_triton(cfg.backend, torch.device(cfg.device)) else "torch"


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m opo_kernels.demo",
                                description="RL on 'sort the digits': OPO vs GSPO.")
    p.add_argument("--quick", action="store_true",
                   help=f"short run: {QUICK['steps']} steps, one seed")
    p.add_argument("--steps", type=int, help=f"training steps (default {d.steps})")
    p.add_argument("--seeds", type=int, nargs="+", help=f"seeds (default {d.seeds})")
    p.add_argument("--alpha", type=float, default=d.alpha, help="OPO alpha (default 0.6)")
    p.add_argument("--mu", type=float, default=d.mu, help="OPO mu (default 1.0)")
    p.add_argument("--device", default=d.device, help="cpu or cuda (default cpu)")
    p.add_argument("--backend", default=d.backend, choices=("auto", "torch", "triton"),
                   help="opo_loss backend (auto: Triton on CUDA, PyTorch reference on CPU)")
    p.add_argument("--out", default="opo_demo", help="output folder (default ./opo_demo)")
    p.add_argument("--prompts", type=int, default=d.prompts, help="prompts per step")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps,
                   help="optimizer steps per rollout batch (default 2)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--digits", type=int, default=d.digits, help="digit alphabet size")
    p.add_argument("--length", type=int, default=d.length, help="digits per prompt")
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--n-layer", type=int, default=d.n_layer)
    p.add_argument("--n-head", type=int, default=d.n_head)
    p.add_argument("--gspo-eps", type=float, nargs=2, default=d.gspo_eps,
                   metavar=("LOW", "HIGH"), help="GSPO clip range (default 3e-4 4e-4)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads (default 1: the ops are tiny)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    base = dict(QUICK) if args.quick else {}
    if args.steps is not None:
        base["steps"] = args.steps
    if args.seeds is not None:
        base["seeds"] = args.seeds
    cfg = DemoConfig(**base, alpha=args.alpha, mu=args.mu, device=args.device,
                     backend=args.backend, prompts=args.prompts, inner_steps=args.inner_steps,
                     lr=args.lr, digits=args.digits, length=args.length, d_model=args.d_model,
                     n_layer=args.n_layer, n_head=args.n_head, gspo_eps=list(args.gspo_eps),
                     threads=args.threads)
    if min(cfg.steps, cfg.prompts, cfg.inner_steps, cfg.threads) < 1:
        p.error("--steps, --prompts, --inner-steps and --threads must be >= 1")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return cfg, args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg, args = parse_args(argv)
    print(f"opo_kernels demo: sort {cfg.length} digits (0..{cfg.digits - 1}), {cfg.steps} steps, "
          f"seeds {cfg.seeds}, {cfg.prompts} prompts x {cfg.group_size} samples, "
          f"device {cfg.device}, OPO backend {_resolved_backend(cfg)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        curves = run_demo(cfg, args.out, progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)
    last = min(cfg.last, cfg.steps)
    print(format_summary(curves["summary"], len(cfg.seeds), last))
    print(f"total {curves['total_seconds']:.1f} s; wrote {os.path.join(args.out, 'curves.json')}"
          f" and curves.png")
    return curves


if __name__ == "__main__":
    main()
