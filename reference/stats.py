"""Reference column statistics (docs/method.md section 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import compute_dtype, token_weights

STD_EPS = 1e-5  # inside the square root: s = sqrt(var + 1e-5)


def column_stats(semantic: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Masked mean and std of every column (feature) over the tokens of each sample.

    ``mu[b, i] = sum_n m[b, n] X[b, n, i] / sum_n m[b, n]`` and
    ``s[b, i] = sqrt(sum_n m[b, n] (X[b, n, i] - mu[b, i])^2 / sum_n m[b, n] + 1e-5)``
    (population variance, eps inside the root).

    Args:
        semantic: ``[B, N, D]`` semantic components ``X^s``.
        mask: ``[B, N]`` bool (True = valid token) or None (all valid, images).
    Returns:
        ``(mu, s)``, each ``[B, D]`` in float32 (float64 for float64 input).
    """
    x = semantic.to(compute_dtype(semantic))
    m = token_weights(mask, x)
    count = m.sum(1)
    mu = (x * m).sum(1) / count
    var = ((x - mu.unsqueeze(1)) ** 2 * m).sum(1) / count
    return mu, torch.sqrt(var + STD_EPS)
