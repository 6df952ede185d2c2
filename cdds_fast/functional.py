"""Functional API: ``cdds_loss`` and ``info_nce``, each checking its inputs once and picking
the backend with :func:`cdds_fast.dispatch.resolve_backend`."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from cdds_fast.chunked_sampling import related_sampling_chunked
from cdds_fast.contract import Contrastive, check_cdds_values, validate_cdds_inputs
from cdds_fast.contrastive import info_nce, info_nce_gathered
from cdds_fast.dispatch import resolve_backend
from cdds_fast.reference import cdds_loss as _reference_cdds_loss

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
    """CDDS loss terms (docs/method.md section 5), already weighted; see
    :func:`cdds_fast.reference.cdds_loss`.

    Shapes: image ``[B, P, D]``, text ``[B, L, D]``, ``text_mask`` bool ``[B, L]`` (True = valid,
    at least one per row), the six parameter vectors ``[D]``.

    Args:
        logit_scale: CLIP's *exponentiated* scale (``model.logit_scale.exp()``), a 0-d tensor or
            a number, finite and > 0.
        a_c, a_s, a_m, a_f, tau_kl, rho: as :class:`cdds_fast.CDDSLoss` (refused outside their
            ranges, docs/method.md section 7).
        backend: ``"auto"`` (Triton for CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
            reference otherwise), ``"triton"`` or ``"reference"`` (the reference's ops, with its
            ``[B, D, D]`` matrices built a bounded chunk of pairs at a time:
            :mod:`cdds_fast.chunked_sampling`).
        check_finite: ``True`` reads the inputs on the host and raises ``ValueError`` on
            non-finite values and on a ``logit_scale`` tensor that is not > 0 (on CUDA: a device
            synchronisation). ``False``: those value checks are device-side assertions that
            nothing waits for. ``None`` (default): ``True`` on the reference backend, ``False`` on
            Triton.
        contrastive: InfoNCE used for the two contrastive terms (``CDDSLoss`` passes a gathering one
            under DDP). Default: the backend's local InfoNCE.
    Returns:
        dict ``contrastive_loss, semantic_loss, modality_loss, completeness_loss,
        x_completeness_loss`` of 0-d float32 tensors whose sum is the total loss.
    """
    inputs = dict(
        image_tokens=image_tokens,
        image_semantic=image_semantic,
        image_modality=image_modality,
        text_tokens=text_tokens,
        text_semantic=text_semantic,
        text_modality=text_modality,
        text_mask=text_mask,
        alpha_image=alpha_image,
        alpha_text=alpha_text,
        w_s_image=w_s_image,
        w_m_image=w_m_image,
        w_s_text=w_s_text,
        w_m_text=w_m_text,
        logit_scale=logit_scale,
    )
    hyper = dict(a_c=a_c, a_s=a_s, a_m=a_m, a_f=a_f, tau_kl=tau_kl, rho=rho)
    validate_cdds_inputs(inputs, **hyper)
    # the dtype every input promotes to: float64 anywhere takes the reference
    dtype = functools.reduce(
        torch.promote_types,
        (t.dtype for t in inputs.values() if isinstance(t, Tensor) and t.is_floating_point()),
    )
    chosen = resolve_backend(backend, image_tokens.device, dtype)
    if check_finite is None:
        check_finite = chosen == "reference"
    # the fast path's kernels count every row's valid tokens and read the scale anyway, and
    # assert both in one flag; a caller's contrastive leaves the scale out of the kernels
    fast = chosen == "triton"
    check_cdds_values(
        inputs, host=check_finite, mask_in_kernel=fast, scale_in_kernel=fast and contrastive is None
    )
    # Callers often sit inside an autocast region (open_clip's trainer does); the loss handles
    # precision itself (fp32 statistics and reductions, docs/method.md decision 4), so autocast
    # is off here.
    with torch.autocast(device_type=image_tokens.device.type, enabled=False):
        if chosen == "reference":
            # the reference's ops, its [B, D, D] matrices a bounded chunk of pairs at a time
            return _reference_cdds_loss(
                **inputs,
                **hyper,
                contrastive=contrastive,
                related_sampling=related_sampling_chunked,
            )
        from cdds_fast.fused_loss import cdds_loss_triton

        return cdds_loss_triton(**inputs, **hyper, contrastive=contrastive)
