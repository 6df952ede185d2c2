"""Helpers shared by the kernels that walk the tokens of a pair (``stats.py``,
``constraints.py``) and by their launchers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def valid_tokens(M, pid_b, rows, n_end, N, HAS_MASK: tl.constexpr):
    """Which of ``rows`` are tokens to use: below ``n_end`` and, with a mask (``M`` ``[B, N]``
    uint8, row ``pid_b``), marked valid. Masked tokens are never loaded by the callers."""
    ok = rows < n_end
    if HAS_MASK:
        ok = ok & (tl.load(M + pid_b * N + rows, mask=ok, other=0) != 0)
    return ok


def mask_arg(mask: Tensor | None, like: Tensor) -> Tensor:
    """The ``M`` argument of :func:`valid_tokens`: a bool ``[B, N]`` mask as uint8, or (no mask)
    any tensor as a dummy pointer that is never read (``HAS_MASK`` is a constexpr)."""
    return like if mask is None else mask.contiguous().view(torch.uint8)
