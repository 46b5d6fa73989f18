"""OPOTrainer (TRL GRPOTrainer + the OPO loss) end to end on CPU: a tiny random Qwen2, a local
character tokenizer, prompts built in code and a rule-based reward. No hub download.

Each run trains 3 optimizer steps of 2 micro-batches (6 completions = 2 groups of 3 each) and
checks the gradient of one optimizer step against autograd through ``opo_kernels.reference``
computed from the recorded batch: rewards recomputed from the decoded completions, groups read
from the prompt ids, logits from a full forward of a snapshot of the model. Under
TRITON_INTERPRET=1 (conftest) the trainer's loss runs the Triton kernels, so this also checks
the kernels through a real model. Shapes are tiny because the interpreter is slow. The cases
run the three loss paths (``opo_loss_path``: by default TRL's fused head on-policy and the
fused-linear loss off-policy, and the logits); 2 processes (DDP) run the logits and TRL's head
and show that TRL never splits a group across processes.
"""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from opo_kernels import reference  # noqa: E402
from opo_kernels.integrations.trl import OPOConfig, OPOTrainer  # noqa: E402
from opo_kernels.integrations.trl.batches import check_whole_groups  # noqa: E402
from opo_kernels.integrations.trl.paths import trl_fused_head_available  # noqa: E402

# TRL >= 1.16 patches its fused LM head into the model; older TRL (in the range setup.py
# allows) has none: "auto" then runs the fused-linear loss, and the cases that name
# opo_loss_path="trl_fused_head" are skipped
TRL_HEAD = trl_fused_head_available()

CHARS = "abcdefghijklmnopqrstuvwxyz "
GROUP = 3           # num_generations
MICRO = 2 * GROUP   # per_device_train_batch_size: two whole groups per micro-batch
ACCUM = 2           # gradient_accumulation_steps
TEMPERATURE = 0.7   # TRL's sampling temperature, which the loss must divide the logits by
PROMPTS = ["ab", "cde", "f", "ghij", "klm", "no"]  # unequal lengths: left padding is exercised


def make_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="<eos>")


def make_model(vocab_size: int, seed: int = 0, tied: bool = False):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=tied,
    )
    return transformers.Qwen2ForCausalLM(config)


def vowel_reward(completions, **kwargs):
    """Rule-based: +1 per vowel, −0.1 per character (varies within groups)."""
    return [sum(c in "aeiou" for c in text) - 0.1 * len(text) for text in completions]


class RecordingOPOTrainer(OPOTrainer):
    """Records (global step, batch) of every loss call."""

    def _compute_loss(self, model, inputs):
        if self.model.training:
            batch = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                     for k, v in inputs.items()}
            self.recorded.append((self.state.global_step, batch))
        return super()._compute_loss(model, inputs)


class StepCapture(TrainerCallback):
    """Parameters at the start and accumulated gradients at the end of optimizer step `step`."""

    def __init__(self, step: int):
        self.step, self.params, self.grads = step, None, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.params = copy.deepcopy(model.state_dict())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def train(tmp_path, check_step: int, max_steps: int = 3, prompts=None, **options):
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    initial = copy.deepcopy(model)
    args = OPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=MICRO, num_generations=GROUP,
        gradient_accumulation_steps=ACCUM, max_completion_length=6, max_steps=max_steps,
        temperature=TEMPERATURE, learning_rate=1e-2, max_grad_norm=0.0, logging_steps=1,
        seed=0, report_to="none", use_cpu=True, bf16=False, save_strategy="no", **options,
    )
    capture = StepCapture(check_step)
    trainer = RecordingOPOTrainer(
        model=model, reward_funcs=vowel_reward, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": prompts or PROMPTS * 4}), callbacks=[capture],
    )
    trainer.recorded = []
    trainer.train()
    return trainer, tokenizer, initial, capture


