"""Whole prompt groups on every data-parallel rank, with verl's own trainers.

Why whole groups
----------------
OPO's weight ω_s of a response is a statistic of its prompt group: Q from the group's rewards,
p̃ from every member's detached δ_s (its mean log-ratio at the current parameters), τ from all
the sequences of the call (docs/spec.md). Each sequence's gradient flows only through its own
v_s, but its weight needs every member's r and δ. verl hands the loss one micro-batch of one
data-parallel rank at a time, so the members must either sit in that micro-batch or be fetched.

Two ways, and the one taken
---------------------------
1. Exchange per-sequence statistics inside the loss: an all-gather over the data-parallel group
   of (r_s, δ_s, ℓ_s, ℓref_s, n_s, group) per micro-batch, ~24 bytes per sequence. Small, but
   it needs every member of a group in the micro-batch with the SAME index on its rank and in
   the same mini-batch (δ_s must be taken at the same parameters), the same number of
   micro-batches on every rank, one collective and one host sync per micro-batch, and it turns τ
   into a statistic of the ranks' micro-batches together. verl's balancers place responses by
   length alone: members of one group land on different ranks at different positions, hence in
   different micro-batches and often in different mini-batches, i.e. different optimizer steps,
   where no exchange can give the statistics (that would take a second forward pass of the whole
   mini-batch). So an exchange needs a group-aware partition anyway.
2. Keep each group on one rank, inside one micro-batch: partition whole groups, balanced by
   their token workload. The loss then needs no statistic from any other rank (its one
   collective only agrees errors: policy_loss.py), and the update is exactly what one process
   computes for the same micro-batches. The costs: balancing works in units of a group
   (rollout.n responses) instead of one response, a mini-batch must split into whole groups per rank
   (actor.ppo_mini_batch_size a multiple of the data-parallel size), and a micro-batch must
   hold whole groups (actor.ppo_micro_batch_size_per_gpu a multiple of rollout.n, or, with
   actor.use_dynamic_bsz, micro-batches cut by token count between groups only).

This module does 2. The only case it cannot serve, a group too large for one GPU's
micro-batch, would need 1 on top of a group-aware partition; it is refused (the micro-batch
check above; with actor.use_dynamic_bsz, verl's own "A forced group exceeds max_token_len",
agreed over the ranks).

How
---
Importing the package replaces ``_balance_batch`` of verl's two trainers as soon as verl
imports them: ``PPOTrainer`` of the v1 trainer (verl's default, ``trainer.use_v1=True``; it
balances every batch) and the legacy ``RayPPOTrainer`` (``trainer.use_v1=False``; it balances
when ``trainer.balance_batch=True``, its default). The replacement acts only when
``algorithm.adv_estimator=opo_kernels``; for any other estimator verl's own method runs. It
checks the actor config (``check_actor_config``) and the layout in the trainer's process when
it balances a batch, so a configuration that cannot work stops the run there with one error
instead of on one rank while the others wait in a collective. The checks that need no batch
(the batch sizes, the actor settings) run earlier, as soon as the trainer has started its
workers and knows the data-parallel size (``check_at_start``, after the legacy trainer's
``init_workers`` and the v1 trainer's ``init``): before the first rollout, which on a real
model can take minutes.

The layout (``plan_rank_layout``): groups in the order they first appear fill the mini-batches
(``actor.ppo_mini_batch_size`` prompts each); inside each mini-batch, verl's Karmarkar-Karp
partitioner spreads the groups over the ranks by their summed workload, the same number of
groups per rank; each rank's share of a mini-batch is its groups back to back, then the
padding rows that the v1 trainer appends to make the batch divisible (they count no token).
verl sends rank r the r-th contiguous slice and cuts it into mini-batches and micro-batches of
fixed row counts, all multiples of rollout.n, so every cut falls between two groups.

With ``actor.use_dynamic_bsz=True`` verl cuts a rank's mini-batch into micro-batches by token
count (``rearrange_micro_batches``), which would split groups. ``_update_actor`` of both
trainers is patched too: it adds ``force_group_size`` = rollout.n to the update's batch
metadata, and verl's partitioner then moves runs of rollout.n rows, i.e. whole groups (or
padding rows, whose count in a rank's share is a multiple of rollout.n), balanced by their
summed workload under the token budget ``actor.ppo_max_token_len_per_gpu``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
from collections.abc import Sequence
from typing import Optional

from .advantages import ESTIMATOR, check_algorithm_config, config_get
from .policy_loss import check_actor_config, check_rank_share

logger = logging.getLogger(__name__)


def _balanced_groups(workloads: Sequence[int], dp_size: int, capacity: int) -> list:
    """Indices of the groups for each rank, at most ``capacity`` per rank, loads balanced.

    workloads: [G] summed workload of each group. A full mini-batch (G = dp_size·capacity, the
    usual case) uses verl's own Karmarkar-Karp partitioner with equal counts; a short one (only
    where padding rows fill the rest) takes the heaviest group first onto the least-loaded rank
    that has room.
    """
    if len(workloads) == dp_size * capacity and capacity > 0:
        from verl.utils.seqlen_balancing import get_seqlen_balanced_partitions
        return get_seqlen_balanced_partitions(list(workloads), k_partitions=dp_size,
                                              equal_size=True)
    parts, loads = [[] for _ in range(dp_size)], [0] * dp_size
    for g in sorted(range(len(workloads)), key=lambda g: (-workloads[g], g)):
        rank = min((r for r in range(dp_size) if len(parts[r]) < capacity),
                   key=lambda r: (loads[r], r))
        parts[rank].append(g)
        loads[rank] += workloads[g]
    return [sorted(p) for p in parts]


def check_whole_mini_batches(num: int, mini_batch_rows: int,
                             batch_key: str = "data.train_batch_size") -> None:
    """A batch of num responses must be a whole number of mini-batches; batch_key: the
    setting that gives the batch its prompts (named in the error)."""
    if num % mini_batch_rows:
        raise ValueError(
            f"opo_kernels: a batch of {num} responses is not a whole number of mini-batches of "
            f"{mini_batch_rows} (actor.ppo_mini_batch_size x rollout.n): make "
            f"{batch_key} a multiple of actor.ppo_mini_batch_size")


def plan_rank_layout(uids: Sequence, workloads: Sequence[int], *, dp_size: int,
                     mini_batch_rows: int, micro_batch_rows: Optional[int] = None,
                     padding: Optional[Sequence[bool]] = None,
                     batch_key: str = "data.train_batch_size") -> list:
    """Which rows each data-parallel rank receives, in order, so that every mini-batch and
    every micro-batch of every rank holds whole prompt groups (module docstring).

    uids: [B] prompt id of each row (equal id = same group). workloads: [B] ints (verl's
    ``calculate_workload`` of the sequence lengths). dp_size: data-parallel ranks.
    mini_batch_rows: rows per optimizer step over all ranks (actor.ppo_mini_batch_size ×
    rollout.n). micro_batch_rows: rows per micro-batch on one rank
    (actor.ppo_micro_batch_size_per_gpu; None: not checked). padding: [B] True for rows that
    only pad the batch (they join no group and fill the end of a rank's mini-batch).
    batch_key: the setting that gives the batch its prompts (named when it is not a whole
    number of mini-batches).
    Returns dp_size lists of row indices, each of B / dp_size rows; verl's batch reordered by
    their concatenation gives rank r the r-th contiguous slice. Raises ValueError naming the
    config key to change when no such layout exists.

    Example: 2 prompts × 2 responses, rows [a, b, a, b], one mini-batch over 2 ranks →
    [[0, 2], [1, 3]] (or [[1, 3], [0, 2]], whichever balances the workloads).
    """
    num = len(uids)
    if len(workloads) != num or (padding is not None and len(padding) != num):
        raise ValueError(f"uids ({num}), workloads ({len(workloads)}) and padding "
                         f"({None if padding is None else len(padding)}) differ in length")
    for name, value in (("dp_size", dp_size), ("mini_batch_rows", mini_batch_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    padding = [False] * num if padding is None else [bool(p) for p in padding]
    groups: dict = {}
    for row in range(num):
        if not padding[row]:
            groups.setdefault(uids[row], []).append(row)
    pads = [row for row in range(num) if padding[row]]
    sizes = sorted({len(rows) for rows in groups.values()})
    if len(sizes) > 1:
        raise ValueError(
            f"opo_kernels: the batch has prompt groups of different sizes ({sizes} responses); "
            f"verl's micro-batches have a fixed number of rows, so only equal groups can be kept "
            f"whole in every micro-batch: give every prompt the same rollout.n")
    size = sizes[0] if sizes else 1
    check_whole_mini_batches(num, mini_batch_rows, batch_key)
    check_rank_share(mini_batch_rows, dp_size, size)
    if micro_batch_rows is not None and micro_batch_rows % size:
        raise ValueError(
            f"opo_kernels: actor.ppo_micro_batch_size_per_gpu={micro_batch_rows} is not a "
            f"multiple of the group size {size} (rollout.n): a micro-batch must hold whole "
            f"prompt groups")

    rank_rows = mini_batch_rows // dp_size
    capacity = rank_rows // size  # groups per rank per mini-batch
    per_mini = mini_batch_rows // size
    group_rows = list(groups.values())
    pad_rows = iter(pads)
    layout = [[] for _ in range(dp_size)]
    for start in range(0, num // mini_batch_rows * per_mini, per_mini):
        chunk = group_rows[start:start + per_mini]
        loads = [sum(int(workloads[row]) for row in rows) for rows in chunk]
        for rank, part in enumerate(_balanced_groups(loads, dp_size, capacity)):
            rows = [row for g in part for row in chunk[g]]
            rows += [next(pad_rows) for _ in range(rank_rows - len(rows))]
            layout[rank].extend(rows)
    return layout


# ------------------------------------------------------------- verl's trainers, patched


def _opo_in_use(trainer) -> bool:
    return config_get(config_get(trainer.config, "algorithm"), "adv_estimator") == ESTIMATOR


def _actor_sizes(trainer, dp_size: int):
    """(mini_batch_rows, micro_batch_rows) from the trainer's config, after checking it;
    micro_batch_rows None with actor.use_dynamic_bsz (micro-batches cut by token count)."""
    actor = trainer.config.actor_rollout_ref.actor
    check_actor_config(actor, config_get(actor, "loss_agg_mode", "token-mean"))
    group = trainer.config.actor_rollout_ref.rollout.n
    micro = None if _dynamic(trainer) else config_get(actor, "ppo_micro_batch_size_per_gpu")
    return actor.ppo_mini_batch_size * group, micro


def check_at_start(trainer, dp_size: int, batch: Optional[tuple]) -> None:
    """The checks that need no batch, in the trainer's process once its workers are up (the
    data-parallel size known), before the first rollout: the actor and algorithm settings, and
    the layout of a batch of the configured size planned as the patched ``_balance_batch``
    plans every batch, so that the same ValueError, naming the key to change, comes at start
    instead of after the first rollout. batch: (prompts per balanced batch, the setting that
    gives them), or None (the legacy trainer with ``trainer.balance_batch=False``, which
    balances nothing): then only what the loss refuses at its first micro-batch."""
    check_algorithm_config(config_get(trainer.config, "algorithm"))
    mini_rows, micro_rows = _actor_sizes(trainer, dp_size)
    group = trainer.config.actor_rollout_ref.rollout.n
    prompts, batch_key = batch or (None, None)
    if not all(isinstance(v, int) and v > 0 for v in (prompts, group)):
        check_rank_share(mini_rows, dp_size, group)
        return
    uids = [prompt for prompt in range(prompts) for _ in range(group)]
    plan_rank_layout(uids, [1] * len(uids), dp_size=dp_size, mini_batch_rows=mini_rows,
                     micro_batch_rows=micro_rows, batch_key=batch_key)


def _checked_at_start(dp_size_of, batch_of):
    """A trainer's start-up method (legacy ``init_workers``, v1 ``init``) followed, with
    algorithm.adv_estimator=opo_kernels, by ``check_at_start``."""

    def factory(original):
        def start(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if _opo_in_use(self):
                check_at_start(self, dp_size_of(self), batch_of(self))
            return out

        return start

    return factory


def _legacy_dp_size(trainer) -> int:
    return trainer._get_dp_size(trainer.actor_rollout_wg, "actor")


def _legacy_batch(trainer) -> Optional[tuple]:
    """(prompts per balanced batch, its setting): data.train_batch_size; None without
    balancing."""
    if not config_get(config_get(trainer.config, "trainer"), "balance_batch", True):
        return None
    key = "data.train_batch_size"
    return config_get(config_get(trainer.config, "data"), "train_batch_size"), key


def _v1_dp_size(trainer) -> int:
    worker_group = trainer.actor_rollout_wg
    if "actor" not in worker_group._dispatch_info:  # as verl's own _balance_batch does
        worker_group._dispatch_info["actor"] = worker_group._query_dispatch_info("actor")
    return max(worker_group._dispatch_info["actor"]) + 1


def _v1_batch(trainer) -> Optional[tuple]:
    """(prompts per balanced batch, its setting): the v1 trainer samples
    data.train_batch_size / parameter_sync_step prompts per local update (its ``step``) and
    balances each sample."""
    prompts = config_get(config_get(trainer.config, "data"), "train_batch_size")
    sync = getattr(trainer, "parameter_sync_step", 1)
    if not (isinstance(prompts, int) and isinstance(sync, int) and sync > 0) or prompts % sync:
        return None  # verl's own step refuses it
    key = ("data.train_batch_size" if sync == 1
           else f"data.train_batch_size / parameter_sync_step ({sync})")
    return prompts // sync, key


def _dynamic(trainer) -> bool:
    return bool(config_get(trainer.config.actor_rollout_ref.actor, "use_dynamic_bsz", False))


def _update_with_whole_groups(original):
    """``_update_actor`` of either trainer: with actor.use_dynamic_bsz, the update's batch
    carries ``force_group_size`` = rollout.n, which verl's ``rearrange_micro_batches`` reads to
    cut micro-batches by token count between runs of that many rows only. Each run is one
    prompt group (or padding rows): ``plan_rank_layout`` puts every rank's share of a mini-batch
    as whole groups back to back, then its padding rows, a multiple of rollout.n of them. Only
    the update gets it: the log-prob passes split groups harmlessly, and their token budget
    (ppo_infer_max_token_len_per_gpu) need not hold a whole group. Batch metadata: the legacy
    trainer's ``DataProto.meta_info``, the v1 trainer's ``KVBatchMeta.extra_info``; both
    become the update's non-tensor data."""

    def _update_actor(self, batch, *args, **kwargs):
        meta = getattr(batch, "meta_info", getattr(batch, "extra_info", None))
        if not (_opo_in_use(self) and _dynamic(self) and isinstance(meta, dict)):
            # (a batch type this version does not know: the loss refuses split groups)
            return original(self, batch, *args, **kwargs)
        meta["force_group_size"] = int(self.config.actor_rollout_ref.rollout.n)
        try:
            return original(self, batch, *args, **kwargs)
        finally:
            meta.pop("force_group_size", None)

    return _update_actor


