"""Vocabulary-parallel on-policy logits: the general mode (2 reads + 1 write of the rank's
slice, one all-gather per call) against the one-pass mode (``vocab_parallel_one_pass=True``:
1 read + 1 write when each chunk's re-read hits L2, one all-gather and three launches per
chunk). Forward + backward of one ``opo_loss`` call, validate=False, bf16, N = 16,384 rows.

    python -m benchmarks.tp_bench [--world K] [--out DIR]   # CUDA: NCCL, rank r on GPU r
    python -m benchmarks.tp_bench --tiny                    # CPU (gloo, interpreter): runs

Each rank holds a slice of V_local logits. On one GPU (--world 1, the default when only one
is present) the all-gather is a local copy, so the run measures the one-pass mode's best case
at a slice of tp = 2 and tp = 8 of V = 151,936 (its chunking and launches without the
interconnect's latency); with K GPUs, the real collective. Every rank runs the same fixed
number of calls (an adaptive repeat count could differ between ranks and leave one waiting
in a collective); rank 0 reports the medians.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import time
from pathlib import Path

from benchmarks.results import recorded_commit
from benchmarks.side_bench import environment, save

V_GLOBAL = 151936
SLICES = {"tp2": -(-V_GLOBAL // 2), "tp8": -(-V_GLOBAL // 8)}  # V_local of each rank
ROWS = 16384
TINY = {"rows": 64, "slices": {"tiny": 40}, "warmup": 1, "reps": 2}
FULL = {"rows": ROWS, "slices": SLICES, "warmup": 3, "reps": 15}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(rows, vocab_local, world, device, dtype, rank):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    B = 16 if rows >= 16 else 1
    T = rows // B
    labels = torch.randint(0, vocab_local * world, (B, T), generator=g)  # global token ids
    mask = torch.rand(B, T, generator=g) < 0.9
    mask[:, 0] = True
    rewards = torch.rand(B, generator=g)
    gl = torch.Generator(device="cpu").manual_seed(1 + rank)  # each rank its own slice
    logits = (torch.randn(B, T, vocab_local, generator=gl) * 2).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return to(logits), to(labels), to(mask), to(rewards)


def _time(fn, cuda: bool, warmup: int, reps: int) -> list:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _step(x, labels, mask, rewards, one_pass, validate=False):
    """Forward + backward of one on-policy call on this rank's slice x."""
    import torch
    import torch.distributed as dist

    import opo_kernels

    loss = opo_kernels.opo_loss(x, labels, None, rewards, mask=mask, group_size=4,
                                backend="triton", process_group=dist.group.WORLD,
                                validate=validate, vocab_parallel_one_pass=one_pass)
    torch.autograd.grad(loss, x)


def _rank(rank, world, port, tiny, out):
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not tiny
    if cuda:
        torch.cuda.set_device(rank)
    device = f"cuda:{rank}" if cuda else "cpu"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    plan = TINY if tiny else FULL
    dtype = torch.float32 if tiny else torch.bfloat16
    rows = []
    try:
        for name, vocab_local in plan["slices"].items():
            logits, labels, mask, rewards = _problem(plan["rows"], vocab_local, world, device,
                                                     dtype, rank)
            x = logits.requires_grad_()
            row = {"slice": name, "vocab_local": vocab_local, "rows": labels.numel(),
                   "dtype": str(dtype).removeprefix("torch.")}
            for one_pass in (False, True):
                call = functools.partial(_step, x, labels, mask, rewards, one_pass)
                call(validate=True)  # the layout's agreement, once
                times = _time(call, cuda, plan["warmup"], plan["reps"])
                key = "one_pass" if one_pass else "general"
                row[f"{key}_ms"] = statistics.median(times)
                bytes_moved = x.numel() * x.element_size() * (2 if one_pass else 3)
                row[f"{key}_gbps_at_its_traffic"] = bytes_moved / (row[f"{key}_ms"] * 1e-3) / 1e9
            row["one_pass_speedup"] = row["general_ms"] / row["one_pass_ms"]
            rows.append(row)
            del x, logits, call
            if rank == 0:
                print(f"{name:5s} V_local={vocab_local:6d} N={row['rows']:6d}  general "
                      f"{row['general_ms']:8.3f} ms  one-pass {row['one_pass_ms']:8.3f} ms  "
                      f"speed-up {row['one_pass_speedup']:.2f}x", flush=True)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        save(out, "tp_bench.json", environment(
            cuda, world=world, commit=recorded_commit(), rows=rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check at a tiny shape")
    parser.add_argument("--world", type=int, default=None,
                        help="ranks (default: the GPUs present; 2 with --tiny)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.multiprocessing as mp

    world = args.world or (2 if args.tiny else max(torch.cuda.device_count(), 1))
    mp.spawn(_rank, args=(world, _free_port(), args.tiny, args.out), nprocs=world)


if __name__ == "__main__":
    main()
