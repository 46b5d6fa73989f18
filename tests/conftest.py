"""Test setup: the real Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of this file.
GPU-marked tests run only where CUDA is available (they are skipped elsewhere); on a GPU
machine, run them with the interpreter off: ``TRITON_INTERPRET=0 pytest -m gpu``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import opo_kernels.utils as ok_utils  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] in ("0", "")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (and TRITON_INTERPRET=0)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts as NaN, so a row a kernel forgets to write fails a test."""
    ok_utils.POISON_OUTPUTS = True
    yield
    ok_utils.POISON_OUTPUTS = False


@pytest.fixture
def device():
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")
