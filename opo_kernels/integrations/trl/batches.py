"""Whole prompt groups through TRL's batching: the generation batch is checked and packed
[B, ...] -> [B / K, K, ...] so that TRL's shuffle and micro-batch split move whole groups, and
unpacked again in the loss."""

from __future__ import annotations

from typing import Tuple

import torch


def check_whole_groups(inputs: list, group_size: int) -> None:
    """The local generation batch must be whole groups of identical prompts, in TRL's
    RepeatSampler order (each prompt ``group_size`` times in a row)."""
    num = len(inputs)
    if num % group_size:
        raise ValueError(
            f"OPOTrainer: this process's generation batch has {num} completions, not a whole "
            f"number of groups of {group_size}; make per_device_train_batch_size (and "
            "per_device_eval_batch_size) multiples of num_generations"
        )
    prompts = [x.get("prompt") for x in inputs]
    for start in range(0, num, group_size):
        if any(p != prompts[start] for p in prompts[start + 1:start + group_size]):
            raise ValueError(
                f"OPOTrainer: rows {start}..{start + group_size - 1} of the generation batch are "
                "not one prompt group; OPO relies on TRL's sampler order (num_generations "
                "consecutive copies of each prompt)"
            )


def pack_groups(batch: dict, num_seqs: int, group_size: int) -> dict:
    """[B, ...] tensors -> [B / K, K, ...]: TRL's shuffle and split then move whole groups."""
    packed = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            if value.shape[0] != num_seqs:
                raise NotImplementedError(
                    f"OPOTrainer: batch entry {key!r} has {value.shape[0]} rows, expected one per "
                    f"completion ({num_seqs})"
                )
            value = value.unflatten(0, (num_seqs // group_size, group_size))
        elif isinstance(value, (list, tuple)):
            raise NotImplementedError(f"OPOTrainer: unsupported list-valued batch entry {key!r}")
        packed[key] = value
    return packed


def unpack_groups(batch: dict) -> Tuple[dict, int]:
    """Inverse of ``pack_groups``: (flat batch, group size K); 0-dim entries pass through."""
    group_size = batch["opo_rewards"].shape[-1]
    flat = {key: value.flatten(0, 1) if isinstance(value, torch.Tensor) and value.dim() >= 2
            else value for key, value in batch.items()}
    return flat, group_size


def completion_positions(x: torch.Tensor, num_completion: int) -> torch.Tensor:
    """Rows of x [B, P + C, ...] at the positions that predict the completion (the last C
    tokens): position j predicts token j + 1, so positions [P − 1, P + C − 1). A view."""
    return x[:, -(num_completion + 1):-1]

