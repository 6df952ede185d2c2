"""Reference distribution sampling: x-semantic components (docs/method.md section 4).

``X^x[b,n,i] = sum_j W[b,i,j] (mu_o[b,j] + s_o[b,j] * zeta[b,n,i]) = c[b,i] + a[b,i] * zeta[b,n,i]``
with ``zeta = (X^s - mu) / s`` the standard score of each value in its own column distribution,
``c = W mu_o`` and ``a = W s_o`` (``o`` = the other modality). The masked mean of ``X^x`` over
tokens is ``c`` exactly, because the standard scores of a column have masked mean 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import compute_dtype


def sampling_coefficients(
    weights: Tensor, mu_other: Tensor, s_other: Tensor
) -> tuple[Tensor, Tensor]:
    """``c = W mu_o`` and ``a = W s_o`` per pair.

    Args:
        weights: ``[B, D, D]`` related weights ``W`` (rows: this modality's columns).
        mu_other, s_other: ``[B, D]`` statistics of the other modality.
    Returns:
        ``(c, a)``, each ``[B, D]``.
    """
    cd = compute_dtype(weights, mu_other, s_other)
    w = weights.to(cd)
    c = torch.einsum("bij,bj->bi", w, mu_other.to(cd))
    a = torch.einsum("bij,bj->bi", w, s_other.to(cd))
    return c, a


def x_semantic(semantic: Tensor, mu: Tensor, s: Tensor, c: Tensor, a: Tensor) -> Tensor:
    """The x-semantic component ``X^x = c + a * (X^s - mu) / s``.

    Args:
        semantic: ``[B, N, D]`` this modality's semantic component ``X^s``.
        mu, s: ``[B, D]`` its column statistics.
        c, a: ``[B, D]`` sampling coefficients from :func:`sampling_coefficients`.
    Returns:
        ``[B, N, D]`` in the compute dtype (padded tokens hold values too; callers mask them).
    """
    cd = compute_dtype(semantic, mu, s, c, a)
    zeta = (semantic.to(cd) - mu.to(cd).unsqueeze(1)) / s.to(cd).unsqueeze(1)
    return c.to(cd).unsqueeze(1) + a.to(cd).unsqueeze(1) * zeta
