"""One real verl actor update at two data-parallel ranks on CPU (gloo), checked against the
single-process reference of the whole mini-batch. Run by tests/test_verl_dp.py, one process per
rank: `python verl_dp_step.py WORKDIR OUT.json` with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set.

What each rank does is what verl's legacy trainer and its workers do with
``algorithm.adv_estimator=opo_kernels`` and ``trainer.balance_batch=True``:
1. the trainer's ``_balance_batch`` (``RayPPOTrainer._balance_batch`` as opo_kernels replaces it,
   on a stand-in trainer holding verl's composed config) reorders the rollout batch so that each
   rank's slice holds whole prompt groups, balanced by workload; every rank computes the same
   order (it is deterministic) instead of receiving it from a driver;
2. ``compute_advantage`` with the ``opo_kernels`` estimator on the whole reordered batch;
3. rank r takes the r-th contiguous slice (verl's dispatch), and
   ``TrainingWorker.train_mini_batch`` runs the FSDP2 update over both ranks (two micro-batches
   of two groups each per rank, gradients averaged over the ranks, one SGD step).
Rank 0 then computes Σ_mb rows/global · OPO(mb) by autograd through opo_kernels.reference over
the same four micro-batches in one process and compares the step with its gradient.
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import verl_engine_step as step  # first: it installs the CPU platform and hides trl

# isort: split
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage

import opo_kernels.integrations.verl as ov

K = step.K
PROMPTS = 8          # one mini-batch of 8 prompts x K = 24 responses over 2 ranks
MICRO = 2 * K        # rows per micro-batch on one rank: 2 groups, so tau spans 2 groups
TIMEOUT_S = 60       # gloo: a rank whose peer died fails after this instead of waiting forever


def trainer_config(dp_prompts: int = PROMPTS, micro: int = MICRO, dynamic: bool = False):
    """The parts of verl's trainer config that ``_balance_batch`` reads."""
    return OmegaConf.create({
        "algorithm": {"adv_estimator": ov.ESTIMATOR},
        "actor_rollout_ref": {
            "rollout": {"n": K},
            "actor": {"ppo_mini_batch_size": dp_prompts, "ppo_micro_batch_size_per_gpu": micro,
                      "rollout_n": K, "use_dynamic_bsz": dynamic, "shuffle": False,
                      "use_kl_loss": False, "entropy_coeff": 0.0,
                      "loss_agg_mode": "token-mean"}}})


def main(workdir: str, out_path: str, max_tokens=None):
    """max_tokens: actor.use_dynamic_bsz with that token budget per micro-batch (verl's cut,
    agreed over the ranks; else fixed micro-batches of MICRO rows)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=TIMEOUT_S))
    model_dir = os.path.join(workdir, "model")
    if rank == 0:
        step.save_model(model_dir)
    torch.distributed.barrier()
    actor = step.build_actor(model_dir, micro=MICRO, mini_prompts=PROMPTS, max_tokens=max_tokens)

    data = step.make_rollout_data(seed=3, prompts=PROMPTS)
    trainer = SimpleNamespace(config=trainer_config(dynamic=max_tokens is not None),
                              actor_rollout_wg=None,
                              _get_dp_size=lambda worker_group, role: world)
    balance_metrics = {}
    RayPPOTrainer._balance_batch(trainer, data, metrics=balance_metrics)
    data = compute_advantage(data, adv_estimator=ov.ESTIMATOR)
    num = len(data)
    local = data.chunk(world)[rank]
    per_rank = num // world
    if max_tokens is None:
        micro_batches = [list(range(start, start + MICRO)) for start in range(0, num, MICRO)]
    else:  # this rank's cut, as the engine makes it (a collective), over all ranks' rows
        mine = [[rank * per_rank + i for i in rows] for rows in step.dynamic_micro_batches(
            local, max_tokens, num, torch.distributed.group.WORLD)]
        every = [None] * world
        torch.distributed.all_gather_object(every, mine)
        micro_batches = [rows for part in every for rows in part]

    before = step.full_params(actor)
    metrics = step.run_update(actor, local, num, None if max_tokens is None else K)
    after = step.full_params(actor)

    if rank == 0:
        model, loss = step.reference_loss(model_dir, data, micro_batches)
        errors = step.step_errors(model, before, after)
        uid = list(data.non_tensor_batch["uid"])
        Path(out_path).write_text(json.dumps({
            "loss_engine": float(sum(metrics["loss"])),  # all-reduced over the ranks
            "loss_reference": loss.item(), "errors": errors,
            "worst_rel_error": max(errors.values()),
            "rank_uids": [uid[r * per_rank:(r + 1) * per_rank] for r in range(world)],
            "micro_batches": micro_batches,
            "balance_metrics": sorted(balance_metrics),
            "tau": [float(t) for t in metrics["actor/opo_tau"]]}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
