"""Shared test setup.

Without a GPU the Triton kernels run in the Triton interpreter. ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``pf_kernels`` is first imported,
so it is set here, before any test module imports the package.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_backend():
    """Force ``pf_kernels`` onto its Triton kernels for one test (interpreter on the CPU)."""
    import pf_kernels

    previous = pf_kernels.get_backend()
    pf_kernels.set_backend("triton")
    yield
    pf_kernels.set_backend(previous)


@pytest.fixture
def one_thread():
    """Two busy cores: one intra-op thread avoids oversubscription (and keeps runs comparable).
    Training tests use it for the whole module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
