"""OPOTrainer on CUDA: a few real TRL training steps per loss path on a small random model with
a real-size vocabulary (Qwen2, V = 151936, H = 256, 2 layers, tied embeddings), each checked
against ``opo_kernels.reference`` on the same batches.

    python -m tools.gpu.trl_check --out DIR            # CUDA; DIR/<device>.trl_check.json
    python -m tools.gpu.trl_check --tiny --out DIR     # CPU check (V = 512, interpreter)

Offline: the tokenizer is built in code (one token per character, and one token per remaining
id, named by it, so that any sampled id decodes), the prompts and the reward too; trl and
datasets come from the carried wheels (tools/gpu/fetch_wheels.sh).

Runs (``--paths`` × ``--precisions``), each ``trainer.train()`` for 2 optimizer steps of 2
micro-batches (2 groups of 4 completions each, temperature 0.7), off-policy (num_iterations=2:
the second step reuses the generation, so its log-ratios are not 0):

  fp32  fp32 parameters, no autocast, TF32 off: the trainer's summed micro-batch losses and
        its accumulated gradient of steps 0 and 1 against autograd through the reference
        loss on the full fp32 logits of a snapshot of the model, same batches (recorded as
        the loss saw them): |Δloss| <= 1e-4·(1 + |loss|), and per parameter p
        ||Δgrad_p|| <= 1e-3·max(||grad_p||, 1e-4·||grad||)
  bf16  bf16 parameters and TRL's bf16 mixed precision (its default): the same comparison,
        the reference on the logits of the same bf16 forward: |Δloss| <= 2e-2·(1 + |loss|),
        ||Δgrad_p|| <= 3e-2·max(||grad_p||, 1e-2·||grad||)

plus, per run, that the gradient is not zero and the parameters moved. ``--paths auto`` runs
the default, which resolves to "fused_linear" on this off-policy schedule (the run records
the path it ran). Exit status 0 when every run passed; the results file is rewritten after
each run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List

import torch

PATHS = ("fused_linear", "trl_fused_head", "logits", "auto")
DEFAULT_PATHS = PATHS[:3]  # "auto" resolves to one of these (fused_linear here: off-policy)
PRECISIONS = ("fp32", "bf16")
# (loss, gradient), relative; a parameter's gradient error is relative to the larger of its
# own norm and FLOOR × the whole gradient's norm (a parameter with a tiny gradient, e.g. a bias
# of a layer near the input, gets cancellation, not a wrong update)
TOLERANCES = {"fp32": (1e-4, 1e-3), "bf16": (2e-2, 3e-2)}
FLOOR = {"fp32": 1e-4, "bf16": 1e-2}
GROUP, MICRO, ACCUM, TEMPERATURE = 4, 8, 2, 0.7
CHARS = "abcdefghijklmnopqrstuvwxyz "
PROMPTS = ["ab", "cde", "f", "ghij", "klm", "no", "pqr", "st"]


def tokenizer(vocab_size: int):
    """One token per character, then one per remaining id ("<17>"), so that every id the
    model samples decodes."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    vocab.update({f"<{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="<eos>")


def model(vocab_size: int, hidden: int, dtype: torch.dtype, device: torch.device):
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.Qwen2ForCausalLM(config).to(dtype)


def digit_reward(completions, **kwargs):
    """Varies within a group whatever the model samples: the digits of the decoded ids."""
    return [(sum(int(c) for c in text if c.isdigit()) % 11) / 10 for text in completions]


def trainer_classes():
    from transformers import TrainerCallback

    from opo_kernels.integrations.trl import OPOTrainer

    class Recording(OPOTrainer):
        """Records (global step, batch, loss) of every training loss call."""

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            if self.model.training:
                batch = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                         for k, v in inputs.items()}
                self.recorded.append((self.state.global_step, batch, loss.detach().float()))
            return loss

    class Capture(TrainerCallback):
        """Parameters at the start and accumulated gradients at the end of each step."""

        def __init__(self):
            self.params, self.grads = {}, {}

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.params[state.global_step] = copy.deepcopy(model.state_dict())

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads[state.global_step] = {n: p.grad.detach().float().clone()
                                             for n, p in model.named_parameters()}

    return Recording, Capture


def reference_step(snapshot, recorded, step: int, bf16: bool, loss_options: dict):
    """(Σ reference loss / ACCUM, {name: ∂/∂param}) of step ``step``'s micro-batches, on the
    full logits of the snapshot model (its forward under bf16 autocast when ``bf16``)."""
    from opo_kernels import reference

    batches = [b for s, b, _ in recorded if s == step]
    if len(batches) != ACCUM:
        raise AssertionError(f"step {step}: {len(batches)} recorded micro-batches, expected "
                             f"{ACCUM}")
    device = next(snapshot.parameters()).device
    total = torch.zeros((), device=device)
    for packed in batches:
        batch = {k: v.flatten(0, 1) if isinstance(v, torch.Tensor) and v.dim() >= 2 else v
                 for k, v in packed.items()}
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = snapshot(input_ids=ids, attention_mask=attention).logits
        c = batch["completion_ids"].shape[1]
        mask = batch["completion_mask"].bool() & batch["opo_scorable"][:, None]
        loss = reference.opo_loss(
            logits[:, -c - 1:-1].float(), batch["completion_ids"],
            batch.get("old_per_token_logps"), batch["opo_rewards"], mask=mask,
            group_size=GROUP, temperature=TEMPERATURE, **loss_options)
        total = total + loss / ACCUM
    names = [n for n, _ in snapshot.named_parameters()]
    grads = torch.autograd.grad(total, [p for _, p in snapshot.named_parameters()])
    return total.detach(), {n: g.float() for n, g in zip(names, grads)}


