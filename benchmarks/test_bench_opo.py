"""Forward + backward of one OPO loss call, per implementation and shape (pytest-benchmark).

The time is taken on the GPU with CUDA events (one loop for every implementation, median; see
harness.time_cuda), not by pytest-benchmark's host clock: pytest-benchmark wraps the whole
measurement once (its own numbers are the measurement's wall time) and every figure of the
row goes into ``benchmark.extra_info`` and the results JSON (harness.Session).

The grid (harness.cases): the headline shape first (N=16384 counted tokens, V=151936, bf16,
padded), then the fused-linear shapes (hidden [16, 1024, 4096] padded and [4096, 4096] packed,
weight [128256, 4096], bf16; loss and grads of hidden and weight; harness.LINEAR_IMPLS only),
then V in {151936, 128256, 32000} x N in {4096, 16384, 32768} x {padded, packed} in bf16,
fp32 at one shape, and the trainer micro-batch sizes N in {1024, 2048} at V in {151936, 32000}
(with the host-time column). OPO_BENCH_TINY=1 swaps in N=64, V=128 and B=2, T=8 / N=12, H=16, V=64.
Run it through ``python -m benchmarks.run`` (which also writes the plot and the table of
docs/benchmarks.md).
"""

import pytest

from benchmarks import harness


@pytest.mark.parametrize("case", harness.cases(), ids=lambda c: c.id)
def test_opo_fwd_bwd(case, bench_session, benchmark):
    benchmark.group = case.shape.label
    outcome = benchmark.pedantic(bench_session.measure, args=(case,), rounds=1, iterations=1)
    if outcome.row is not None:
        benchmark.extra_info.update(outcome.row)
    elif outcome.skip is not None:
        pytest.skip(outcome.skip)
    else:
        pytest.fail(f"{case.id}: {outcome.error}")
