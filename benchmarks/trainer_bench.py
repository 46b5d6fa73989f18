"""OPOTrainer's default against GRPOTrainer's default: the training step of each trainer on the
same model, micro-batch and optimizer, step time and peak memory.

    python -m benchmarks.trainer_bench                     # GPU: <device>.trainer.json
    python -m benchmarks.trainer_bench --tiny --out DIR    # CPU check (tiny model, interpreter)

Rows (``RUNS``), each with TRL's defaults otherwise (bf16 mixed precision, gradient
checkpointing, the Trainer's default optimizer, loss_type "dapo" for GRPO, temperature 1):

  grpo                   GRPOTrainer: TRL's fused LM head patched into the model (log-probs of
                         the counted positions, no [B, C, V] logits), the GRPO loss
  opo                    OPOTrainer's default (opo_loss_path "auto"; the row says which path
                         it ran: TRL's fused head on-policy, the fused-linear loss off-policy)
  opo_fused_linear       OPOTrainer with the fused-linear loss, its default logits budget (no
                         more logits than TRL's head holds: 256 MiB in bf16)
  opo_fused_linear_1gib  the same with opo_logits_budget = 1 GiB (on-policy: larger chunks,
                         fewer passes over the fp32 [V, H] accumulator, more memory)
  opo_trl_fused_head     OPOTrainer with TRL's fused LM head + opo_loss_from_logprobs
  opo_logits             OPOTrainer on the completion logits (fp32 under mixed precision) +
                         opo_loss: the path that was the default before

each under TRL's default schedule (on-policy: one optimizer step per generation, no old
log-probs) and off-policy (num_iterations=2: the batch carries old log-probs).

One step = the trainer's ``compute_loss`` on the micro-batch (forward, head, loss: the code
``Trainer.training_step`` runs), ``accelerator.backward``, ``optimizer.step()``,
``optimizer.zero_grad(set_to_none=True)``. Generation is not part of it (both trainers
generate the same way); the micro-batch is built directly in each trainer's format: B
sequences of a prompt and a completion of random length (~70 % of the positions counted),
groups of ``--group`` (whole groups per micro-batch, as OPOTrainer requires), random token
ids, random rewards (GRPO: their group-normalized advantages).

  step_ms          CUDA events around the step, the device synchronized before each; median
                   of ``--steps`` steps after ``--warmup`` untimed ones (host clock on CPU:
                   no timing claim)
  peak_mem_bytes   max_memory_allocated during one more step minus what was allocated before
                   it (the model, the optimizer state): gradients, activations, logits, loss
                   buffers; null on CPU
  first_grad_norm  the gradient norm of the first step: the OPO rows compute the same
                   gradient (the same math), so it agrees across them
  vs_grpo          step_ms and peak_mem_bytes over the grpo row of the same schedule

Learning rate 0 keeps the model the same for every step and row (the optimizer runs in full).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.step.bench import Clock  # the step benchmark's timer
from benchmarks.timers import _quantile  # the same quantiles as the other benchmarks

RUNS = ("grpo", "opo", "opo_fused_linear", "opo_fused_linear_1gib", "opo_trl_fused_head",
        "opo_logits")
SCHEDULES = ("on_policy", "off_policy")
# run -> OPOConfig options
_OPO_OPTIONS = {
    "opo": {},
    "opo_fused_linear": {"opo_loss_path": "fused_linear"},
    "opo_fused_linear_1gib": {"opo_loss_path": "fused_linear", "opo_logits_budget": 2**30},
    "opo_trl_fused_head": {"opo_loss_path": "trl_fused_head"},
    "opo_logits": {"opo_loss_path": "logits"},
}


@dataclass
class Settings:
    model: str = "qwen2.5-0.5b"      # benchmarks.step.grid.MODELS
    micro_batch: int = 16            # sequences per micro-batch (whole groups)
    group: int = 8
    seq_len: int = 512
    prompt_len: int = 64
    counted_fraction: float = 0.7
    steps: int = 10
    warmup: int = 3
    runs: tuple = RUNS
    schedules: tuple = SCHEDULES
    tiny: bool = False
    seed: int = 0

    @classmethod
    def tiny_defaults(cls, **kw) -> Settings:
        base = dict(model="tiny", micro_batch=4, group=2, seq_len=12, prompt_len=3, steps=2,
                    warmup=1, tiny=True)
        return cls(**{**base, **kw})

    def check(self) -> Settings:
        from benchmarks.step.grid import MODELS

        if self.model not in MODELS:
            raise ValueError(f"--model: unknown {self.model!r}; known: {sorted(MODELS)}")
        if self.micro_batch % self.group:
            raise ValueError(f"--micro-batch ({self.micro_batch}) must be a multiple of --group "
                             f"({self.group}): OPOTrainer needs whole groups per micro-batch")
        if not 0 < self.prompt_len < self.seq_len:
            raise ValueError(f"--prompt-len must be in (0, --seq-len={self.seq_len})")
        for name, values, known in (("--runs", self.runs, RUNS),
                                    ("--schedules", self.schedules, SCHEDULES)):
            if not values or set(values) - set(known):
                raise ValueError(f"{name}: {list(values)}; known: {list(known)}")
        if self.steps < 1 or self.warmup < 1:
            raise ValueError("--steps and --warmup must be >= 1")
        return self


# ---- the model, the trainer, the micro-batch ---------------------------------------------------


def _tokenizer():
    """A tokenizer built in code (the trainers need one; nothing is generated or decoded)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("abcdefgh")}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="<eos>")


