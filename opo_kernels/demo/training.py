"""The demo's settings and its RL loop (identical for every method).

Each step draws ``prompts`` prompts (the prompt stream depends only on the seed), samples
``group_size`` = 6 completions per prompt at temperature 1 (6 rollouts per prompt as in the
paper), records the sampling policy's per-token log-probs and makes ``inner_steps`` = 2 Adam
steps on the batch, so that the second one is off-policy (π ≠ π_old) and the ratio machinery of
every method acts. Gradients are clipped to a total norm of 1; the logged ``grad_norm`` is the
norm before clipping, averaged over the inner steps of a step. All runs of a seed start from
the same weights and see the same prompts; their sampling generators start from the same seed
too (samples differ once the policies differ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from .methods import OBJECTIVES
from .policy import TinyGPT
from .tasks import SortStopTask, SortTask, Task

TASKS = {"sort": SortTask, "sort_stop": SortStopTask}


@dataclass
class DemoConfig:
    """All settings of a demo run (defaults: the figures in docs/)."""

    steps: int = 250
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    tasks: List[str] = field(default_factory=lambda: list(TASKS))
    methods: List[str] = field(default_factory=lambda: list(OBJECTIVES))
    prompts: int = 16              # prompts per step
    group_size: int = 6            # samples per prompt (paper: 6)
    inner_steps: int = 2           # optimizer steps per rollout batch
    digits: int = 8                # digit alphabet 0..digits-1
    length: int = 5                # prompt length (sort_stop: the longest prompt)
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
    smooth: int = 20               # moving-average window of the plots
    last: int = 30                 # the summary averages the reward over the last steps
    bootstrap: int = 10_000        # resamples of the seeds for the 95 % intervals


QUICK = dict(steps=60, seeds=[0, 1])


def make_task(name: str, cfg: DemoConfig) -> Task:
    return TASKS[name](cfg.digits, cfg.length)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the "demo" extra; without it, train silently
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)


def train(task: Task, method: str, cfg: DemoConfig, seed: int,
          progress: bool = True) -> Dict[str, list]:
    """One RL run. Returns per step "reward", "grad_norm", "length" (mean counted completion
    tokens), the method's diagnostic (OPO "tau", mean over inner steps; GSPO "clip_frac" on
    the off-policy inner steps) and "seconds"."""
    objective = OBJECTIVES[method]
    torch.manual_seed(seed)
    model = TinyGPT(task.vocab_in, task.vocab_out, task.max_len, cfg.d_model, cfg.n_layer,
                    cfg.n_head).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    prompt_gen = torch.Generator().manual_seed(10_000 + seed)
    sample_gen = torch.Generator().manual_seed(20_000 + seed)
    log: Dict[str, List[float]] = {"reward": [], "grad_norm": [], "length": []}
    bar = _progress(cfg.steps, f"{task.name} {method} seed {seed}", progress)
    start = time.perf_counter()
    for _ in range(cfg.steps):
        prompts = task.make_prompts(cfg.prompts, prompt_gen)
        model.eval()
        roll = task.rollout(model, prompts, cfg.group_size, sample_gen, cfg.device)
        rewards = task.reward(prompts.repeat_interleave(cfg.group_size, 0), roll)
        model.train()
        norms, stats = [], {}
        for inner in range(cfg.inner_steps):
            logits = task.completion_logits(model, roll.tokens)
            loss, info = objective(logits, roll.completions, roll.old, rewards, roll.mask, cfg)
            for key, value in info.items():
                if key != "clip_frac" or inner > 0:  # on-policy: ratio 1, nothing clipped
                    stats.setdefault(key, []).append(value.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            opt.step()
        log["reward"].append(rewards.mean().item())
        log["grad_norm"].append(torch.stack(norms).mean().item())
        log["length"].append(task.lengths(roll).mean().item())
        for key, values in stats.items():
            log.setdefault(key, []).append(torch.stack(values).mean().item())
        if bar is not None:
            window = log["reward"][-cfg.smooth:]
            bar.set_postfix(reward=f"{sum(window) / len(window):.3f}",
                            len=f"{log['length'][-1]:.2f}", gnorm=f"{log['grad_norm'][-1]:.3g}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return {**log, "seconds": time.perf_counter() - start}
