"""Test setup: one suite, two devices.

- **CPU (CI, the default):** TRITON_INTERPRET=1 is set here, before triton is first imported
  (importing torch does not import triton), so the real Triton kernels run on CPU tensors
  through the interpreter (with ``fast_interpreter``: the interpreter's redundant re-patching
  of ``triton.language`` at every nested ``@triton.jit`` call skipped, ~2x faster).
- **CUDA:** ``TRITON_INTERPRET=0 python -m pytest`` on a CUDA machine runs the same
  kernel-vs-reference tests (every option, dtype, V, layout, strided views, NaN-poisoned
  outputs, float64 gradcheck, properties, bad inputs, on-policy, in place, fused-linear,
  torch.compile) on CUDA tensors with the compiled kernels, plus the GPU-only tests.

The device is ``problems.DEVICE`` (``OPO_TEST_DEVICE`` overrides it). Markers:

- ``gpu``: needs CUDA and the compiled kernels (production sizes, CUDA graphs, NCCL); skipped
  on the CPU;
- ``cpu_only``: needs the interpreter or is about CPU-side code (the TRL/verl integrations,
  the demo, gloo tensor parallelism, the benchmark scripts' tiny modes, the sm_90 compile
  check); skipped in the CUDA run, which CI's CPU run already covers;
- everything else runs on whichever device the suite is on.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import fast_interpreter  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from problems import DEVICE  # noqa: E402

import opo_kernels.utils as ok_utils  # noqa: E402

# under pytest-xdist (-n auto) each worker gets its share of the cores: torch's own intra-op
# threads would otherwise oversubscribe them (the interpreter is mostly single-threaded)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1)
                              // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

INTERPRETER = ok_utils.interpreter_on()
fast_interpreter.install()  # ~2x faster kernels under the interpreter, the same operations
HAS_CUDA = torch.cuda.is_available() and not INTERPRETER
ON_CUDA = torch.device(DEVICE).type == "cuda"


def pytest_report_header(config):
    return (f"opo_kernels suite on {DEVICE} "
            f"({'Triton interpreter' if INTERPRETER else 'compiled kernels'})")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA and TRITON_INTERPRET=0")
    skip_cpu = pytest.mark.skip(reason="CPU-only test: runs in the interpreter suite (CI)")
    skip_all = pytest.mark.skip(reason="no device: TRITON_INTERPRET=0 and no CUDA")
    for item in items:
        if "gpu" in item.keywords:
            if not HAS_CUDA:
                item.add_marker(skip_gpu)
        elif "cpu_only" in item.keywords:
            if not INTERPRETER:
                item.add_marker(skip_cpu)
        elif not INTERPRETER and not ON_CUDA:
            item.add_marker(skip_all)
    if HAS_CUDA:
        # the GPU-only tests first (stable: the rest keeps its order): on a time-limited GPU
        # machine the suite runs under a deadline, and these (production sizes, the benchmarks'
        # pre-flights) are the ones only that machine can run
        items.sort(key=lambda item: "gpu" not in item.keywords)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts as NaN, so a row a kernel forgets to write fails a test."""
    ok_utils.POISON_OUTPUTS = True
    yield
    ok_utils.POISON_OUTPUTS = False


@pytest.fixture(autouse=True)
def release_gpu_memory(request):
    """After a GPU test at production size (~20 GB), hand its cached blocks back: the CUDA run
    has several pytest-xdist processes on one GPU, and each process's caching allocator would
    otherwise keep the memory of its largest test for the rest of the run."""
    yield
    if HAS_CUDA and "gpu" in request.keywords:
        torch.cuda.empty_cache()
