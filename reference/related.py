"""Reference related-semantics weights (docs/method.md section 3).

For one direction (source modality -> destination modality) and each pair ``b``:

``S[b,i,j] = KL(N(mu_src[b,i], s_src[b,i]^2) || N(mu_dst[b,j], s_dst[b,j]^2))``
``Pr[b,i,j] = softmax_j(-S[b,i,j] / tau_kl)``
``k[b,i] = min(mean_j Pr + alpha[i] * std_j Pr, (1 - rho) * max_j Pr)``
``W[b,i,:] = relu(Pr[b,i,:] - k[b,i]) / sum_j relu(Pr[b,i,j] - k[b,i])``

This reference materialises the ``[B, D, D]`` matrices; the Triton path never does.

Gradient conventions at non-differentiable points (docs/method.md, "decisions"):
- ``std`` of a constant row (variance exactly 0, e.g. D = 1) has gradient 0, not inf/NaN.
- ``min`` and ``max`` split the gradient equally among tied arguments (PyTorch's convention).
- ``relu`` has gradient 0 at 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import compute_dtype


def gaussian_kl(mu_src: Tensor, s_src: Tensor, mu_dst: Tensor, s_dst: Tensor) -> Tensor:
    """Pairwise ``KL(N(mu_src_i, s_src_i^2) || N(mu_dst_j, s_dst_j^2))``.

    Args:
        mu_src, s_src: ``[B, D]``; mu_dst, s_dst: ``[B, D]``.
    Returns:
        ``[B, D, D]`` indexed ``[b, i (src), j (dst)]``.
    """
    ms, ss = mu_src.unsqueeze(-1), s_src.unsqueeze(-1)
    md, sd = mu_dst.unsqueeze(-2), s_dst.unsqueeze(-2)
    return torch.log(sd / ss) + (ss**2 + (ms - md) ** 2) / (2 * sd**2) - 0.5


def _std_zero_safe(var: Tensor) -> Tensor:
    """sqrt(var) whose gradient is 0 (not inf) where var == 0."""
    positive = var > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), 0.0)


def related_probabilities(
    mu_src: Tensor, s_src: Tensor, mu_dst: Tensor, s_dst: Tensor, *, tau_kl: float = 1.0
) -> Tensor:
    """``Pr = softmax_j(-KL / tau_kl)``, ``[B, D, D]``."""
    return torch.softmax(-gaussian_kl(mu_src, s_src, mu_dst, s_dst) / tau_kl, dim=-1)


def related_weights(
    mu_src: Tensor,
    s_src: Tensor,
    mu_dst: Tensor,
    s_dst: Tensor,
    alpha: Tensor,
    *,
    tau_kl: float = 1.0,
    rho: float = 0.01,
) -> Tensor:
    """Soft-thresholded, row-normalised related weights ``W`` (docs/method.md section 3).

    Args:
        mu_src, s_src: ``[B, D]`` statistics of the source modality (rows ``i``).
        mu_dst, s_dst: ``[B, D]`` statistics of the destination modality (columns ``j``).
        alpha: ``[D]`` learnable threshold scale of the source modality.
        tau_kl: softmax temperature on ``-KL``.
        rho: the threshold never exceeds ``(1 - rho) * max_j Pr`` (the strongest relation survives).
    Returns:
        ``W`` ``[B, D, D]``: ``W >= 0``, every row sums to 1 and has at least one non-zero.
    """
    cd = compute_dtype(mu_src, s_src, mu_dst, s_dst)
    pr = related_probabilities(
        mu_src.to(cd), s_src.to(cd), mu_dst.to(cd), s_dst.to(cd), tau_kl=tau_kl
    )
    mean = pr.mean(-1)
    std = _std_zero_safe(((pr - mean.unsqueeze(-1)) ** 2).mean(-1))
    threshold = torch.minimum(mean + alpha.to(cd) * std, (1.0 - rho) * pr.amax(-1))
    above = torch.relu(pr - threshold.unsqueeze(-1))
    return above / above.sum(-1, keepdim=True)