def run_one(path: str, precision: str, s: argparse.Namespace, device: torch.device,
            out_dir: Path) -> Dict[str, object]:
    from datasets import Dataset

    from opo_kernels.integrations.trl import OPOConfig

    Recording, Capture = trainer_classes()
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    tok = tokenizer(s.vocab)
    policy = model(s.vocab, s.hidden, dtype, device)
    initial = {n: p.detach().clone() for n, p in policy.named_parameters()}
    args = OPOConfig(
        output_dir=str(out_dir / "trl_check_tmp"), per_device_train_batch_size=MICRO,
        num_generations=GROUP, gradient_accumulation_steps=ACCUM, num_iterations=2,
        max_completion_length=s.completion, max_steps=2, temperature=TEMPERATURE,
        learning_rate=1e-3, max_grad_norm=0.0, logging_steps=1, seed=0, report_to="none",
        save_strategy="no", use_cpu=device.type == "cpu", bf16=bf16, opo_loss_path=path,
    )
    capture = Capture()
    trainer = Recording(model=policy, reward_funcs=digit_reward, args=args,
                        processing_class=tok, train_dataset=Dataset.from_dict(
                            {"prompt": PROMPTS * 2}), callbacks=[capture])
    trainer.recorded = []
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    row: Dict[str, object] = {"path": path, "resolved_path": trainer.opo_loss_path,
                              "precision": precision, "train_s": round(train_s, 2),
                              "steps": trainer.state.global_step, "checks": {}}
    moved = any(not torch.equal(p.detach(), initial[n]) for n, p in policy.named_parameters())
    failures: List[str] = []
    if not moved:
        failures.append("the parameters did not move")
    loss_tol, grad_tol = TOLERANCES[precision]
    for step in (0, 1):
        snapshot = model(s.vocab, s.hidden, dtype, device)
        snapshot.load_state_dict(capture.params[step])
        ref_loss, ref_grads = reference_step(snapshot, trainer.recorded, step, bf16, {})
        loss = sum(value for st, _, value in trainer.recorded if st == step)
        grads = capture.grads[step]
        total_norm = math.sqrt(sum(float(g.norm()) ** 2 for g in ref_grads.values()))
        floor = FLOOR[precision] * total_norm
        worst = max(float((g - ref_grads[n]).norm()) / max(float(ref_grads[n].norm()), floor,
                                                            1e-30)
                    for n, g in grads.items())
        check = {"loss": float(loss), "reference_loss": float(ref_loss),
                 "grad_norm": total_norm, "worst_relative_grad_error": worst,
                 "off_policy_batch": "old_per_token_logps" in trainer.recorded[0][1]}
        row["checks"][f"step{step}"] = check
        if not abs(float(loss) - float(ref_loss)) <= loss_tol * (1 + abs(float(ref_loss))):
            failures.append(f"step {step}: loss {float(loss):.6g} vs reference "
                            f"{float(ref_loss):.6g}")
        if not worst <= grad_tol:
            failures.append(f"step {step}: gradient off by {worst:.3g} (relative, worst "
                            f"parameter) > {grad_tol}")
        if not total_norm > 0:
            failures.append(f"step {step}: zero reference gradient (a vacuous check)")
    row["passed"] = not failures
    row["failures"] = failures
    del trainer, policy
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="V = 512, H = 32 on CPU (a check)")
    parser.add_argument("--out", default=".")
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    a = parser.parse_args(argv)
    paths = a.paths.split(",")
    precisions = a.precisions.split(",")
    for name, values, known in (("--paths", paths, PATHS), ("--precisions", precisions,
                                                            PRECISIONS)):
        if not values or set(values) - set(known):
            parser.error(f"{name}: {values}; known: {list(known)}")
    if a.tiny:  # the package's kernels on CPU: the interpreter, set before triton's import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cuda = torch.cuda.is_available() and not a.tiny
    if not cuda and not a.tiny:
        parser.error("needs CUDA; --tiny runs the CPU check")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 check compares fp32 matmuls
        torch.backends.cudnn.allow_tf32 = False
    s = argparse.Namespace(vocab=512 if a.tiny else 151936, hidden=32 if a.tiny else 256,
                           completion=6 if a.tiny else 24)
    import transformers
    import trl

    name = torch.cuda.get_device_name(device) if cuda else "cpu-tiny"
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_file = out_dir / f"{name.lower().replace(' ', '-')}.trl_check.json"
    from benchmarks.results import recorded_commit
    data = {"device": name, "torch": torch.__version__, "trl": trl.__version__,
            "transformers": transformers.__version__,
            "commit": recorded_commit(),
            "vocab": s.vocab, "hidden": s.hidden,
            "method": __doc__.split("\n\n", 1)[1].strip(), "runs": []}
    for precision in precisions:
        for path in paths:
            try:
                row = run_one(path, precision, s, device, out_dir)
            except Exception as exc:  # noqa: BLE001 - recorded, the other runs go on
                row = {"path": path, "precision": precision, "passed": False,
                       "failures": [f"{type(exc).__name__}: {exc}"[:2000]],
                       "traceback": traceback.format_exc()[-4000:]}
            data["runs"].append(row)
            result_file.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            status = "ok" if row["passed"] else "FAILED: " + "; ".join(row["failures"])
            print(f"{precision} {path:15s} -> {row.get('resolved_path', '?'):15s} "
                  f"{row.get('train_s', '-')} s  {status}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
    print(f"wrote {result_file}")
    return 0 if all(r["passed"] for r in data["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