def reference_grads(trainer, tokenizer, capture, loss_options):
    """∂/∂θ of Σ_microbatches reference.opo_loss / ACCUM at the captured step."""
    model = make_model(len(tokenizer))
    model.load_state_dict(capture.params)
    total = 0.0
    batches = [b for step, b in trainer.recorded if step == capture.step]
    assert len(batches) == ACCUM
    for batch in batches:
        flat = {k: v.flatten(0, 1) if v.dim() >= 2 else v for k, v in batch.items()}
        prompt_ids, prompt_mask = flat["prompt_ids"], flat["prompt_mask"]
        completion_ids, completion_mask = flat["completion_ids"], flat["completion_mask"]
        assert completion_ids.shape[0] == MICRO

        # groups: GROUP consecutive rows with one prompt
        for g in range(0, MICRO, GROUP):
            for r in range(g + 1, g + GROUP):
                assert torch.equal(prompt_ids[r], prompt_ids[g])
                assert torch.equal(prompt_mask[r], prompt_mask[g])
        # raw rewards: the rule applied to the decoded completions
        texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                 for ids, m in zip(completion_ids, completion_mask)]
        rewards = torch.tensor(vowel_reward(texts), dtype=torch.float32)
        torch.testing.assert_close(flat["opo_rewards"], rewards)

        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        logits = model(input_ids=input_ids, attention_mask=torch.cat([prompt_mask,
                       completion_mask], 1)).logits[:, prompt_ids.shape[1] - 1:-1]
        options = dict(loss_options)
        if options.get("weights") == "grpo_advantages":
            options["weights"] = flat["advantages"].float()
        loss = reference.opo_loss(
            logits, completion_ids, flat.get("old_per_token_logps"), rewards,
            mask=completion_mask.bool(), group_size=GROUP, temperature=TEMPERATURE, **options,
        )
        total = total + loss / ACCUM
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(total, [p for _, p in model.named_parameters()])
    return dict(zip(names, grads)), batches


