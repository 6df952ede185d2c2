"""Reference decoupling-constraint losses (docs/method.md section 5): modality KL ``L_m`` and the
reconstruction (completeness) loss used for ``L_f`` and ``L_x``."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import compute_dtype, token_weights


def modality_kl(modality: Tensor, mask: Tensor | None = None) -> Tensor:
    """``L_m`` of one modality: mean over valid tokens of ``KL(q_n || qbar)``.

    ``q_n = softmax_d(X^m[b, n, :])``; ``qbar`` is the mean of ``q_n`` over all valid tokens of the
    (local) batch. The gradient flows through ``qbar`` too.

    Args:
        modality: ``[B, N, D]`` modality components ``X^m``.
        mask: ``[B, N]`` bool or None (all valid).
    Returns:
        0-d loss in the compute dtype.
    """
    x = modality.to(compute_dtype(modality))
    m = token_weights(mask, x)
    count = m.sum()
    log_q = torch.log_softmax(x, dim=-1)
    q = log_q.exp()
    q_bar = (q * m).sum((0, 1)) / count
    kl = (q * (log_q - torch.log(q_bar))).sum(-1, keepdim=True)
    return (kl * m).sum() / count


def reconstruction_loss(
    tokens: Tensor,
    semantic: Tensor,
    modality: Tensor,
    w_s: Tensor,
    w_m: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Completeness loss: mean over valid tokens of ``mean_d (w_s X^s + w_m X^m - X)^2``.

    With ``semantic = X^x`` this is ``L_x``'s per-modality term.

    Args:
        tokens: ``[B, N, D]`` the tokens ``X`` the decoupler saw.
        semantic: ``[B, N, D]`` ``X^s`` (or ``X^x``).
        modality: ``[B, N, D]`` ``X^m``.
        w_s, w_m: ``[D]`` learnable reconstruction weights.
        mask: ``[B, N]`` bool or None (all valid).
    Returns:
        0-d loss in the compute dtype.
    """
    cd = compute_dtype(tokens, semantic, modality, w_s, w_m)
    residual = w_s.to(cd) * semantic.to(cd) + w_m.to(cd) * modality.to(cd) - tokens.to(cd)
    m = token_weights(mask, residual)
    per_token = (residual**2).mean(-1, keepdim=True)
    return (per_token * m).sum() / m.sum()