def _balance_legacy(original):
    """``RayPPOTrainer._balance_batch`` (legacy trainer; batch: DataProto, rows grouped by
    ``non_tensor_batch['uid']``) keeping groups whole on every rank."""

    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", *args, **kwargs):
        if not _opo_in_use(self):
            return original(self, batch, metrics, logging_prefix, *args, **kwargs)
        import torch
        from verl.utils.seqlen_balancing import calculate_workload, log_seqlen_unbalance

        seqlen = batch.batch["attention_mask"].view(len(batch), -1).sum(-1)
        dp_size = self._get_dp_size(self.actor_rollout_wg, "actor")
        mini_rows, micro_rows = _actor_sizes(self, dp_size)
        layout = plan_rank_layout(list(batch.non_tensor_batch["uid"]),
                                  calculate_workload(seqlen).tolist(), dp_size=dp_size,
                                  mini_batch_rows=mini_rows, micro_batch_rows=micro_rows)
        batch.reorder(torch.tensor([row for rows in layout for row in rows]))
        metrics.update(log_seqlen_unbalance(seqlen_list=seqlen.tolist(), partitions=layout,
                                            prefix=logging_prefix))

    return _balance_batch


def _balance_v1(original):
    """``PPOTrainer._balance_batch`` (v1 trainer; batch: KVBatchMeta whose keys are
    ``{uid}_{session}_{index}``) keeping groups whole on every rank."""

    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", *args, **kwargs):
        if not _opo_in_use(self):
            return original(self, batch, metrics, logging_prefix, *args, **kwargs)
        import torch
        from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
        from verl.utils.seqlen_balancing import calculate_workload, log_seqlen_unbalance

        dp_size = _v1_dp_size(self)
        mini_rows, micro_rows = _actor_sizes(self, dp_size)
        # before verl pads it: its padding rows would fill the last mini-batch with rows the
        # loss's rows·dp/global_batch_size scale counts, so that mini-batch's step would depend
        # on how its rows fall into micro-batches. (Then verl pads only for a dp that does not
        # divide the batch, which check_rank_share refuses in the layout below.)
        check_whole_mini_batches(len(batch.keys), mini_rows)
        batch = upsample_batch_to_divisible_size(batch, self._get_required_batch_multiple(dp_size),
                                                 self.tokenizer.eos_token_id)
        seqlen = torch.tensor([tag["seq_len"] for tag in batch.tags], dtype=torch.int64)
        layout = plan_rank_layout(
            [key.rsplit("_", 2)[0] for key in batch.keys],  # verl's own split of the key
            calculate_workload(seqlen).tolist(), dp_size=dp_size, mini_batch_rows=mini_rows,
            micro_batch_rows=micro_rows,
            padding=[bool(tag.get("is_padding", False)) for tag in batch.tags])
        batch.reorder([row for rows in layout for row in rows])
        metrics.update(log_seqlen_unbalance(seqlen_list=seqlen.tolist(), partitions=layout,
                                            prefix=logging_prefix))
        return batch

    return _balance_batch


