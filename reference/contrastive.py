"""Reference pooled features and symmetric InfoNCE (docs/method.md section 5; open_clip
``ClipLoss``'s math)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import compute_dtype, masked_mean


def pool(y: Tensor, mask: Tensor | None = None) -> Tensor:
    """L2-normalised masked mean over tokens.

    Args:
        y: ``[B, N, D]`` token features.
        mask: ``[B, N]`` bool or None (all valid).
    Returns:
        ``[B, D]`` unit vectors in the compute dtype (float32, or float64 for float64 input).
        ``F.normalize``'s ``eps = 1e-12`` guards an all-zero mean.
    """
    return F.normalize(masked_mean(y, mask), dim=-1)


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE, ``(CE(s a b^T, arange) + CE(s b a^T, arange)) / 2``.

    Exactly open_clip's ``ClipLoss`` (single process) computed in the compute dtype.

    Args:
        a: ``[B, D]`` features (L2-normalised by the caller).
        b: ``[B, D]`` features of the paired modality.
        logit_scale: exponentiated scale, a 0-d tensor or a number.
    Returns:
        0-d loss. ``B = 1`` gives exactly 0.
    """
    cd = compute_dtype(a, b)
    a = a.to(cd)
    b = b.to(cd)
    scale = logit_scale.to(cd) if isinstance(logit_scale, Tensor) else logit_scale
    logits = scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def info_nce_gathered(
    local_a: Tensor,
    local_b: Tensor,
    all_a: Tensor,
    all_b: Tensor,
    logit_scale: Tensor | float,
    *,
    local_loss: bool,
    rank: int,
) -> Tensor:
    """InfoNCE over gathered features with open_clip's ``local_loss`` semantics.

    ``local_loss=True``: rows are this rank's samples against all gathered columns, labels
    ``arange(B) + B * rank``. ``local_loss=False``: the full gathered square.

    Args:
        local_a, local_b: ``[B, D]`` this rank's features.
        all_a, all_b: ``[world * B, D]`` gathered features.
    Returns:
        0-d loss.
    """
    if not local_loss:
        return info_nce(all_a, all_b, logit_scale)
    cd = compute_dtype(local_a, local_b, all_a, all_b)
    scale = logit_scale.to(cd) if isinstance(logit_scale, Tensor) else logit_scale
    logits_a = scale * local_a.to(cd) @ all_b.to(cd).T
    logits_b = scale * local_b.to(cd) @ all_a.to(cd).T
    labels = torch.arange(local_a.shape[0], device=local_a.device) + local_a.shape[0] * rank
    return (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2
