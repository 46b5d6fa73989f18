"""The verl policy loss raises a micro-batch's error on every rank (opo_kernels/integrations/
agree.py): two gloo ranks call the registered loss as verl's ppo_loss does, with bad input on
one of them; both raise (the bad rank its own error, whatever its type, the other one a
RuntimeError naming it) instead of one rank stopping while the other goes on to FSDP's next
collective."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
from ranks import run_ranks

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from test_verl_integration import K, actor_config, call_like_verl, make_batch  # noqa: E402


def _config(rows: int):
    config = actor_config()
    config.global_batch_info.update(dp_size=2, global_batch_size=2 * rows)
    return config


def _bad(batch, case: str):
    """(batch, rows) of a micro-batch with one kind of bad input."""
    if case == "nan_old_log_prob":  # a value check (validate="deferred", read in the call)
        old = batch["old"].clone()
        old[0, 0] = float("nan")  # row 0 has >= 1 counted token
        return {**batch, "old": old}, slice(None)
    if case == "advantages_1d":  # an error that is no ValueError (decoding the group tags)
        return {**batch, "advantages": batch["advantages"][:, 0]}, slice(None)
    assert case == "split_group"  # rows 0..3: the second group has 1 of its 3 responses
    return batch, slice(0, 4)


def _rank(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        batch = make_batch(5)
        rows = batch["mask"].shape[0]
        loss, _ = call_like_verl(_config(rows), batch, batch["logprobs"].clone())  # both good
        assert torch.isfinite(loss)
        for case, own in (("nan_old_log_prob", (ValueError, "found bad input")),
                          ("split_group", (ValueError, "has 1 of its 3 non-empty responses")),
                          ("advantages_1d", (IndexError, ""))):
            for bad_ranks in ([1], [0, 1]):
                mine, part = _bad(batch, case) if rank in bad_ranks else (batch, slice(None))
                lp = mine["logprobs"][part].clone().requires_grad_()
                try:
                    call_like_verl(_config(rows), mine, lp, rows=part)  # verl's global info
                except Exception as err:  # noqa: BLE001 (the type is checked below)
                    error = err
                else:
                    raise AssertionError(f"rank {rank} did not raise ({case}, {bad_ranks})")
                if rank in bad_ranks:  # its own error, as it was
                    assert type(error) is own[0] and own[1] in str(error), (case, error)
                else:
                    assert type(error) is RuntimeError, (case, error)
                    assert f"the micro-batch of rank(s) {bad_ranks} failed" in str(error)
        # the ranks still agree afterwards: a good micro-batch passes on both
        loss, _ = call_like_verl(_config(rows), batch, batch["logprobs"].clone())
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()


def test_a_bad_micro_batch_on_one_rank_stops_every_rank():
    run_ranks(_rank, 2)


def test_value_checks_raise_in_the_call_itself():
    """Single process: the deferred value checks are read at the call's own metrics sync, so
    the error comes from the loss call (before any backward)."""
    batch = make_batch(6)
    bad, part = _bad(batch, "nan_old_log_prob")
    with pytest.raises(ValueError, match="found bad input"):
        call_like_verl(_config(2 * K), bad, bad["logprobs"].clone().requires_grad_(), rows=part)
