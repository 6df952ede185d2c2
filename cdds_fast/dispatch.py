"""Backend dispatch: ``"auto"`` picks Triton for CUDA tensors (and for CPU tensors when the Triton
interpreter is on), the plain-PyTorch reference otherwise."""

from __future__ import annotations

import torch

from cdds_fast.contract import KERNEL_DTYPES
from cdds_fast.kernels.launch import device_supports_triton

BACKENDS = ("auto", "triton", "reference")


def check_backend(backend: object) -> None:
    """``backend`` is one of :data:`BACKENDS` (loss modules check it when they are built)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Return ``"triton"`` or ``"reference"`` for tensors on ``device``.

    ``dtype`` is the one the inputs promote to: outside ``KERNEL_DTYPES`` (float64) it always takes
    the reference (docs/method.md decision 4).
    ``backend="triton"`` on a device Triton cannot run on is an error, not a silent fallback.
    """
    check_backend(backend)
    if backend == "reference":
        return "reference"
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return "reference"
    ok = device_supports_triton(device)
    if backend == "triton" and not ok:
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) and an "
            f"installed triton; got tensors on device {device}"
        )
    return "triton" if ok else "reference"