# module -> (class, {method: replacement factory}) besides _update_actor
_TRAINERS = {
    "verl.trainer.ppo.ray_trainer": ("RayPPOTrainer", {
        "_balance_batch": _balance_legacy,
        "init_workers": _checked_at_start(_legacy_dp_size, _legacy_batch)}),
    "verl.trainer.ppo.v1.trainer_base": ("PPOTrainer", {
        "_balance_batch": _balance_v1,
        "init": _checked_at_start(_v1_dp_size, _v1_batch)}),
}
_START = "the configuration is checked when the first batch is balanced, not at start"
# method -> (the parameters it must start with, what is lost when it is not replaced)
_METHODS = {
    "_balance_batch": (["self", "batch", "metrics", "logging_prefix"],
                       "prompt groups are not kept whole across data-parallel ranks"),
    "_update_actor": (["self", "batch"], "actor.use_dynamic_bsz splits prompt groups"),
    "init_workers": (["self"], _START),
    "init": (["self"], _START),
}


def _patch_method(module, cls, class_name: str, name: str, factory) -> bool:
    params, lost = _METHODS[name]
    original = getattr(cls, name, None)
    if original is None:
        logger.warning("opo_kernels: %s.%s has no %s; %s", module.__name__, class_name, name,
                       lost)
        return False
    if getattr(original, "__opo_kernels_original__", None) is not None:
        return True
    if list(inspect.signature(original).parameters)[:len(params)] != params:
        logger.warning("opo_kernels: %s.%s.%s%s is not the method this version knows; %s",
                       module.__name__, class_name, name, inspect.signature(original), lost)
        return False
    replacement = factory(original)
    replacement.__opo_kernels_original__ = original
    replacement.__doc__ = (original.__doc__ or "") + (
        "\n\nWith algorithm.adv_estimator=opo_kernels: whole prompt groups on every rank and "
        "in every micro-batch (opo_kernels.integrations.verl.data_parallel).")
    setattr(cls, name, replacement)
    return True


def patch_trainer_module(module) -> bool:
    """Replace ``_balance_batch``, ``_update_actor`` and the start-up method (``init_workers``
    or ``init``) of the trainer class in ``module`` (one of ``_TRAINERS``); True when all are
    (or already were) replaced. A verl whose method does not take the parameters this version
    knows is left alone, with a warning: the policy loss then refuses the split groups it
    receives."""
    class_name, factories = _TRAINERS[module.__name__]
    cls = getattr(module, class_name, None)
    factories = dict(factories, _update_actor=_update_with_whole_groups)
    done = [_patch_method(module, cls, class_name, name, factory)
            for name, factory in factories.items()]
    return all(done)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a trainer module right after verl imports it (so importing this package never
    imports verl's trainers, which a worker process does not need)."""

    def find_spec(self, name, path=None, target=None):
        if name not in _TRAINERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                patch_trainer_module(module)
            except Exception:  # never break verl's import; the loss still refuses split groups
                logger.exception("opo_kernels: could not patch %s's trainer", name)

        spec.loader.exec_module = exec_module
        return spec


def install():
    """Patch the trainer modules already imported and the others when they are imported."""
    for name in _TRAINERS:
        if name in sys.modules:
            patch_trainer_module(sys.modules[name])
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
