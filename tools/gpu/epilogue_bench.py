"""Per-call time of the epilogue before and after it became one Triton launch (one GPU, one run).

    python -m tools.gpu.epilogue_bench [--out DIR]     # CUDA: JSON + printed table
    python -m tools.gpu.epilogue_bench --tiny          # CPU (interpreter): runs and cross-checks

"before": ``tools/gpu/legacy_epilogue.py`` (the torch epilogue of commit 630c99a, bucket
scatters, with the Batch's derived seq/group tensors that its old ``prepare`` built), on the
log-probs of a forward pass; "after": ``opo_kernels.epilogue.run_epilogue`` (one launch plus
the memset of its ticket). Both at N = 16,384 counted tokens (B = 24, T = 976, padded, ~70 %
counted, the benchmark's target shape) and at a small batch (N ≈ 1,024: B = 12, T = 122), in
the general mode with the package's default options. Timed with the benchmark suite's CUDA
timer (``benchmarks.timers.time_cuda``: median of CUDA events, L2 flushed, device synchronized
before each call). Before timing, the two are checked to agree (loss and every c_t).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.host_overhead import triton_epilogue
from benchmarks.side_bench import environment, save, tiny_cli
from benchmarks.timers import time_cuda, time_host

SHAPES = {"N16384": (24, 976), "N1024": (12, 122)}
TINY = {"tiny": (6, 9)}


def _problem(B, T, device, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2
    ref = lp + 0.05 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = True
    rewards = torch.rand(B, generator=g)
    to = lambda t: t.to(device)  # noqa: E731
    return to(lp), to(ref), to(mask), to(rewards)


def _time(fn, cuda: bool) -> float:
    return (time_cuda(fn) if cuda else time_host(fn, reps=1)).ms


def _measure(name, B, T, device, cuda):
    """One shape: cross-check, then time both epilogues."""
    import torch

    import tools.gpu.legacy_epilogue as legacy
    from opo_kernels import OPOLossConfig
    from opo_kernels.inputs import prepare

    cfg = OPOLossConfig()
    lp, ref, mask, rewards = _problem(B, T, device)
    stand_in = lp.new_empty(()).expand(B, T, 151936)  # shapes only: V for the τ rule
    labels = torch.zeros(B, T, dtype=torch.long, device=device)
    batch = prepare(stand_in, labels, ref, rewards, mask=mask, group_size=6, config=cfg)
    flat = torch.where(mask, lp, 0.0).reshape(-1)

    def before():
        return legacy.batch_epilogue(cfg, batch, flat, None)

    after = triton_epilogue(batch, cfg, flat.view(B, T))

    old, new = before(), after()
    seq = batch.seq
    c_new = torch.where(seq >= 0, new.coef[seq.clamp(min=0), 0], 0.0)
    agree = (abs(float(old.loss) - float(new.loss)) <= 1e-5 * max(abs(float(old.loss)), 1e-3)
             and torch.allclose(old.coef, c_new, rtol=1e-4, atol=1e-7))
    assert agree, f"{name}: legacy and Triton epilogues disagree"
    return {"shape": name, "B": B, "T": T, "counted": int(mask.sum()),
            "before_ms": _time(before, cuda), "after_ms": _time(after, cuda)}


def run(tiny: bool, out: Path | None):
    import torch

    cuda = torch.cuda.is_available() and not tiny
    device = "cuda" if cuda else "cpu"
    rows = []
    for name, (B, T) in (TINY if tiny else SHAPES).items():
        row = _measure(name, B, T, device, cuda)
        rows.append(row)
        print(f"{name:7s} B={B:3d} T={T:4d} counted={row['counted']:6d}  "
              f"before {row['before_ms'] * 1e3:9.1f} us   after {row['after_ms'] * 1e3:9.1f} us")
    result = environment(cuda, rows=rows)
    save(out, "epilogue_bench.json", result)
    return result


def main(argv=None):
    tiny_cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
