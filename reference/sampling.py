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
from .related import related_weights


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


def related_sampling(
    mu_v: Tensor,
    s_v: Tensor,
    mu_t: Tensor,
    s_t: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    *,
    tau_kl: float = 1.0,
    rho: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both directions of sections 3-4 from the column statistics: ``(c_v, a_v, c_t, a_t)`` with
    ``c_v = W_v mu_t``, ``a_v = W_v s_t`` (image -> text, ``alpha_image``) and ``c_t = W_t mu_v``,
    ``a_t = W_t s_v`` (text -> image, ``alpha_text``), each ``[B, D]``.

    The only part of the loss that builds ``[B, D, D]`` matrices; it is per pair, so any split of
    the batch computes the same function (``cdds_fast.chunked_sampling`` relies on that)."""
    w_v = related_weights(mu_v, s_v, mu_t, s_t, alpha_image, tau_kl=tau_kl, rho=rho)
    w_t = related_weights(mu_t, s_t, mu_v, s_v, alpha_text, tau_kl=tau_kl, rho=rho)
    return (*sampling_coefficients(w_v, mu_t, s_t), *sampling_coefficients(w_t, mu_v, s_v))
