"""OPO in verl at more than one data-parallel rank (opo_kernels.integrations.verl.data_parallel).

* ``plan_rank_layout``: every rank's mini-batches and micro-batches hold whole prompt groups,
  each mini-batch keeps its prompts, the ranks get equal rows and balanced work, padding rows
  go last; and the layouts that cannot exist are refused naming the config key to change.
* verl's two trainers as this package patches them, on verl's own composed config: the legacy
  ``RayPPOTrainer._balance_batch`` (``trainer.balance_batch=True``) and the v1
  ``PPOTrainer._balance_batch`` (verl's default trainer; needs transfer_queue, which the v1
  trainer itself imports). With another estimator, verl's own partition runs, and it splits
  groups: the loss refuses such a micro-batch.
* One real verl actor update at two ranks (``verl_dp_step.py``, gloo on CPU, one process per
  rank, each with a timeout so that a rank that fails never leaves the other waiting): the SGD
  step equals the gradient of the single-process reference over the same micro-batches, with
  fixed micro-batches and with verl's dynamic ones (the trainer side of those:
  test_verl_dynamic_bsz.py). Shared pieces: verl_cases.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks import free_port

pytestmark = pytest.mark.cpu_only  # CPU-side code (conftest.py)

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage  # noqa: E402
from verl_cases import (  # noqa: E402
    K,
    compose_verl_config,
    legacy_batch,
    legacy_trainer,
    micro_batches_of_whole_groups,
    whole_groups,
    with_overrides,
)

import opo_kernels.integrations.verl as ov  # noqa: E402
from opo_kernels.integrations.verl import data_parallel  # noqa: E402

DP_STEP = Path(__file__).with_name("verl_dp_step.py")


def interleaved(prompts: int, seed: int):
    """uids of prompts × K responses in a random order (v1's batches come in completion order)
    and a random sequence length per response."""
    g = np.random.default_rng(seed)
    uids = [f"u{i // K}" for i in range(prompts * K)]
    order = g.permutation(len(uids))
    return [uids[i] for i in order], g.integers(1, 4000, len(uids)).tolist()


# -------------------------------------------------------------------- plan_rank_layout


@pytest.mark.parametrize("prompts, dp_size, mini_prompts, micro_rows", [
    (8, 2, 8, 2 * K), (16, 4, 8, K), (12, 2, 4, 2 * K), (6, 3, 6, 2 * K), (4, 1, 2, K),
], ids=lambda v: str(v))
def test_layout_keeps_groups_whole_and_mini_batches_intact(prompts, dp_size, mini_prompts,
                                                           micro_rows):
    uids, lengths = interleaved(prompts, seed=prompts + dp_size)
    mini_rows = mini_prompts * K
    layout = ov.plan_rank_layout(uids, lengths, dp_size=dp_size, mini_batch_rows=mini_rows,
                                 micro_batch_rows=micro_rows)
    order = [row for rows in layout for row in rows]
    assert sorted(order) == list(range(len(uids)))                  # a permutation
    assert {len(rows) for rows in layout} == {len(uids) // dp_size}  # equal slices
    assert whole_groups([uids[i] for i in order], dp_size, mini_rows, micro_rows)
    # mini-batch i over all ranks = the i-th mini_prompts prompts in order of first appearance
    first = list(dict.fromkeys(uids))
    rank_rows = mini_rows // dp_size
    for i in range(len(uids) // mini_rows):
        got = {uids[row] for rows in layout for row in rows[i * rank_rows:(i + 1) * rank_rows]}
        assert got == set(first[i * mini_prompts:(i + 1) * mini_prompts])
        # balance: the ranks' loads differ by at most the heaviest group's load (verl's own
        # Karmarkar-Karp over groups)
        loads = [sum(lengths[r] for r in rows[i * rank_rows:(i + 1) * rank_rows])
                 for rows in layout]
        heaviest = max(sum(lengths[r] for r in range(len(uids)) if uids[r] == u) for u in got)
        assert max(loads) - min(loads) <= heaviest


def test_layout_balances_by_verls_partitioner():
    """A full mini-batch is split by verl's Karmarkar-Karp on group workloads, exactly."""
    from verl.utils.seqlen_balancing import get_seqlen_balanced_partitions
    uids = [f"u{i // K}" for i in range(8 * K)]
    lengths = [(7 * i) % 23 + 1 for i in range(8 * K)]
    layout = ov.plan_rank_layout(uids, lengths, dp_size=2, mini_batch_rows=8 * K)
    group_loads = [sum(lengths[g * K:(g + 1) * K]) for g in range(8)]
    expected = get_seqlen_balanced_partitions(group_loads, k_partitions=2, equal_size=True)
    assert layout == [[g * K + j for g in part for j in range(K)] for part in expected]


def test_layout_puts_padding_rows_last_in_a_ranks_mini_batch():
    """The v1 trainer pads a batch to a multiple of the mini-batch: 5 prompts (15 rows) + 9
    padding rows = 2 mini-batches of 12 over 2 ranks. Groups stay whole, padding fills the end."""
    uids, lengths = interleaved(5, seed=1)
    uids += ["pad"] * 9
    lengths += [2] * 9
    padding = [False] * 15 + [True] * 9
    layout = ov.plan_rank_layout(uids, lengths, dp_size=2, mini_batch_rows=12,
                                 micro_batch_rows=K, padding=padding)
    order = [row for rows in layout for row in rows]
    assert sorted(order) == list(range(24)) and [len(r) for r in layout] == [12, 12]
    assert whole_groups([uids[i] for i in order], 2, 12, K, [padding[i] for i in order])
    for rows in layout:
        for mini in (rows[:6], rows[6:]):
            flags = [padding[r] for r in mini]
            assert flags == sorted(flags)  # real rows, then padding
    # the first mini-batch is full (4 prompts), the second has 1 prompt and 9 padding rows
    assert sum(padding[r] for rows in layout for r in rows[:6]) == 0


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(1, 24), size=st.integers(1, 4), dp_size=st.integers(1, 4),
       per_rank=st.integers(1, 3), micro_groups=st.integers(1, 3), seed=st.integers(0, 99))
