"""OPO with Hugging Face TRL: ``OPOTrainer`` is ``trl.GRPOTrainer`` with the OPO loss.

Self-contained and offline: a tiny randomly initialized Qwen2 (2 layers), a character-level
tokenizer built in code, prompts built in code and a rule-based reward (vowels are good, length
costs a little). It shows the wiring, not a useful model; swap in your own model, tokenizer,
dataset and reward functions. Needs ``pip install -e .[trl]``.

    python examples/trl_opo.py --max-steps 10

The OPO options are the ``opo_*`` fields of OPOConfig (GRPOConfig owns ``temperature``,
``beta``, ``entropy_coef``...). Every micro-batch must hold whole prompt groups:
per_device_train_batch_size must be a multiple of num_generations. Metrics are logged as
``opo/omega_mean``, ``opo/tau``, ``opo/v_mean``, ``opo/kl_k3``, ``opo/entropy_mean``, ...
With TRL's default schedule the run is on-policy (π_ref = the sampling policy = the current
one), so v = 0 and the logged loss is 0 while its gradient is not. The loss path
(``opo_loss_path``, printed first) is chosen for you: TRL's fused LM head on this on-policy
schedule, the fused-linear loss when TRL keeps old log-probs (``num_iterations > 1``).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from opo_kernels.integrations.trl import OPOConfig, OPOTrainer

CHARS = "abcdefghijklmnopqrstuvwxyz "


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_model(vocab_size: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


def vowel_reward(completions, **kwargs):
    """TRL reward function: one float per completion (None = unscorable)."""
    return [sum(c in "aeiou" for c in text) - 0.1 * len(text) for text in completions]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = tiny_model(len(tokenizer))
    words = ["hello", "sky", "tree", "rhythm", "moon", "glyph", "quiet", "brr"]
    dataset = Dataset.from_dict({"prompt": [f"say {w} " for w in words]})

    config = OPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="trl_opo_"),
        # TRL batching: 2 prompt groups of 6 completions per micro-batch, 2 micro-batches per step
        num_generations=6, per_device_train_batch_size=12, gradient_accumulation_steps=2,
        max_completion_length=12, temperature=1.0, learning_rate=3e-3, max_steps=args.max_steps,
        # OPO (paper: α = 0.6, μ = 1, adaptive τ in [0.2, 1.5]); "sequence" is the paper's literal
        # level (the package default "sequence_mean" favours short completions when the weights
        # are not centered, see examples/minimal_loop.py)
        opo_alpha=0.6, opo_mu=1.0, opo_level="sequence",
        # CPU, no logging backend, no checkpoints
        use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
    )
    trainer = OPOTrainer(model=model, reward_funcs=vowel_reward, args=config,
                         train_dataset=dataset, processing_class=tokenizer)
    print(f"loss path: {trainer.opo_loss_path}")
    trainer.train()
    for log in trainer.state.log_history:
        if "loss" in log:
            print(f"step {log['step']:3d}  reward {log['reward']:+.3f}  loss {log['loss']:+.4f}  "
                  f"tau {log['opo/tau']:.3f}  omega_mean {log['opo/omega_mean']:.3f}  "
                  f"entropy {log['opo/entropy_mean']:.3f}")
    return trainer


if __name__ == "__main__":
    main()