def _reward(completions, **kwargs):
    return [0.0 for _ in completions]


def build_trainer(run: str, schedule: str, s: Settings, out_dir: Path, device: torch.device):
    """(trainer, prepared model, optimizer with its state): the trainer as TRL builds it, the
    model prepared by accelerate as ``Trainer.train`` prepares it (mixed-precision forward)."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.step.grid import MODELS
    from opo_kernels.integrations.trl import OPOConfig, OPOTrainer

    cls_name, kwargs = MODELS[s.model]
    config = getattr(transformers, cls_name)(**kwargs, use_cache=False)
    torch.manual_seed(s.seed)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # as from_pretrained
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    cpu = device.type == "cpu"
    common = dict(
        output_dir=str(out_dir / "trainer_bench_tmp"), per_device_train_batch_size=s.micro_batch,
        num_generations=s.group, max_completion_length=s.seq_len - s.prompt_len,
        learning_rate=0.0, report_to="none", save_strategy="no", use_cpu=cpu, bf16=not cpu,
        num_iterations=2 if schedule == "off_policy" else 1, seed=s.seed, logging_steps=1,
    )
    dataset = Dataset.from_dict({"prompt": ["ab"] * s.group})
    if run == "grpo":
        trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=GRPOConfig(**common),
                              train_dataset=dataset, processing_class=_tokenizer())
    else:
        args = OPOConfig(**common, **_OPO_OPTIONS[run])
        trainer = OPOTrainer(model=model, reward_funcs=_reward, args=args,
                             train_dataset=dataset, processing_class=_tokenizer())
    prepared = trainer.accelerator.prepare_model(trainer.model)
    trainer.model_wrapped = prepared
    trainer.current_gradient_accumulation_steps = 1
    trainer.create_optimizer()
    opt = trainer.optimizer
    for p in prepared.parameters():  # the optimizer state exists before the baseline
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    prepared.train()
    return trainer, prepared, opt


def make_batch(s: Settings, vocab: int, device: torch.device, seed: int) -> Dict[str, object]:
    """One micro-batch in GRPOTrainer's format (OPOTrainer's adds raw rewards and packs it):
    prompt [B, P] and completion [B, C] ids and masks, rewards [B], advantages [B]."""
    from benchmarks.inputs import sequence_lengths

    b, p, c = s.micro_batch, s.prompt_len, s.seq_len - s.prompt_len
    gen = torch.Generator().manual_seed(seed)
    counted = min(round(s.counted_fraction * b * s.seq_len), b * c)
    lengths = torch.tensor(sequence_lengths(counted, b, c, gen))
    completion_mask = (torch.arange(c)[None] < lengths[:, None]).long()
    rewards = torch.randn(b, generator=gen)
    grouped = rewards.view(-1, s.group)
    advantages = ((grouped - grouped.mean(1, keepdim=True))
                  / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)
    batch = {
        "prompt_ids": torch.randint(2, vocab, (b // s.group, 1, p), generator=gen)
        .expand(-1, s.group, -1).reshape(b, p),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(2, vocab, (b, c), generator=gen) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "rewards": rewards,
        "num_items_in_batch": completion_mask.sum().float(),
    }
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def old_logprobs(model, batch) -> torch.Tensor:
    """The model's own per-token log-probs of the completion [B, C] (fp32), one sequence at a
    time, + N(0, 0.05²): small log-ratios, as after one optimizer step."""
    from opo_kernels.reference import chunked_logprobs

    c = batch["completion_ids"].shape[1]
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    rows = [chunked_logprobs(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]
                                   ).logits[:, -c - 1:-1].float(), ids[i:i + 1, -c:])
            for i in range(ids.shape[0])]
    own = torch.cat(rows)
    gen = torch.Generator().manual_seed(1)
    return own + 0.05 * torch.randn(own.shape, generator=gen).to(own.device)


def trainer_inputs(run: str, batch: Dict[str, torch.Tensor], group: int,
                   old: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    from opo_kernels.integrations.trl.batches import pack_groups

    inputs = {k: v for k, v in batch.items() if k != "rewards"}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if run == "grpo":
        return inputs
    del inputs["num_items_in_batch"]
    b = batch["rewards"].shape[0]
    inputs.update(opo_rewards=batch["rewards"],
                  opo_scorable=torch.ones(b, dtype=torch.bool, device=batch["rewards"].device))
    return pack_groups(inputs, b, group)


# ---- the timed steps ---------------------------------------------------------------------------


def _step(trainer, model, opt, inputs, grad_norm: bool = False):
    loss = trainer.compute_loss(model, inputs)
    trainer.accelerator.backward(loss)
    norm = None
    if grad_norm:
        norm = torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(p.grad.float()) for p in model.parameters()
            if p.grad is not None])).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), norm


def _gc(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(run: str, schedule: str, s: Settings, out_dir: Path, device: torch.device,
            clock: Clock, batch_cache: dict) -> Dict[str, object]:
    trainer, model, opt = build_trainer(run, schedule, s, out_dir, device)
    try:
        vocab = trainer.accelerator.unwrap_model(model).config.vocab_size
        if "batch" not in batch_cache:
            batch_cache["batch"] = make_batch(s, vocab, device, s.seed)
        batch = batch_cache["batch"]
        old = None
        if schedule == "off_policy":
            if "old" not in batch_cache:  # the same old log-probs for every row
                batch_cache["old"] = old_logprobs(model, batch)
            old = batch_cache["old"]
        inputs = trainer_inputs(run, batch, s.group, old)
        _gc(device)
        base = torch.cuda.memory_allocated() if device.type == "cuda" else None
        first_loss, first_norm = _step(trainer, model, opt, inputs, grad_norm=True)
        for _ in range(s.warmup - 1):
            _step(trainer, model, opt, inputs)
        times: List[float] = []
        for _ in range(s.steps):
            clock.sync()
            start = clock.mark()
            _step(trainer, model, opt, inputs)
            end = clock.mark()
            clock.sync()
            times.append(clock.ms(start, end))
        peak = None
        if device.type == "cuda":
            _gc(device)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            _step(trainer, model, opt, inputs)
            torch.cuda.synchronize()
            peak = int(torch.cuda.max_memory_allocated() - before)
        times.sort()
        counted = int(batch["completion_mask"].sum())
        return {
            "run": run, "schedule": schedule, "model": s.model,
            "trainer": type(trainer).__name__,
            "loss_path": getattr(trainer, "opo_loss_path", "trl_fused_head"),
            "B": s.micro_batch, "seq_len": s.seq_len, "tokens": s.micro_batch * s.seq_len,
            "counted": counted, "step_ms": statistics.median(times),
            "step_ms_p20": _quantile(times, 0.2), "step_ms_p80": _quantile(times, 0.8),
            "steps": len(times),
            "peak_mem_bytes": peak, "base_mem_bytes": base, "first_loss": float(first_loss),
            "first_grad_norm": first_norm, "timer": clock.name,
        }
    finally:
        del trainer, model, opt
        _gc(device)


def add_ratios(rows: List[Dict[str, object]]) -> None:
    """vs_grpo: each row's step time and peak memory over the grpo row of its schedule."""
    grpo = {r["schedule"]: r for r in rows if r["run"] == "grpo"}
    for row in rows:
        base = grpo.get(row["schedule"])
        if base is None:
            continue
        ratios = {"step_ms": row["step_ms"] / base["step_ms"]}
        if row["peak_mem_bytes"] is not None and base["peak_mem_bytes"]:
            ratios["peak_mem_bytes"] = row["peak_mem_bytes"] / base["peak_mem_bytes"]
        row["vs_grpo"] = ratios


