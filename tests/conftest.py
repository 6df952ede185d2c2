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
if os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreter rounds like sm_90 (what it emulates: tests/sm90_rounding.py), so a kernel
    # that leans on IEEE results fails here rather than on the rare GPU run
    from tests import sm90_rounding  # noqa: E402

    sm90_rounding.install()

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Every buffer a kernel fills starts as NaN in the tests: with deterministic algorithms on,
# PyTorch fills the memory torch.empty & co. return (floating point with NaN, integers with their
# largest value: torch.utils.deterministic.fill_uninitialized_memory), so a slot a kernel forgets
# to write, or reads before writing, shows up in the results instead of passing unnoticed.
# warn_only: an op without a deterministic implementation warns instead of raising.
torch.use_deterministic_algorithms(True, warn_only=True)
torch.utils.deterministic.fill_uninitialized_memory = True


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


@pytest.fixture
def row_block_cap(monkeypatch):
    """``row_block_cap(width)``: the token passes (kernels/constraints.py) hold rows of at most
    ``width`` features in one block for the rest of the test, so a small ``D`` reaches the
    chunked-row path (row-LSE pass, ``D`` loops) that real widths reach above 2048 / 4096."""
    from cdds_fast.kernels import constraints

    def lower(width: int) -> None:
        monkeypatch.setattr(constraints, "_row_block_cap", lambda device: width)

    return lower
