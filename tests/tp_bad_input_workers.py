"""The ranks of tests/test_tensor_parallel.py's bad-input test: every rank must raise a clear
error naming the problem when one rank's input is bad or differs from the others', and none may
be left waiting in a collective."""

from __future__ import annotations

import torch
import torch.distributed as dist
import tp_workers  # noqa: F401 (sets up the interpreter in a spawned rank)


def bad_input_cases(rank, world, port, cases):
    """For each case, every rank must raise a ValueError naming the problem (none may wait in a
    collective). The cases share one process group (a rank's start-up is most of a case's
    time); a case that fails is reported with its name, the others still run, unless a rank
    was left in a collective (then the test's deadline reports the hang)."""
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        failed = []
        for case in cases:
            try:
                _bad_input_case(rank, world, case)
            except AssertionError as err:
                failed.append(f"{case}: {err}")
        assert not failed, "\n".join(failed)
    finally:
        dist.destroy_process_group()


def _bad_input_case(rank, world, case):
    from problems import make_problem

    import opo_kernels

    problem = make_problem(6, 4, 8, torch.float32, "padded", seed=3)
    labels, ref, rewards = problem.args()
    V = problem.logits.shape[-1]
    lo, hi = rank * V // world, (rank + 1) * V // world
    logits = problem.leaf()[..., lo:hi]
    layout = dict(problem.layout)
    vocab_start = None
    expect = None
    options = {}
    group = dist.group.WORLD
    own_error = ValueError  # what the rank with the problem raises (the others: ValueError)
    if case == "label_outside_vocab":
        labels = labels.clone()
        labels[0, 0] = V  # a counted token (every sequence's first token is counted)
        expect = "labels"
    elif case == "inconsistent_vocab_start":
        vocab_start = lo + (1 if rank == world - 1 else 0)
        expect = "vocab_start"
    elif case == "mismatched_rows":
        if rank == 1:
            logits, labels, ref = logits[:, :-1], labels[:, :-1], ref[:, :-1]
            layout["mask"] = layout["mask"][:, :-1]
        expect = "token rows"
    elif case == "bad_argument_on_one_rank":
        if rank == 0:
            layout["mask"] = layout["mask"][:, :-1]
        expect = "mask"
    elif case == "bad_option_on_one_rank":  # fails in OPOLossConfig, before any check
        if rank == 0:
            options["alpha"] = 2.0
        expect = "alpha"
    elif case in ("bad_chunk_size_on_one_rank", "chunk_size_differs_on_one_rank"):
        expect = "chunk_size"
    elif case == "bad_logits_budget_on_one_rank":
        expect = "logits_budget must be"
    elif case == "logits_budget_differs_on_one_rank":  # on-policy chunks would not pair up
        expect = "logits_budget is not the same on every rank"
    elif case == "inf_weight_on_one_rank":  # rank 1's slice: every rank names weight
        expect = "weight: 1 row(s) (vocabulary entries) with a non-finite value"
    elif case == "hidden_differs_on_one_rank":  # fused-linear, by one ulp on rank 1
        expect = "hidden is not the same on every rank"
    # valid on every rank, but a replicated argument or option is not the same everywhere
    elif case == "labels_differ_on_one_rank":
        if rank == 1:
            labels = labels.clone()
            labels[0, 0] = (labels[0, 0] + 1) % V  # a counted token (not counted: not read)
        expect = "labels is not the same on every rank"
    elif case == "rewards_differ_on_one_rank":  # by one ulp
        if rank == 1:
            rewards = rewards.clone()
            rewards[2] = torch.nextafter(rewards[2], torch.tensor(2.0))
        expect = "rewards is not the same on every rank"
    elif case == "mask_differs_on_one_rank":
        if rank == 0:
            layout["mask"] = layout["mask"].clone()
            layout["mask"][1, -1] = ~layout["mask"][1, -1]
        expect = "mask is not the same on every rank"
    elif case == "omega_rule_on_one_rank_tensor_on_other":  # a rule on rank 0, a tensor on rank 1
        options["weights"] = "seed" if rank == 0 else torch.ones(rewards.shape)
        expect = ("weights is not the same on every rank of the process group (rank 0: 'seed'; "
                  f"rank 1: shape [{rewards.shape[0]}], fingerprint")
    elif case == "ref_logprobs_only_on_one_rank":  # on-policy on rank 0, off-policy on 1
        if rank == 0:  # (rank 0's summary lacks the name that rank 1's has)
            ref = None
        expect = "ref_logprobs is not the same on every rank"
    elif case == "logits_dtype_differs_on_one_rank":  # the partials' dtype would differ
        if rank == 1:
            logits = logits.double()
        expect = "logits dtype is not the same on every rank"
    elif case == "one_pass_differs_on_one_rank":  # one collective per chunk vs one per call
        ref = None
        options["vocab_parallel_one_pass"] = True
        if rank == 0:
            logits = logits.detach()  # no gradient wanted here: the general mode
        expect = "one-pass mode is not the same on every rank"
    elif case == "deferred_error_pending_on_one_rank":  # from rank 0's own earlier call
        if rank == 0:
            bad = labels.clone()
            bad[0, 0] = V
            with torch.no_grad():  # (no backward reads it: left pending)
                opo_kernels.opo_loss(problem.logits, bad, ref, rewards, backend="triton",
                                     validate="deferred", **layout)
        expect = "validate='deferred': the value checks of call"
    elif case == "linear_one_phase_differs_on_one_rank":  # on-policy, a gradient on rank 1
        expect = "one-phase mode is not the same on every rank"  # only: one phase there
    elif case == "grad_to_base_with_process_group":  # refused on every rank, documented
        options["grad_to_base"] = True
        expect = "grad_to_base is not supported with process_group"
    elif case == "option_differs_on_one_rank":
        options["mu"] = 1.0 if rank == 0 else 0.5
        expect = "option mu is not the same on every rank"
    elif case == "linear_hidden_grad_differs_on_one_rank":  # its backward all-reduce
        expect = "hidden's gradient wanted is not the same on every rank"
    elif case == "out_of_memory_on_one_rank":  # not a ValueError, in the fingerprints
        if rank == 1:
            from opo_kernels import tensor_parallel

            def no_memory(*args, **kwargs):
                raise torch.OutOfMemoryError("simulated: out of memory")

            saved = tensor_parallel.replicated_summary
            tensor_parallel.replicated_summary = no_memory
            own_error = torch.OutOfMemoryError
        expect = "out of memory"
    elif case == "validate_differs_on_one_rank":  # a new group: its layout not yet known
        group = dist.new_group(list(range(world)))
        options["validate"] = rank == 0
        expect = "validate is not the same on every rank"
    try:
        if any(name in case for name in ("chunk_size", "hidden", "logits_budget", "weight",
                                         "linear")):
            # the fused-linear op's own inputs
            g = torch.Generator().manual_seed(5)
            hidden = torch.randn(6, 4, 3, generator=g)
            weight = torch.randn(V, 3, generator=g)[lo:hi]
            chunk_size = {"bad_chunk_size_on_one_rank": 0,
                          "chunk_size_differs_on_one_rank": 4}.get(case, 5)
            if case == "inf_weight_on_one_rank" and rank == 1:
                weight[1, 0] = float("inf")
            if case == "linear_one_phase_differs_on_one_rank" and rank == 1:
                weight.requires_grad_()
            if case == "linear_hidden_grad_differs_on_one_rank":
                weight.requires_grad_()  # one phase on both ranks; hidden's gradient on one
                hidden.requires_grad_(rank == 0)
            if case == "hidden_differs_on_one_rank" and rank == 1:
                assert layout["mask"][2, 1]  # a counted row (a row not counted is not read)
                hidden[2, 1, 2] = torch.nextafter(hidden[2, 1, 2], torch.tensor(9.0))
            budget = {"bad_logits_budget_on_one_rank": -1,
                      "logits_budget_differs_on_one_rank": 2**20}.get(case, 0)
            opo_kernels.fused_linear_opo_loss(
                hidden, weight, labels, None, rewards,
                chunk_size=chunk_size if rank == 0 else 5,
                logits_budget=budget if rank == 0 else 0,
                backend="triton", process_group=group, **layout)
        else:
            opo_kernels.opo_loss(logits, labels, ref, rewards, backend="triton",
                                 process_group=group, vocab_start=vocab_start,
                                 **layout, **options)
    except Exception as err:  # noqa: BLE001 (the type is checked)
        assert type(err) in (ValueError, own_error), f"rank {rank}: {type(err)} {err}"
        assert expect in str(err), f"rank {rank}: {err}"
    else:
        raise AssertionError(f"rank {rank}: no error for {case}")
    finally:
        if case == "out_of_memory_on_one_rank" and rank == 1:
            tensor_parallel.replicated_summary = saved
