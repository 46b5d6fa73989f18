"""The demo's summary (mean ± sd over seeds, paired bootstrap intervals of OPO − GSPO), the
printed table and the figures (one per task: reward, gradient norm, completion length)."""

from __future__ import annotations

import math
import random
from typing import Dict, List, Sequence

from .methods import LABELS

COLORS = {"opo_paper": "tab:blue", "opo_paper_centered": "tab:purple", "opo_author": "tab:green",
          "gspo": "tab:orange"}


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over the last `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def bootstrap_interval(diffs: Sequence[float], resamples: int, seed: int = 0):
    """95 % percentile interval of the mean of `diffs` (one per seed: paired by seed, since the
    runs of a seed share initial weights and prompts), seeds resampled with replacement.
    None with fewer than 2 seeds."""
    if len(diffs) < 2:
        return None
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(mean([diffs[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(int(0.975 * resamples), resamples - 1)]


def summarize(per_seed: Dict[str, Dict[str, dict]], methods: Sequence[str], last: int,
              resamples: int) -> Dict[str, dict]:
    """Per method over seeds: final reward (mean of the last `last` steps), mean reward over all
    steps (learning speed), mean gradient norm, final completion length; per OPO method the
    paired differences with GSPO (final reward, grad norm) with bootstrap 95 % intervals."""
    seeds = list(per_seed)
    out: Dict[str, dict] = {}
    finals: Dict[str, List[float]] = {}
    norms: Dict[str, List[float]] = {}
    for method in methods:
        runs = [per_seed[s][method] for s in seeds]
        finals[method] = [mean(r["reward"][-last:]) for r in runs]
        norms[method] = [mean(r["grad_norm"]) for r in runs]
        lengths = [mean(r["length"][-last:]) for r in runs]
        out[method] = {
            "final_reward_mean": mean(finals[method]), "final_reward_std": std(finals[method]),
            "final_reward_per_seed": finals[method],
            "reward_all_steps_mean": mean([mean(r["reward"]) for r in runs]),
            "grad_norm_mean": mean(norms[method]), "grad_norm_std": std(norms[method]),
            "final_length_mean": mean(lengths),
            "seconds_per_run": mean([r["seconds"] for r in runs]),
        }
        for key in ("tau", "clip_frac"):
            if runs[0].get(key):
                out[method][key + "_mean"] = mean([mean(r[key]) for r in runs])
    if "gspo" in methods:
        for method in methods:
            if method == "gspo":
                continue
            for key, values in (("final_reward", finals), ("grad_norm", norms)):
                diffs = [a - b for a, b in zip(values[method], values["gspo"])]
                out[method][f"{key}_minus_gspo"] = mean(diffs)
                out[method][f"{key}_minus_gspo_ci95"] = bootstrap_interval(diffs, resamples)
    return out


def _ci(interval) -> str:
    return "n/a (1 seed)" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def format_summary(task_title: str, summary: Dict[str, dict], methods: Sequence[str],
                   n_seeds: int, last: int) -> str:
    """One markdown table per task: a row per method."""
    spread = f", mean ± sd over {n_seeds} seeds" if n_seeds > 1 else ""
    rows = [f"**{task_title}**", "",
            f"| method | final reward (last {last} steps{spread}) | − GSPO [95 % CI] | mean "
            "reward (all steps) | grad norm (pre-clip) | − GSPO [95 % CI] | final length | "
            "diagnostic |",
            "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        s = summary[method]
        final = f"{s['final_reward_mean']:.3f}"
        norm = f"{s['grad_norm_mean']:.3g}"
        if n_seeds > 1:
            final += f" ± {s['final_reward_std']:.3f}"
            norm += f" ± {s['grad_norm_std']:.2g}"
        diff_r = diff_g = ""
        if "final_reward_minus_gspo" in s:
            diff_r = (f"{s['final_reward_minus_gspo']:+.3f} "
                      f"{_ci(s['final_reward_minus_gspo_ci95'])}")
            diff_g = f"{s['grad_norm_minus_gspo']:+.3g} {_ci(s['grad_norm_minus_gspo_ci95'])}"
        diag = (f"mean τ {s['tau_mean']:.3f}" if "tau_mean" in s else
                f"clipped on 2nd update {s['clip_frac_mean']:.0%}" if "clip_frac_mean" in s
                else "")
        rows.append(f"| {LABELS[method]} | {final} | {diff_r} | "
                    f"{s['reward_all_steps_mean']:.3f} | {norm} | {diff_g} | "
                    f"{s['final_length_mean']:.2f} | {diag} |")
    return "\n".join(rows)


def plot_task(task_curves: dict, config: dict, task_title: str, path: str, smooth: int,
              baseline=None) -> None:
    """Three panels (reward with a moving average, pre-clipping gradient norm, mean completion
    length), one line per method (mean over seeds) and a min..max band over seeds."""
    import matplotlib  # lazy: only the demo needs it (extra "demo")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_seed = task_curves["per_seed"]
    methods = [m for m in COLORS if m in task_curves["mean"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    panels = (("reward", "rollout reward"), ("grad_norm", "gradient norm (before clipping)"),
              ("length", "mean completion length (tokens)"))
    for ax, (key, title) in zip(axes, panels):
        for method in methods:
            seeds = [per_seed[s][method][key] for s in per_seed]
            steps = range(1, len(seeds[0]) + 1)
            mean_curve = task_curves["mean"][method][key]
            ax.plot(steps, mean_curve, color=COLORS[method], alpha=0.2, linewidth=0.8)
            ax.plot(steps, moving_average(mean_curve, smooth), color=COLORS[method],
                    linewidth=2, label=f"{LABELS[method]} (moving avg {smooth})")
            if len(seeds) > 1:
                smoothed = [moving_average(c, smooth) for c in seeds]
                ax.fill_between(steps, [min(v) for v in zip(*smoothed)],
                                [max(v) for v in zip(*smoothed)], color=COLORS[method],
                                alpha=0.12, linewidth=0)
        if key == "reward" and baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1,
                       label="best prompt-independent answer")
        ax.set_title(title)
        ax.set_xlabel("training step (one rollout batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    n = len(per_seed)
    seeds_note = f"mean of {n} seeds, band = min..max" if n > 1 else f"seed {next(iter(per_seed))}"
    prompts = task_curves.get("prompts",
                              f"{config['length']} digits of 0..{config['digits'] - 1}")
    fig.suptitle(f"{task_title}: {prompts}, "
                 f"{config['prompts']} prompts x {config['group_size']} samples, "
                 f"{config['inner_steps']} updates/batch; {seeds_note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