# on_policy: TRL's default schedule, π_ref = detached current policy, defaults of the loss and
#   of the trainer (opo_loss_path "auto": TRL's fused LM head on an on-policy schedule).
# off_policy: num_iterations=2 reuses each generation for a second optimizer step, so TRL keeps
#   old_per_token_logps and step 1 has log-ratios ≠ 0; with the other loss options ("auto":
#   the fused-linear loss on an off-policy schedule).
# grpo_advantages: ω = TRL's (group-normalized) advantages, OPO optimization geometry; through
#   the materialized completion logits (opo_loss).
# author_verl: the author's recipe, off-policy so that its clamps and Z-loss see log-ratios ≠ 0;
#   through TRL's fused LM head + opo_loss_from_logprobs.
CASES = {
    "on_policy": (0, {}, {}),
    "off_policy": (1, {"num_iterations": 2}, {
        "alpha": 0.5, "weights": "escort", "level": "token", "coordinates": "log",
        "entropy_coef": 0.01, "mu": 0.5, "adaptive_tau": False, "tau": 0.8}),
    "grpo_advantages": (0, {"opo_loss_path": "logits"},
                        {"weights": "grpo_advantages", "level": "sequence"}),
    "author_verl": (1, {"num_iterations": 2, "opo_loss_path": "trl_fused_head"},
                    {"preset": "author_verl"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opo_trainer_end_to_end(tmp_path, case):
    check_step, trl_options, loss_options = CASES[case]
    if trl_options.get("opo_loss_path") == "trl_fused_head" and not TRL_HEAD:
        pytest.skip("this TRL has no fused LM head (TRL >= 1.16)")
    trainer, tokenizer, initial, capture = train(
        tmp_path, check_step, **trl_options,
        **{f"opo_{k}": v for k, v in loss_options.items()},
    )
    on_policy = trl_options.get("num_iterations", 1) == 1
    auto = "trl_fused_head" if on_policy and TRL_HEAD else "fused_linear"
    assert trainer.opo_loss_path == trl_options.get("opo_loss_path", auto)
    # training ran and moved the parameters
    assert trainer.state.global_step == 3
    changed = [not torch.equal(p, q) for p, q in zip(trainer.model.parameters(),
                                                     initial.parameters())]
    assert any(changed)
    # finite loss and the opo/ metrics in every logging step
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 3
    expected = {"opo/omega_mean", "opo/omega_max", "opo/tau", "opo/v_mean", "opo/log_ratio_mean",
                "opo/kl_k3", "opo/entropy_mean", "opo/penalty"}
    for h in steps:
        assert math.isfinite(h["loss"])
        assert expected <= set(h), sorted(set(h))
        assert all(math.isfinite(h[k]) for k in expected)
    if "tau" in loss_options:
        assert all(h["opo/tau"] == pytest.approx(loss_options["tau"]) for h in steps)

    # the trainer's accumulated gradient equals the reference's on the same batches
    ref_grads, batches = reference_grads(trainer, tokenizer, capture, loss_options)
    off_policy = trl_options.get("num_iterations", 1) > 1
    assert ("old_per_token_logps" in batches[0]) == off_policy
    if off_policy:  # the second pass over a generation is really off-policy
        assert any(h["opo/kl_k3"] > 0 for h in steps[1:])
    assert capture.grads is not None
    for name, grad in capture.grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=2e-4, atol=2e-6, msg=name)
    assert sum(g.abs().sum() for g in ref_grads.values()) > 0


# One optimizer step at 2 processes draws 2 × ACCUM × MICRO / GROUP = 8 prompts: all distinct,
# so that a prompt names its group.
DISTINCT_PROMPTS = PROMPTS + ["pq", "rstu"]


def test_two_processes(tmp_path):
    """DDP over 2 CPU processes (gloo, torchrun --standalone), through the logits and TRL's
    fused head (where TRL has it): each process's raw rewards are its own slice of the
    gathered batch, its groups are whole, and the all-reduced gradient is the mean of the
    per-process references. TRL splits the generation batch across the processes, never a
    group: every group's completions are consecutive rows of one micro-batch of one
    process."""
    results = check_two_processes(__file__, tmp_path)
    for label, (rank0, rank1) in results.items():
        prompts = [[tuple(batch) for batch in rank["groups"]] for rank in (rank0, rank1)]
        # each process: ACCUM micro-batches of MICRO / GROUP whole groups
        for rank_prompts in prompts:
            assert len(rank_prompts) == ACCUM
            assert all(len(batch) == MICRO // GROUP for batch in rank_prompts)
        per_rank = [{p for batch in rank_prompts for p in batch} for rank_prompts in prompts]
        # the processes got different groups: each prompt's GROUP completions on one of them
        assert not per_rank[0] & per_rank[1], label
        assert per_rank[0] | per_rank[1] == set(DISTINCT_PROMPTS), label


def check_two_processes(script: str, tmp_path) -> dict:
    """Runs `script` (whose __main__ calls its _ddp_worker) on 2 CPU processes with torchrun;
    each rank saves, per run label, its captured and reference gradients: DDP must have synced
    the captured ones, and they must equal the mean of the two ranks' references. Returns
    {label: (rank 0's results, rank 1's)}."""
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", script, str(tmp_path)], check=True, env=env,
                   timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for label in ranks[0]:
        results = [rank[label] for rank in ranks]
        for name, grad in results[0]["captured"].items():
            torch.testing.assert_close(results[1]["captured"][name], grad)  # DDP synced them
            expected = (results[0]["reference"][name] + results[1]["reference"][name]) / 2
            torch.testing.assert_close(grad, expected, rtol=2e-4, atol=2e-6,
                                       msg=f"{label}: {name}")
    return {label: (ranks[0][label], ranks[1][label]) for label in ranks[0]}


def group_prompts(trainer, tokenizer) -> list:
    """Per recorded micro-batch, the prompt of each group (its GROUP rows must share it)."""
    batches = []
    for _, batch in trainer.recorded:
        ids, mask = batch["prompt_ids"], batch["prompt_mask"]  # packed [groups, GROUP, P]
        texts = [[tokenizer.decode(i[m.bool()]) for i, m in zip(ids[g], mask[g])]
                 for g in range(ids.shape[0])]
        assert all(len(set(group)) == 1 for group in texts), texts
        batches.append([group[0] for group in texts])
    return batches


def _ddp_worker(out_dir: str):
    """Runs in each torchrun process (see test_two_processes)."""
    results = {}
    for path in ("logits", "trl_fused_head") if TRL_HEAD else ("logits",):
        trainer, tokenizer, _, capture = train(Path(out_dir), check_step=0, max_steps=1,
                                               prompts=DISTINCT_PROMPTS, opo_loss_path=path)
        assert trainer.accelerator.num_processes == 2 and trainer.opo_loss_path == path
        reference, _ = reference_grads(trainer, tokenizer, capture, {})  # rewards and groups
        results[path] = {"captured": capture.grads, "reference": reference,
                         "groups": group_prompts(trainer, tokenizer)}
    torch.save(results, Path(out_dir) / f"rank{trainer.accelerator.process_index}.pt")


def test_split_group_refused():
    """What a group split across processes would look like to the process that holds part of
    it: refused before generation (TRL's sampler order with per_device_train_batch_size a
    multiple of num_generations never produces it)."""
    rows = lambda *prompts: [{"prompt": p} for p in prompts]  # noqa: E731
    check_whole_groups(rows("a", "a", "a", "b", "b", "b"), GROUP)
    with pytest.raises(ValueError, match="not a whole number of groups of 3"):
        check_whole_groups(rows("a", "a", "a", "b"), GROUP)
    with pytest.raises(ValueError, match="rows 0..2 of the generation batch are not one prompt"):
        check_whole_groups(rows("a", "a", "b", "b", "b", "b"), GROUP)


def test_unscorable_completions_and_eval(tmp_path):
    """A completion that every reward function scores None gets an empty mask (not NaN); the
    evaluation loop runs the same loss and logs eval_opo/ metrics."""

    def picky_reward(completions, **kwargs):
        return [None if i % GROUP == 0 else r
                for i, r in enumerate(vowel_reward(completions))]

    tokenizer = make_tokenizer()
    args = OPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=MICRO, num_generations=GROUP,
        max_completion_length=4, max_steps=1, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", logging_steps=1, eval_strategy="steps", eval_steps=1,
        per_device_eval_batch_size=MICRO,
    )
    trainer = RecordingOPOTrainer(
        model=make_model(len(tokenizer)), reward_funcs=picky_reward, args=args,
        processing_class=tokenizer, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}),
    )
    trainer.recorded = []
    trainer.train()
    (_, batch), = trainer.recorded  # training batches only
    assert batch["opo_scorable"].flatten().tolist() == [False, True, True] * 2
    assert torch.isfinite(batch["opo_rewards"]).all()
    train_log = next(h for h in trainer.state.log_history if "loss" in h)
    assert math.isfinite(train_log["loss"])
    eval_log = next(h for h in trainer.state.log_history if "eval_loss" in h)
    assert math.isfinite(eval_log["eval_loss"]) and math.isfinite(eval_log["eval_opo/omega_mean"])


