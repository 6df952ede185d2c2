"""Test configuration.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is decided here,
at the top of the first module pytest imports. With CUDA present the kernels run natively; without
it they run through the Triton interpreter on CPU tensors.
"""

from __future__ import annotations

import os

# The Triton interpreter runs many tiny numpy matmuls; with OpenBLAS threads contending with
# torch's OpenMP threads they run ~1000x slower on 2 cores. Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cdds_fast.kernels import launch  # noqa: E402  (after TRITON_INTERPRET is decided)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Every buffer a kernel must fill starts as NaN in the tests (kernels/launch.py: scratch): a slot
# a kernel forgets to write, or reads before writing, shows up instead of passing unnoticed.
launch.POISON_SCRATCH = True


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="slow (GPU-size) test: run with --runslow or on CUDA")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE
