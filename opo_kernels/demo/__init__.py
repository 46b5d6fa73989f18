"""End-to-end demo: RL-train a tiny transformer with OPO as the paper writes it (uncentred and
centred weights), OPO as its author trained it, and GSPO, on two verifiable tasks, and compare
them.

    python -m opo_kernels.demo                  # 4 seeds x 250 steps x 2 tasks x 4 methods
    python -m opo_kernels.demo --quick          # 2 seeds x 60 steps (about a minute)
    python -m opo_kernels.demo --device cuda    # fused Triton kernels (backend="auto")

Tasks (``tasks.py``): "sort the digits" with answers of fixed length, and "sort the digits,
then stop" where the policy chooses its answer's length with an EOS token. Methods
(``methods.py``): ``opo_paper`` (eq. 6: the package defaults), ``opo_paper_centered`` (the same
with ``center_weights=True``, as the paper's later versions state the update), ``opo_author``
(``preset="author_verl"``), ``gspo``. Policy (``policy.py``): a 2-layer GPT, random init,
trained from the reward alone; the loop (``training.py``) is the same for every method and seed.

It tests the paper's two claims on toy tasks: (1) OPO's slight reward edge over GSPO, (2) OPO's
higher gradient norms; and whether the paper's uncentred positive weights favour short answers
when lengths vary. Outputs in ``--out`` (default ./opo_demo): ``curves.json`` (per task: the
mean over seeds of every method's per-step reward, gradient norm and completion length, every
seed under ``per_seed``, and the summary), ``curves_<task>.png`` and the printed tables: final
reward mean ± sd over seeds and the paired bootstrap 95 % interval of each OPO − GSPO difference
(``report.py``). On CPU the OPO losses run the PyTorch reference (the Triton interpreter is too
slow for hundreds of steps); on CUDA the fused kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Dict, Optional, Sequence

import torch

from ..utils import interpreter_on
from .methods import METHODS
from .report import format_summary, mean, plot_task, summarize
from .training import QUICK, TASKS, DemoConfig, make_task, train

__all__ = ["DemoConfig", "main", "run_demo"]


def run_demo(cfg: DemoConfig, out_dir: str, progress: bool = True, plot: bool = True) -> dict:
    """Train every method on every task for every seed; write curves.json (+ one figure per
    task); return the curves."""
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    last = min(cfg.last, cfg.steps)
    result: Dict[str, dict] = {"tasks": {}}
    for name in cfg.tasks:
        task = make_task(name, cfg)
        per_seed = {str(seed): {m: train(task, m, cfg, seed, progress) for m in cfg.methods}
                    for seed in cfg.seeds}
        curves = {m: {k: [mean(v) for v in zip(*(per_seed[s][m][k] for s in per_seed))]
                      for k in ("reward", "grad_norm", "length")} for m in cfg.methods}
        result["tasks"][name] = {
            "title": task.title, "prompts": task.prompts_note,
            "constant_baseline": task.constant_baseline(),
            "mean": curves, "per_seed": per_seed,
            "summary": summarize(per_seed, cfg.methods, last, cfg.bootstrap),
        }
    result["config"] = {**asdict(cfg), "torch": torch.__version__,
                        "opo_kernels_backend": _resolved_backend(cfg)}
    result["total_seconds"] = time.perf_counter() - start
    with open(os.path.join(out_dir, "curves.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    if plot:
        try:
            for name, task_result in result["tasks"].items():
                plot_task(task_result, result["config"], task_result["title"],
                          os.path.join(out_dir, f"curves_{name}.png"), cfg.smooth,
                          task_result["constant_baseline"])
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[demo]'): figures skipped",
                  file=sys.stderr)
    return result


def _resolved_backend(cfg: DemoConfig) -> str:
    from ..utils import use_triton

    return "triton" if use_triton(cfg.backend, torch.device(cfg.device)) else "torch"


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m opo_kernels.demo",
                                description="RL on two verifiable tasks: OPO (paper, "
                                            "uncentred and centred), OPO (author's recipe) "
                                            "and GSPO.")
    p.add_argument("--quick", action="store_true",
                   help=f"short run: {QUICK['steps']} steps, seeds {QUICK['seeds']}")
    p.add_argument("--steps", type=int, help=f"training steps per run (default {d.steps})")
    p.add_argument("--seeds", type=int, nargs="+", help=f"seeds (default {d.seeds})")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=d.tasks)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=d.methods)
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
    p.add_argument("--length", type=int, default=d.length, help="digits per prompt (max)")
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--n-layer", type=int, default=d.n_layer)
    p.add_argument("--n-head", type=int, default=d.n_head)
    p.add_argument("--gspo-eps", type=float, nargs=2, default=d.gspo_eps,
                   metavar=("LOW", "HIGH"), help="GSPO clip range (default 3e-4 4e-4)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads (default 1: the ops are tiny)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off anyway when stderr is not a terminal)")
    args = p.parse_args(argv)
    base = dict(QUICK) if args.quick else {}
    if args.steps is not None:
        base["steps"] = args.steps
    if args.seeds is not None:
        base["seeds"] = args.seeds
    cfg = DemoConfig(**base, tasks=list(args.tasks), methods=list(args.methods),
                     alpha=args.alpha, mu=args.mu, device=args.device, backend=args.backend,
                     prompts=args.prompts, inner_steps=args.inner_steps, lr=args.lr,
                     digits=args.digits, length=args.length, d_model=args.d_model,
                     n_layer=args.n_layer, n_head=args.n_head, gspo_eps=list(args.gspo_eps),
                     threads=args.threads)
    if min(cfg.steps, cfg.prompts, cfg.inner_steps, cfg.threads) < 1:
        p.error("--steps, --prompts, --inner-steps and --threads must be >= 1")
    if cfg.length < 2:
        p.error("--length must be >= 2")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if cfg.backend == "triton" and not cfg.device.startswith("cuda") and not interpreter_on():
        p.error("--backend triton runs the fused kernels on a GPU: add --device cuda, or set "
                "TRITON_INTERPRET=1 to run them in Triton's interpreter on the CPU (very slow: "
                "use --quick); on CPU the default backend (auto) uses the PyTorch reference")
    return cfg, args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg, args = parse_args(argv)
    print(f"opo_kernels demo: tasks {cfg.tasks}, methods {cfg.methods}, {cfg.steps} steps, "
          f"seeds {cfg.seeds}, {cfg.prompts} prompts x {cfg.group_size} samples, "
          f"device {cfg.device}, OPO backend {_resolved_backend(cfg)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        # bars only on a terminal: in a log file each redraw is a new line (hundreds of KB)
        result = run_demo(cfg, args.out, progress=not args.no_progress and sys.stderr.isatty())
    finally:
        torch.set_num_threads(threads)
    last = min(cfg.last, cfg.steps)
    for task in result["tasks"].values():
        print()
        print(format_summary(task["title"], task["summary"], cfg.methods, len(cfg.seeds), last))
    print(f"\ntotal {result['total_seconds']:.1f} s; wrote {os.path.join(args.out, 'curves.json')}"
          f" and curves_<task>.png")
    return result
