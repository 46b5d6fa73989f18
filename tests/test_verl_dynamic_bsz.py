"""verl's dynamic batch sizes (``actor.use_dynamic_bsz=true``) with OPO: the trainer does not
check the fixed micro-batch size, and its patched ``_update_actor`` sends
``force_group_size`` = rollout.n with the update (legacy and v1 trainers), so that verl's
``rearrange_micro_batches`` cuts between whole groups. The real updates with dynamic
micro-batches: test_verl_integration.py (one process) and test_verl_dp.py (two ranks), the
``dynamic-bsz`` cases of their real-update tests."""

from __future__ import annotations

import types

import pytest
import torch

pytestmark = pytest.mark.cpu_only  # CPU-side code (conftest.py)

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

import verl_cases as cases  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.trainer.ppo.ray_trainer import RayPPOTrainer  # noqa: E402

from opo_kernels.integrations.verl import data_parallel  # noqa: E402


@pytest.fixture(scope="module")
def verl_config():
    return cases.compose_verl_config()


def test_dynamic_bsz_layout_needs_no_micro_batch_size(verl_config):
    """With use_dynamic_bsz the micro-batch size is unused (micro-batches are cut by token
    count), so one that is not a multiple of rollout.n is not refused; ranks and mini-batches
    still get whole groups."""
    config = cases.with_overrides(verl_config, actor_rollout_ref__actor__use_dynamic_bsz=True,
                            actor_rollout_ref__actor__ppo_micro_batch_size_per_gpu=4)
    batch = cases.legacy_batch()
    RayPPOTrainer._balance_batch(cases.legacy_trainer(config), batch, metrics={})
    assert cases.whole_groups(list(batch.non_tensor_batch["uid"]), 2, 4 * cases.K, cases.K)


def update_batch(prompts: int = 4) -> DataProto:
    """A batch as the legacy trainer's _update_actor gets it (what it converts to no-padding
    form: ids, masks, positions)."""
    num, prompt_len, resp_len = prompts * cases.K, 3, 4
    attention = torch.ones(num, prompt_len + resp_len, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (num, prompt_len + resp_len), generator=g)
    return DataProto.from_dict(tensors={
        "input_ids": ids, "attention_mask": attention, "position_ids": attention.cumsum(1) - 1,
        "prompts": ids[:, :prompt_len], "responses": ids[:, prompt_len:],
        "response_mask": attention[:, prompt_len:]})


class _UpdateRecorder:
    """A worker group whose update_actor records the force_group_size it is sent."""

    def __init__(self):
        self.sent = []

    def update_actor(self, batch):
        from verl.utils import tensordict_utils as tu

        if hasattr(batch, "extra_info"):  # v1: a KVBatchMeta, its extra_info the metadata
            self.sent.append(batch.extra_info.get("force_group_size"))
        else:
            self.sent.append(tu.get_non_tensor_data(batch, "force_group_size", None))
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": {"mfu": [0.0]}})


@pytest.mark.parametrize("dynamic, estimator, expected", [
    (True, "opo_kernels", cases.K), (False, "opo_kernels", None), (True, "grpo", None)])
def test_legacy_update_sends_the_group_size_with_dynamic_bsz(verl_config, dynamic, estimator,
                                                              expected):
    """verl's own _update_actor of the legacy trainer, patched: with use_dynamic_bsz and OPO,
    the workers' update batch carries force_group_size = rollout.n (verl's
    rearrange_micro_batches then cuts only between groups; the real update:
    test_verl_integration.py::test_real_update_step_gradient_equals_reference); nothing is
    left in the trainer's batch after."""
    config = cases.with_overrides(verl_config, algorithm__adv_estimator=estimator,
                            actor_rollout_ref__actor__use_dynamic_bsz=dynamic)
    workers = _UpdateRecorder()
    trainer = types.SimpleNamespace(config=config, actor_rollout_wg=workers)
    batch = update_batch()
    RayPPOTrainer._update_actor(trainer, batch)
    assert workers.sent == [expected]
    assert "force_group_size" not in batch.meta_info


def test_update_of_an_unknown_batch_type_is_left_alone(verl_config):
    """A batch without the metadata dict of either trainer goes to verl's own method as it is
    (the loss still refuses the split groups it would receive)."""
    config = cases.with_overrides(verl_config, actor_rollout_ref__actor__use_dynamic_bsz=True)
    seen = []
    update = data_parallel._update_with_whole_groups(lambda self, batch: seen.append(batch))
    batch = types.SimpleNamespace(rows=3)
    update(types.SimpleNamespace(config=config), batch)
    assert seen == [batch] and vars(batch) == {"rows": 3}


def test_v1_update_sends_the_group_size_with_dynamic_bsz(verl_config):
    """The same for verl's default (v1) trainer, whose batch metadata is KVBatchMeta.extra_info."""
    pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs transfer_queue")
    from transfer_queue.metadata import KVBatchMeta
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    config = cases.with_overrides(verl_config, actor_rollout_ref__actor__use_dynamic_bsz=True)
    workers = _UpdateRecorder()
    trainer = types.SimpleNamespace(config=config, actor_rollout_wg=workers)
    batch = KVBatchMeta(keys=[f"p{i // cases.K}_{i}_0" for i in range(4 * cases.K)],
                        tags=[{"seq_len": 5}] * (4 * cases.K), partition_id="train")
    PPOTrainer._update_actor(trainer, batch, metrics={})
    assert workers.sent == [cases.K]
    assert "force_group_size" not in batch.extra_info