def test_layout_properties(groups, size, dp_size, per_rank, micro_groups, seed):
    """Any batch of equal groups, padded like the v1 trainer pads it (to a multiple of the
    mini-batch): a permutation, equal slices, whole groups in every micro-batch."""
    mini_rows = dp_size * per_rank * size
    micro_rows = micro_groups * size
    if per_rank % micro_groups:
        micro_rows = size  # verl needs micro-batches to divide a rank's mini-batch
    g = np.random.default_rng(seed)
    uids = [f"u{i // size}" for i in g.permutation(groups * size)]
    pad = -len(uids) % mini_rows
    uids += ["pad"] * pad
    padding = [False] * (len(uids) - pad) + [True] * pad
    lengths = g.integers(1, 100, len(uids)).tolist()
    layout = ov.plan_rank_layout(uids, lengths, dp_size=dp_size, mini_batch_rows=mini_rows,
                                 micro_batch_rows=micro_rows, padding=padding)
    order = [row for rows in layout for row in rows]
    assert sorted(order) == list(range(len(uids)))
    assert {len(rows) for rows in layout} == {len(uids) // dp_size}
    assert whole_groups([uids[i] for i in order], dp_size, mini_rows, micro_rows,
                        [padding[i] for i in order])


@pytest.mark.parametrize("uids, kwargs, match", [
    (["a", "a", "a", "b", "b", "c", "c", "c"], {"mini_batch_rows": 8},
     r"different sizes \(\[2, 3\] responses\).*same rollout.n"),
    (["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3, {"mini_batch_rows": 9, "dp_size": 3},
     r"not a whole number of mini-batches of 9.*data.train_batch_size"),
    (["a"] * 3 + ["b"] * 3 + ["c"] * 3, {"mini_batch_rows": 9, "dp_size": 2},
     r"each of the 2 data-parallel ranks 4.5 responses.*ppo_mini_batch_size to a multiple of 2"),
    (["a"] * 3 + ["b"] * 3, {"mini_batch_rows": 6, "micro_batch_rows": 2},
     r"ppo_micro_batch_size_per_gpu=2 is not a multiple of the group size 3"),
    (["a"] * 3, {"mini_batch_rows": 3, "dp_size": 0}, r"dp_size must be a positive int"),
], ids=["unequal-groups", "partial-mini-batch", "mini-not-multiple-of-dp", "micro",
        "dp-size"])
def test_layout_refusals_name_the_key(uids, kwargs, match):
    kwargs.setdefault("dp_size", 2)
    with pytest.raises(ValueError, match=match):
        ov.plan_rank_layout(uids, [1] * len(uids), **kwargs)


def test_layout_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match=r"uids \(3\), workloads \(2\)"):
        ov.plan_rank_layout(["a"] * 3, [1, 1], dp_size=1, mini_batch_rows=3)


# ------------------------------------------------------- verl's trainers, as patched


@pytest.fixture(scope="module")
def verl_config():
    return compose_verl_config()


def test_trainer_modules_are_patched_when_verl_imports_them():
    for method in (RayPPOTrainer._balance_batch, RayPPOTrainer._update_actor):
        assert method.__opo_kernels_original__ is not None
        assert "opo_kernels" in method.__doc__


def test_legacy_balance_batch_keeps_groups_whole(verl_config):
    batch = legacy_batch()
    metrics = {}
    RayPPOTrainer._balance_batch(legacy_trainer(verl_config), batch, metrics=metrics)
    uids = list(batch.non_tensor_batch["uid"])
    assert whole_groups(uids, 2, 4 * K, 2 * K)
    assert uids != sorted(uids)  # the balancing did move groups between ranks
    assert "global_seqlen/balanced_max" in metrics  # verl's own balance metrics
    # it is the plan, applied: the same rows in the same order
    seqlen = legacy_batch().batch["attention_mask"].sum(-1)
    from verl.utils.seqlen_balancing import calculate_workload
    layout = ov.plan_rank_layout(list(legacy_batch().non_tensor_batch["uid"]),
                                 calculate_workload(seqlen).tolist(), dp_size=2,
                                 mini_batch_rows=4 * K, micro_batch_rows=2 * K)
    assert torch.equal(batch.batch["attention_mask"],
                       legacy_batch().batch["attention_mask"][[r for p in layout for r in p]])


def test_verls_own_partition_splits_groups_and_the_loss_refuses(verl_config):
    """Why the patch: verl's balancing by sequence length (here, for another estimator) leaves
    a rank's micro-batch with part of a group, and OPO's loss refuses that micro-batch."""
    batch = legacy_batch()
    RayPPOTrainer._balance_batch(
        legacy_trainer(with_overrides(verl_config, algorithm__adv_estimator="grpo")), batch,
        metrics={})
    uids = list(batch.non_tensor_batch["uid"])
    assert not whole_groups(uids, 2, 4 * K, 2 * K)
    data = compute_advantage(batch, adv_estimator=ov.ESTIMATOR)
    from verl.workers.config import FSDPActorConfig
    config = FSDPActorConfig(strategy="fsdp", rollout_n=K, ppo_mini_batch_size=4,
                             ppo_micro_batch_size_per_gpu=2 * K,
                             policy_loss=ov.OPOPolicyLossConfig(opo={"vocab_size": 50}))
    config.global_batch_info.update(dp_size=2, global_batch_size=4 * K)
    errors = 0
    for start in range(0, len(uids), 2 * K):  # every micro-batch of both ranks
        rows = slice(start, start + 2 * K)
        mask = data.batch["response_mask"][rows].bool()
        try:
            ov.compute_policy_loss_opo_kernels(
                old_log_prob=torch.zeros(mask.shape), log_prob=-torch.rand(mask.shape),
                advantages=data.batch["advantages"][rows], response_mask=mask, config=config)
        except ValueError as err:
            assert "non-empty responses in this micro-batch" in str(err)
            errors += 1
    assert errors > 0


@pytest.mark.parametrize("paths, match", [
    ({"actor_rollout_ref__actor__ppo_mini_batch_size": 3}, r"ppo_mini_batch_size to a multiple "
                                                          r"of 2 \(the data-parallel size\)"),
    ({"actor_rollout_ref__actor__shuffle": True}, "actor.shuffle=False"),
    ({"actor_rollout_ref__actor__ppo_micro_batch_size_per_gpu": 4}, "not a multiple of rollout.n"),
], ids=["mini-batch", "shuffle", "micro-batch"])
def test_trainer_refuses_before_dispatch(verl_config, paths, match):
    """A configuration that cannot keep groups whole stops in the trainer's process, before
    any worker sees a batch (so no rank waits in a collective for one that failed)."""
    batch = legacy_batch(prompts=6)
    with pytest.raises(ValueError, match=match):
        RayPPOTrainer._balance_batch(legacy_trainer(with_overrides(verl_config, **paths)), batch,
                                     metrics={})


START_REFUSALS = [
    ({"actor_rollout_ref__actor__ppo_mini_batch_size": 3, "data__train_batch_size": 6},
     r"ppo_mini_batch_size to a multiple of 2 \(the data-parallel size\)"),
    ({"actor_rollout_ref__actor__shuffle": True}, "actor.shuffle=False"),
    ({"actor_rollout_ref__actor__ppo_micro_batch_size_per_gpu": 4}, "not a multiple of rollout.n"),
    ({"data__train_batch_size": 6}, r"not a whole number of mini-batches.*data.train_batch_size"),
    ({"algorithm__use_kl_in_reward": True}, "algorithm.use_kl_in_reward=false"),
]
START_IDS = ["mini-batch", "shuffle", "micro-batch", "partial-mini-batch", "kl-in-reward"]


def _legacy_start(trainer):
    """The legacy trainer's patched init_workers around a start-up that does nothing (verl's
    own starts Ray worker groups)."""
    start = data_parallel._checked_at_start(data_parallel._legacy_dp_size,
                                            data_parallel._legacy_batch)(lambda self: "up")
    return start(trainer)


def test_start_up_methods_are_patched():
    method = RayPPOTrainer.init_workers
    assert method.__opo_kernels_original__ is not None and "opo_kernels" in method.__doc__


@pytest.mark.parametrize("paths, match", START_REFUSALS, ids=START_IDS)
def test_legacy_trainer_refuses_at_start(verl_config, paths, match):
    """A configuration that cannot keep groups whole stops as soon as the workers are up (the
    data-parallel size known), before the first rollout: the error the first balanced batch
    would raise, naming the key."""
    with pytest.raises(ValueError, match=match):
        _legacy_start(legacy_trainer(with_overrides(verl_config, **paths)))


def test_start_accepts_what_the_balance_accepts(verl_config):
    assert _legacy_start(legacy_trainer(verl_config)) == "up"
    # another estimator: nothing is checked (verl's own trainer, unchanged)
    assert _legacy_start(legacy_trainer(with_overrides(
        verl_config, algorithm__adv_estimator="grpo", actor_rollout_ref__actor__shuffle=True))) \
        == "up"
    # legacy trainer without balancing: only what the loss itself refuses (a partial last
    # mini-batch is verl's, as before), the rest still at start
    unbalanced = with_overrides(verl_config, trainer__balance_batch=False)
    assert _legacy_start(legacy_trainer(with_overrides(unbalanced, data__train_batch_size=6))) \
        == "up"
    with pytest.raises(ValueError, match="actor.shuffle=False"):
        _legacy_start(legacy_trainer(with_overrides(unbalanced,
                                                    actor_rollout_ref__actor__shuffle=True)))


@pytest.mark.parametrize("paths, match", START_REFUSALS, ids=START_IDS)
def test_v1_trainer_refuses_at_start(verl_config, paths, match):
    """verl's default trainer: its own init (set-up, then on_init_end) as patched, on a
    stand-in whose set-up starts nothing."""
    pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs transfer_queue")
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    assert PPOTrainer.init.__opo_kernels_original__ is not None
    steps = []
    trainer = _v1_trainer(with_overrides(verl_config, **paths), PPOTrainer)
    trainer._setup = lambda: steps.append("setup")
    trainer.on_init_end = lambda: steps.append("init_end")
    with pytest.raises(ValueError, match=match):
        PPOTrainer.init(trainer)
    assert steps == ["setup", "init_end"]  # verl's own start-up ran first
    trainer.config = verl_config
    PPOTrainer.init(trainer)


def test_v1_start_plans_each_sample_of_a_step(verl_config):
    """With parameter_sync_step > 1 the v1 trainer balances train_batch_size /
    parameter_sync_step prompts at a time: the start check plans a batch of that size."""
    pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs transfer_queue")
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    trainer = _v1_trainer(with_overrides(verl_config, data__train_batch_size=16), PPOTrainer)
    trainer._setup = trainer.on_init_end = lambda: None
    trainer.parameter_sync_step = 4  # 4 prompts per sample: one mini-batch of 4
    PPOTrainer.init(trainer)
    trainer.parameter_sync_step = 8  # 2 prompts per sample: half a mini-batch
    with pytest.raises(ValueError, match=r"not a whole number of mini-batches .* make "
                                         r"data.train_batch_size / parameter_sync_step \(8\)"):
        PPOTrainer.init(trainer)


def _v1_trainer(verl_config, trainer_class):
    """A stand-in for verl's v1 PPOTrainer at 2 data-parallel ranks: what its _balance_batch
    reads, and verl's own _get_required_batch_multiple."""
    trainer = types.SimpleNamespace(config=verl_config, use_critic=False, global_steps=1,
                                    tokenizer=types.SimpleNamespace(eos_token_id=1),
                                    actor_rollout_wg=types.SimpleNamespace(
                                        _dispatch_info={"actor": [0, 1]}))
    trainer._get_required_batch_multiple = types.MethodType(
        trainer_class._get_required_batch_multiple, trainer)
    return trainer


def test_v1_balance_batch_refuses_a_partial_mini_batch(verl_config):
    """verl's v1 trainer would pad a batch that is not a whole number of mini-batches; the
    padding rows would count in the loss's scale (the last mini-batch's step then depends on
    the micro-batch size): refused before the padding, naming the key."""
    pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs transfer_queue")
    from transfer_queue.metadata import KVBatchMeta
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    uids, lengths = interleaved(7, seed=5)  # 7 groups: not a whole number of 4-group batches
    keys = [f"{u}_{i}_0" for i, u in enumerate(uids)]
    batch = KVBatchMeta(keys=keys, tags=[{"seq_len": n} for n in lengths], partition_id="train")
    trainer = _v1_trainer(verl_config, PPOTrainer)
    with pytest.raises(ValueError, match=r"not a whole number of mini-batches.*"
                                         r"data.train_batch_size"):
        PPOTrainer._balance_batch(trainer, batch, metrics={})


def test_v1_balance_batch_keeps_groups_whole(verl_config):
    """verl's default trainer: its batch is a KVBatchMeta of keys {uid}_{session}_{index} in
    completion order; the patched method gives every rank whole groups, the plan's layout."""
    pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs transfer_queue")
    from transfer_queue.metadata import KVBatchMeta
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.seqlen_balancing import calculate_workload

    uids, lengths = interleaved(8, seed=5)
    keys = [f"{u}_{i}_0" for i, u in enumerate(uids)]
    batch = KVBatchMeta(keys=keys, tags=[{"seq_len": n} for n in lengths], partition_id="train")
    trainer = _v1_trainer(verl_config, PPOTrainer)
    metrics = {}
    out = PPOTrainer._balance_batch(trainer, batch, metrics=metrics)
    got = [key.rsplit("_", 2)[0] for key in out.keys]
    assert whole_groups(got, 2, 4 * K, 2 * K)
    layout = ov.plan_rank_layout(uids, calculate_workload(torch.tensor(lengths)).tolist(),
                                 dp_size=2, mini_batch_rows=4 * K, micro_batch_rows=2 * K)
    assert out.keys == [keys[r] for rows in layout for r in rows]
    assert "global_seqlen/balanced_max" in metrics


def test_unknown_trainer_method_is_left_alone(caplog):
    """A verl whose _balance_batch has another signature is not patched (a warning says so);
    the loss still refuses the split groups it would receive."""
    class Trainer:
        def _balance_batch(self, batch):
            return "verl's own"

    module = types.ModuleType("verl.trainer.ppo.ray_trainer")
    module.RayPPOTrainer = Trainer
    with caplog.at_level(logging.WARNING, logger=data_parallel.__name__):
        assert data_parallel.patch_trainer_module(module) is False
    assert Trainer._balance_batch(None, None) == "verl's own"
    assert "is not the method this version knows" in caplog.text


def test_loss_refuses_a_rank_share_of_partial_groups():
    """With the legacy trainer's balance_batch=False nothing reorders the batch: each rank's
    slice of a mini-batch must still be whole groups. Every rank sees the same config, so every
    rank refuses alike, at its first micro-batch."""
    from verl.workers.config import FSDPActorConfig
    config = FSDPActorConfig(strategy="fsdp", rollout_n=K, ppo_mini_batch_size=3,
                             ppo_micro_batch_size_per_gpu=K,
                             policy_loss=ov.OPOPolicyLossConfig(opo={"vocab_size": 50}))
    config.global_batch_info.update(dp_size=2, global_batch_size=3 * K)
    data = compute_advantage(legacy_batch(prompts=1), adv_estimator=ov.ESTIMATOR)
    mask = data.batch["response_mask"].bool()
    with pytest.raises(ValueError, match=r"actor.ppo_mini_batch_size to a multiple of 2"):
        ov.compute_policy_loss_opo_kernels(
            old_log_prob=torch.zeros(mask.shape), log_prob=-torch.rand(mask.shape),
            advantages=data.batch["advantages"], response_mask=mask, config=config)


# ------------------------------------------------- one real actor update at two ranks


def run_ranks(script: Path, workdir: Path, world: int = 2, timeout: float = 300.0, args=()):
    """Start one process per rank; if one fails, stop the others at once (they would wait in a
    collective until gloo's timeout); return (return codes, logs)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    logs = [workdir / f"rank{r}.log" for r in range(world)]
    command = [sys.executable, str(script), str(workdir), str(workdir / "out.json"), *args]
    procs = []
    try:
        for r in range(world):
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen(
                    command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=log,
                    stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [p.returncode for p in procs], [log.read_text()[-4000:] for log in logs]


@pytest.mark.parametrize("max_tokens", [None, 30], ids=["fixed-micro", "dynamic-bsz"])
def test_real_update_at_two_ranks_equals_single_process_reference(tmp_path, max_tokens):
    """verl's actor update at 2 data-parallel ranks (legacy trainer's balancing as patched,
    FSDP2 over gloo, 2 micro-batches of 2 groups per rank, one SGD step): the step's gradient
    equals the gradient of Σ_mb rows/global · OPO(mb) over the same 4 micro-batches computed in
    one process by autograd through opo_kernels.reference. dynamic-bsz: use_dynamic_bsz with 30
    tokens per micro-batch (a group holds up to 27) and the force_group_size the patched
    _update_actor adds: verl's cut of each rank's share, the same number of micro-batches on
    both ranks, each of whole groups."""
    codes, logs = run_ranks(DP_STEP, tmp_path, args=() if max_tokens is None else
                            (str(max_tokens),))
    assert codes == [0, 0], "\n\n".join(f"rank {r} (exit {c}):\n{log}"
                                        for r, (c, log) in enumerate(zip(codes, logs)))
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["loss_engine"] == pytest.approx(result["loss_reference"], rel=1e-6)
    # fp32: one SGD step at lr = 1000 rounds (θ_before − θ_after)/lr to ~1e-7 of the gradient
    # (measured: at most ~1e-6 of a tensor's max|grad|, as at one rank)
    assert result["worst_rel_error"] < 2e-5, result["errors"]
    # the balancing moved groups: rank 0 is not simply the first half of the prompts
    rank0 = set(result["rank_uids"][0])
    assert rank0 != {f"p{i}" for i in range(4)}
    assert all(math.isfinite(t) for t in result["tau"])
    micro = result["micro_batches"]
    assert micro_batches_of_whole_groups(micro), micro
    if max_tokens is not None:  # the token budget cut micro-batches of unequal sizes
        assert len({len(rows) for rows in micro}) > 1, micro