def run(s: Settings, out_dir: Path) -> Dict[str, object]:
    from benchmarks.results import device_name, recorded_commit, slug

    s.check()
    device = torch.device("cuda") if torch.cuda.is_available() and not s.tiny else \
        torch.device("cpu")
    if device.type == "cpu" and not s.tiny:
        raise SystemExit("trainer_bench: the full run needs a CUDA GPU; --tiny runs the CPU "
                         "check")
    import transformers
    import triton
    import trl

    dev = device_name(device, s.tiny)
    path = out_dir / f"{slug(dev)}.trainer.json"
    data: Dict[str, object] = {
        "device": dev, "kind": "trainer_step", "torch": torch.__version__,
        "triton": triton.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "commit": recorded_commit(),
        "python": platform.python_version(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "settings": {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in vars(s).items()},
        "method": __doc__.split("\n\n", 1)[1].strip(), "rows": [], "errors": [],
    }
    clock = Clock(device)
    cache: dict = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for schedule in s.schedules:
        for name in s.runs:
            try:
                data["rows"].append(measure(name, schedule, s, out_dir, device, clock, cache))
            except Exception as exc:  # noqa: BLE001 - recorded (OOM included), the rest runs
                data["errors"].append({"run": name, "schedule": schedule,
                                       "error": f"{type(exc).__name__}: {exc}"[:2000],
                                       "traceback": traceback.format_exc()[-4000:]})
            add_ratios(data["rows"])
            path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            row = data["rows"][-1] if data["rows"] and data["rows"][-1]["run"] == name else None
            if row is not None:
                print(f"{schedule:10s} {name:20s} {row['loss_path']:15s} "
                      f"{row['step_ms']:9.2f} ms  peak {row['peak_mem_bytes']}  "
                      f"vs grpo {row.get('vs_grpo')}", flush=True)
            else:
                print(f"{schedule:10s} {name:20s} ERROR {data['errors'][-1]['error'][:200]}",
                      flush=True)
    data["results_file"] = str(path)
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (a check)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--group", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--runs", default=None, help=f"comma-separated, of {','.join(RUNS)}")
    parser.add_argument("--schedules", default=None,
                        help=f"comma-separated, of {','.join(SCHEDULES)}")
    a = parser.parse_args(argv)
    if a.tiny:  # the package's kernels on CPU: the interpreter, set before triton's import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    given = {k: v for k, v in dict(
        model=a.model, micro_batch=a.micro_batch, group=a.group, seq_len=a.seq_len,
        prompt_len=a.prompt_len, steps=a.steps, warmup=a.warmup,
        runs=tuple(a.runs.split(",")) if a.runs else None,
        schedules=tuple(a.schedules.split(",")) if a.schedules else None).items()
        if v is not None}
    s = Settings.tiny_defaults(**given) if a.tiny else Settings(**given)
    try:
        data = run(s, Path(a.out))
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {data['results_file']}")
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