@pytest.mark.parametrize("options, match", [
    ({"per_device_train_batch_size": 3, "num_generations": 2, "gradient_accumulation_steps": 2},
     "multiple of num_generations"),
    # TRL's own check (generation_batch_size 8 not divisible by 6) would speak first
    ({"per_device_train_batch_size": 8, "num_generations": 6},
     "must be a multiple of num_generations"),
    ({"beta": 0.04}, "beta"),
    ({"entropy_coef": 0.01}, "opo_entropy_coef"),
    ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
    ({"opo_alpha": 1.5}, "alpha"),
    ({"opo_weights": "uniform"}, "opo_weights"),
    ({"opo_tau_range": [1.0, 0.5]}, "tau_range"),
    ({"opo_preset": "verl"}, "preset"),
    ({"opo_delta_clip": -1.0}, "delta_clip"),
    ({"opo_scale_rewards": "batch"}, "scale_rewards"),
], ids=["partial-groups", "partial-groups-before-trl", "beta", "entropy_coef", "top-entropy",
        "alpha", "weights", "tau_range", "preset", "delta_clip", "scale_rewards"])
def test_config_refuses(tmp_path, options, match):
    missing = set(options) - set(OPOConfig.__dataclass_fields__)
    if missing:
        pytest.skip(f"this TRL version has no {sorted(missing)}")
    base = {"per_device_train_batch_size": 6, "num_generations": 3}
    with pytest.raises(ValueError, match=match):
        OPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                  **{**base, **options})


