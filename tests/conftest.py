"""Test setup: without a GPU, the real Triton kernels run on CPU tensors through the
interpreter; with one, every test runs the compiled kernels on CUDA tensors (``device``).

TRITON_INTERPRET must be set before triton is first imported, hence at the top of this file
(importing torch does not import triton). GPU-marked tests are skipped without CUDA.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("0", "")
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import opo_kernels.utils as ok_utils  # noqa: E402


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
