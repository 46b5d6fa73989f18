"""pytest setup of the benchmark suite (benchmarks/test_bench_opo.py).

Without a usable GPU the Triton kernels run through the interpreter, so TRITON_INTERPRET is
set here, before anything imports triton (same rule as tests/conftest.py). The suite then
only runs in tiny mode (OPO_BENCH_TINY=1); the full grid needs CUDA.
"""

import os

import torch

if not (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("0", "")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks import harness  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # the suite still runs (and writes its JSON) without the plugin

    class _NoPluginBenchmark:
        def __init__(self):
            self.extra_info = {}

        def pedantic(self, target, args=(), kwargs=None, **_ignored):
            return target(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _NoPluginBenchmark()


@pytest.fixture(scope="session")
def bench_session():
    """One harness.Session: measures the copy bandwidth once, owns the results JSON."""
    settings = harness.Settings.from_env()
    if not settings.tiny and not harness.cuda_ok():
        pytest.skip("the full benchmark grid needs a CUDA GPU; OPO_BENCH_TINY=1 runs it tiny")
    session = harness.Session(settings)
    print(f"\n[opo-bench] results -> {session.path}")
    yield session
    session.write()
