"""Triton helpers shared by the kernels that walk the tokens of a pair (``stats.py``,
``constraints.py``)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def valid_tokens(M, pid_b, rows, n_end, N, HAS_MASK: tl.constexpr):
    """Which of ``rows`` are tokens to use: below ``n_end`` and, with a mask (``M`` ``[B, N]``
    uint8, row ``pid_b``), marked valid. Masked tokens are never loaded by the callers."""
    ok = rows < n_end
    if HAS_MASK:
        ok = ok & (tl.load(M + pid_b * N + rows, mask=ok, other=0) != 0)
    return ok
