"""Where a loss call's time goes outside the row kernels: one forward + backward of opo_loss
timed as the benchmark does (eager, CUDA events, L2 flushed) and replayed from a CUDA graph
(the same device work with no Python and no launch cost), plus the epilogue alone both ways.

    python -m benchmarks.host_overhead [--out DIR]   # CUDA: JSON + printed table
    python -m benchmarks.host_overhead --tiny        # CPU (interpreter): runs, no timing claim

Why: on the H200 (2026-12-04) the call took 4.83 ms at N = 16384, V = 151936 bf16, of which the
two row kernels timed alone were 4.13 ms; the epilogue alone timed 0.33 ms at N = 16384 and
0.31 ms at N = 1024, flat in N. eager − graph is time the GPU waits for the host; graph − the row
kernels is device time of the epilogue, the memset and launch gaps. Shapes: the benchmark's
padded rows (benchmarks/inputs.py) at N = 16384 and N = 1024, V = 151936, bf16, general and
on-policy mode, validate=False (capturable: no host sync).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.results import recorded_commit
from benchmarks.side_bench import environment, save, tiny_cli

SHAPES = {"N16384": 16384, "N1024": 1024}


def _capture(step):
    """A CUDA graph of step() (after two warm-up calls off the capture stream)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


# implementations whose step a CUDA graph can capture (Triton launches and torch ops, no host
# sync): the eager reference and torch.compile'd one read values back (nonzero), and are left out
CAPTURABLE = ("opo_kernels", "opo_kernels_inplace", "opo_kernels_model_slice",
              "opo_kernels_grad_to_base", "liger_ce", "liger_gspo", "liger_grpo_token")


def replay_ms(step, setup=None):
    """The benchmark timer's median ms of step() replayed from a CUDA graph (the same device
    work with no Python and no launch cost); None when the capture fails."""
    import torch

    from benchmarks.timers import time_cuda

    try:
        graph = _capture(step)
    except Exception:  # noqa: BLE001 - a step that syncs or breaks the capture: no column
        torch.cuda.synchronize()
        return None
    try:
        return time_cuda(graph.replay, setup).ms
    finally:
        del graph
        torch.cuda.empty_cache()


def _call_step(inp, on_policy: bool):
    import torch

    import opo_kernels

    x = inp.logits.detach().requires_grad_()
    ref = None if on_policy else inp.ref_logprobs

    def step():
        loss = opo_kernels.opo_loss(x, inp.labels, ref, inp.rewards, mask=inp.mask,
                                    group_ids=inp.group_ids, backend="triton", validate=False)
        return torch.autograd.grad(loss, x)[0]
    return step


def triton_epilogue(batch, cfg, logprobs):
    """A step that runs the package's epilogue (memset of its ticket + one launch) on a
    prepared batch and log-probs [B, T] (general mode); returns its EpilogueOut."""
    import torch

    from opo_kernels.epilogue import Mode, params_tensor, run_epilogue

    mode = Mode.of(cfg, False)
    params = params_tensor(cfg, logprobs.device, torch.float32)

    def step():
        counter = torch.zeros(1, dtype=torch.int32, device=logprobs.device)
        return run_epilogue(batch, mode, params, counter, logprobs=logprobs)
    return step


def _epilogue_step(inp):
    from opo_kernels import OPOLossConfig
    from opo_kernels.inputs import prepare

    cfg = OPOLossConfig()
    batch = prepare(inp.logits, inp.labels, inp.ref_logprobs, inp.rewards, mask=inp.mask,
                    group_ids=inp.group_ids, config=cfg)
    # the reference log-probs stand in for the forward's: same shape and dtype
    return triton_epilogue(batch, cfg, inp.ref_logprobs.float())


def run(tiny: bool, out: Path | None):
    import torch

    from benchmarks.cases import Shape
    from benchmarks.inputs import group_ids_for, make_inputs
    from benchmarks.timers import time_cuda, time_host

    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    shapes = {"tiny": (48, 64)} if tiny else {k: (n, 151936) for k, n in SHAPES.items()}
    rows = []
    for name, (n, v) in shapes.items():
        inp = make_inputs(Shape(n, v, "bfloat16", "padded"), device, seed=0)
        inp.group_ids = group_ids_for(inp.B).to(device)
        steps = {"general": _call_step(inp, False), "on_policy": _call_step(inp, True),
                 "epilogue": _epilogue_step(inp)}
        for what, step in steps.items():
            row = {"shape": name, "N": n, "V": v, "B": inp.B, "T": inp.T, "what": what}
            if cuda:
                row["eager_ms"] = time_cuda(step).ms
                row["graph_ms"] = time_cuda(_capture(step).replay).ms
            else:
                step()
                row["eager_ms"] = time_host(step, reps=1).ms
            rows.append(row)
            graph = f"graph {row['graph_ms']:8.3f} ms" if "graph_ms" in row else ""
            print(f"{name:7s} {what:10s} eager {row['eager_ms']:8.3f} ms  {graph}", flush=True)
        del inp, steps
        if cuda:
            torch.cuda.empty_cache()
    result = environment(cuda, commit=recorded_commit(), rows=rows)
    save(out, "host_overhead.json", result)
    return result


def main(argv=None):
    tiny_cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
