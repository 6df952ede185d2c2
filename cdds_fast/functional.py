"""Functional API: ``cdds_loss`` and ``info_nce`` with backend dispatch."""

from __future__ import annotations

from cdds_fast.contrastive import info_nce, info_nce_gathered

import torch
from torch import Tensor

from cdds_fast.dispatch import resolve_backend
from cdds_fast.reference import cdds_loss as _reference_cdds_loss
from cdds_fast.reference.loss import Contrastive

__all__ = ["cdds_loss", "info_nce", "info_nce_gathered"]


def cdds_loss(
    image_tokens: Tensor,
    image_semantic: Tensor,
    image_modality: Tensor,
    text_tokens: Tensor,
    text_semantic: Tensor,
    text_modality: Tensor,
    text_mask: Tensor,
    *,
    alpha_image: Tensor,
    alpha_text: Tensor,
    w_s_image: Tensor,
    w_m_image: Tensor,
    w_s_text: Tensor,
    w_m_text: Tensor,
    logit_scale: Tensor | float,
    a_c: float = 1.0,
    a_s: float = 1.0,
    a_m: float = 0.1,
    a_f: float = 0.5,
    tau_kl: float = 1.0,
    rho: float = 0.01,
    backend: str = "auto",
    check_finite: bool | None = None,
    contrastive: Contrastive | None = None,
) -> dict[str, Tensor]:
    """CDDS loss terms (spec section 6), already weighted; see :func:`cdds_fast.reference.cdds_loss`.

    Shapes: image ``[B, P, D]``, text ``[B, L, D]``, ``text_mask`` bool ``[B, L]``, the six
    parameter vectors ``[D]``, ``logit_scale`` 0-d.

    Args:
        backend: ``"auto"`` (Triton for CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
            reference otherwise), ``"triton"`` or ``"reference"``.
        check_finite: raise on non-finite inputs; default True for the reference, False for Triton
            (the check costs a device sync).
        contrastive: InfoNCE used for the two contrastive terms (``CDDSLoss`` passes a gathering one
            under DDP). Default: the backend's local InfoNCE.
    Returns:
        dict ``contrastive_loss, semantic_loss, modality_loss, completeness_loss,
        x_completeness_loss`` of 0-d float32 tensors whose sum is the total loss.
    """
    chosen = resolve_backend(backend, image_tokens.device, image_tokens.dtype)
    kwargs = dict(
        alpha_image=alpha_image, alpha_text=alpha_text, w_s_image=w_s_image,
        w_m_image=w_m_image, w_s_text=w_s_text, w_m_text=w_m_text, logit_scale=logit_scale,
        a_c=a_c, a_s=a_s, a_m=a_m, a_f=a_f, tau_kl=tau_kl, rho=rho, contrastive=contrastive,
    )
    tensors = (image_tokens, image_semantic, image_modality, text_tokens, text_semantic,
               text_modality, text_mask)
    # Callers often sit inside an autocast region (open_clip's trainer does); the loss handles
    # precision itself (fp32 statistics and reductions, spec section 9), so autocast is off here.
    with torch.autocast(device_type=image_tokens.device.type, enabled=False):
        if chosen == "reference":
            return _reference_cdds_loss(
                *tensors, check_finite=True if check_finite is None else check_finite, **kwargs
            )
        from cdds_fast.fused_loss import cdds_loss_triton

        return cdds_loss_triton(
            *tensors, check_finite=False if check_finite is None else check_finite, **kwargs
        )
