"""pytest-benchmark suites: small sizes on the CPU reference paths, the GPU sizes on CUDA.

Every timed call synchronises the device before returning, so CUDA timings are real.
"""

from __future__ import annotations

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()
