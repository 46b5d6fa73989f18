"""Test setup.

By default the real Triton kernels run on CPU tensors through the interpreter
(TRITON_INTERPRET=1 is set here, before triton is first imported; importing torch does not
import triton). GPU-marked tests need CUDA and the compiled kernels: run them on a GPU machine
with ``TRITON_INTERPRET=0 python -m pytest -m gpu``. Each mode skips the other's tests,
except tests marked ``anydevice`` (they pick CUDA when it is there, and run in both modes).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import opo_kernels.utils as ok_utils  # noqa: E402

INTERPRETER = ok_utils.interpreter_on()
HAS_CUDA = torch.cuda.is_available() and not INTERPRETER


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA and TRITON_INTERPRET=0")
    skip_cpu = pytest.mark.skip(reason="CPU test: runs with the interpreter (TRITON_INTERPRET=1)")
    for item in items:
        if "gpu" in item.keywords:
            if not HAS_CUDA:
                item.add_marker(skip_gpu)
        elif not INTERPRETER and "anydevice" not in item.keywords:
            item.add_marker(skip_cpu)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts as NaN, so a row a kernel forgets to write fails a test."""
    ok_utils.POISON_OUTPUTS = True
    yield
    ok_utils.POISON_OUTPUTS = False
