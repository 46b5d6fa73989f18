"""Shared pieces of the verl data-parallel tests (test_verl_dp.py, test_verl_dynamic_bsz.py):
verl's own composed trainer config, batches as the legacy trainer holds them, a stand-in
trainer, and the whole-groups check. Imported only where verl is installed."""

from __future__ import annotations

import os
import types

import numpy as np
import torch
from verl.protocol import DataProto

K = 3  # rollout.n


def whole_groups(uids, dp_size, mini_rows, micro_rows, padding=None):
    """True when every rank's every micro-batch (cut as verl cuts a rank's slice: mini-batches
    of mini_rows/dp_size rows, micro-batches of micro_rows) holds whole groups."""
    padding = padding or [False] * len(uids)
    size = {u: sum(1 for v, p in zip(uids, padding) if v == u and not p) for u in uids}
    for start in range(0, len(uids), micro_rows):  # micro_rows divides a rank's mini-batch
        rows = [(uids[i], padding[i]) for i in range(start, start + micro_rows)]
        counts = {}
        for u, p in rows:
            if not p:
                counts[u] = counts.get(u, 0) + 1
        if any(counts[u] != size[u] for u in counts):
            return False
    return True




def micro_batches_of_whole_groups(micro_batches) -> bool:
    """True when each micro-batch (row indices, in any order) is whole groups: runs of K
    adjacent rows, each starting at a multiple of K (the rollout's groups of K adjacent
    responses)."""
    for rows in micro_batches:
        rows = sorted(rows)
        runs = [rows[i:i + K] for i in range(0, len(rows), K)]
        if not all(run == list(range(run[0], run[0] + K)) and run[0] % K == 0 for run in runs):
            return False
    return True


def compose_verl_config():
    """verl's own ppo_trainer.yaml with OPO at 2 data-parallel ranks' worth of batch sizes."""
    import verl
    from hydra import compose, initialize_config_dir
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=[
            "algorithm.adv_estimator=opo_kernels", f"actor_rollout_ref.rollout.n={K}",
            "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={2 * K}",
            "actor_rollout_ref.actor.use_kl_loss=false", "algorithm.use_kl_in_reward=false",
            "trainer.balance_batch=true"])


def with_overrides(config, **paths):
    from omegaconf import OmegaConf
    config = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    for path, value in paths.items():
        OmegaConf.update(config, path.replace("__", "."), value)
    return config


def legacy_batch(prompts: int = 8, seed: int = 0) -> DataProto:
    """The legacy trainer's batch at _balance_batch: K adjacent responses per prompt (uid),
    attention masks of random lengths, rewards and a response mask for the estimator."""
    g = torch.Generator().manual_seed(seed)
    num, width = prompts * K, 12
    lengths = torch.randint(1, width + 1, (num,), generator=g)
    attention = (torch.arange(width)[None] < lengths[:, None]).long()
    response_mask = attention[:, 4:].clone()
    token_rewards = torch.rand(num, width - 4, generator=g) * response_mask
    return DataProto.from_dict(
        tensors={"attention_mask": attention, "response_mask": response_mask,
                 "token_level_rewards": token_rewards},
        non_tensors={"uid": np.repeat([f"p{i}" for i in range(prompts)], K).astype(object)})


def legacy_trainer(config, dp_size=2):
    return types.SimpleNamespace(config=config, actor_rollout_wg=None,
                                 _get_dp_size=lambda worker_group, role: dp_size)