def test_config_presets(tmp_path):
    """opo_* options left at None take the preset's value; explicit ones override it."""
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                per_device_train_batch_size=6, num_generations=3)
    paper = OPOConfig(**base).opo_loss_config()
    assert (paper.weights, paper.coordinates, paper.delta_clip) == ("seed", "ratio", None)
    author = OPOConfig(**base, opo_preset="author_verl", opo_alpha=0.5,
                       opo_score_clip=float("inf")).opo_loss_config()
    assert (author.weights, author.coordinates, author.delta_clip) == ("escort", "log", 5.0)
    assert author.direction_scale == 2.0 and author.score_clip is None


def test_config_token_level_under_preset_names_the_working_fix(tmp_path):
    """author_verl clamps δ_s, which the token level refuses; in OPOConfig None means "the
    preset's value", so the message must advise inf (the value that turns the clamp off), and
    following it must work."""
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                per_device_train_batch_size=6, num_generations=3, opo_preset="author_verl",
                opo_level="token")
    with pytest.raises(ValueError, match=r"opo_delta_clip=float\('inf'\)") as err:
        OPOConfig(**base)
    assert "delta_clip=None" not in str(err.value).replace("None here", "")
    with pytest.raises(ValueError, match="delta_clip"):  # None: still the preset's clamp
        OPOConfig(**base, opo_delta_clip=None)
    cfg = OPOConfig(**base, opo_delta_clip=float("inf")).opo_loss_config()
    assert cfg.level == "token" and cfg.delta_clip is None


def test_trainer_needs_opo_config(tmp_path):
    tokenizer = make_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                      use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="OPOConfig"):
        OPOTrainer(model=make_model(len(tokenizer)), reward_funcs=vowel_reward, args=args,
                   processing_class=tokenizer, train_dataset=Dataset.from_dict({"prompt": ["a"]}))


def test_core_package_does_not_import_trl():
    code = "import sys, opo_kernels; assert 'trl' not in sys.modules, 'opo_kernels imported trl'"
    subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])


def test_logged_metrics_leave_out_calls_that_count_no_token():
    """A call whose mask counts no token (every completion truncated and masked) reports the
    defaults (τ at its start, ω = v = 0): left out of the mean over the processes' calls; a
    step where no call counts a token logs no opo/* value. (accelerator.gather of one process.)"""
    import collections
    import types

    stub = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(gather=lambda t: t),
        _metrics={"train": collections.defaultdict(list)})
    metrics = {"tau": torch.tensor(0.75), "omega_max": torch.tensor(0.0)}
    OPOTrainer._opo_log_metrics(stub, "train", metrics, torch.zeros(2, 3, dtype=torch.bool))
    assert not stub._metrics["train"]
    metrics = {"tau": torch.tensor(0.4), "omega_max": torch.tensor(2.5)}
    OPOTrainer._opo_log_metrics(stub, "train", metrics, torch.ones(2, 3, dtype=torch.bool))
    assert dict(stub._metrics["train"]) == {"opo/tau": [pytest.approx(0.4)],
                                            "opo/omega_max": [2.5]}
