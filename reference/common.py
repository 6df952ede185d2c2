"""Small helpers shared by the reference ops: compute dtype and masked means.

docs/method.md decision 4: statistics and reductions run in float32 for fp32/bf16/fp16 inputs and
in float64 for float64 inputs (the latter exists for ``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def token_weights(mask: Tensor | None, like: Tensor) -> Tensor:
    """Mask ``[B, N]`` (bool, or None = all valid) as ``[B, N, 1]`` weights in ``like``'s dtype."""
    if mask is None:
        return torch.ones(like.shape[0], like.shape[1], 1, dtype=like.dtype, device=like.device)
    return mask.to(like.dtype).unsqueeze(-1)


def masked_mean(y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Masked mean over tokens (docs/method.md, Notation).

    Args:
        y: ``[B, N, D]``; upcast to the compute dtype.
        mask: ``[B, N]`` bool, True = valid token; None = all valid (images).
    Returns:
        ``[B, D]`` in the compute dtype.
    """
    y = y.to(compute_dtype(y))
    m = token_weights(mask, y)
    return (y * m).sum(1) / m.sum(1)
