"""Launch settings shared by every kernel: block sizes, warps, interpreter detection.

One place decides how a row of length ``n`` is tiled, so no kernel file hard-codes its own rule.
"""

from __future__ import annotations

import os

import torch


def interpreter_active() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing (macOS, Windows)
        return False
    return True


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_for(n: int, *, cap: int = 1024, floor: int = 16) -> int:
    """Smallest power of two >= n, clamped to [floor, cap]; Triton tiles need powers of two."""
    return max(floor, min(cap, next_power_of_2(n)))


def num_warps_for(block_elems: int) -> int:
    """Warps for a program that owns ``block_elems`` elements (as in the fused-softmax tutorial)."""
    if block_elems >= 16384:
        return 16
    if block_elems >= 4096:
        return 8
    if block_elems >= 1024:
        return 4
    return 2


def device_supports_triton(device: torch.device) -> bool:
    """CUDA tensors always can; CPU tensors only through the interpreter."""
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreter_active())
