"""The CDDS loss on the Triton kernels: ``backend="triton"`` of
:func:`cdds_fast.functional.cdds_loss`.

Same function as :func:`cdds_fast.reference.cdds_loss` (spec sections 3-6), computed without ever
materialising the ``[B, D, D]`` relation matrices or the ``[B, N, D]`` x-semantic components:

1. column statistics ``mu, s`` of both semantic components (``kernels/stats.py``);
2. related weights and sampling coefficients ``c, a`` of both directions, fused
   (``kernels/sampling.py``);
3. pooled features from the statistics alone: ``pool(X^s) = normalize(mu)`` (the masked mean *is*
   ``mu``) and ``pool(X^x) = normalize(c)`` (spec section 5: the masked mean of ``X^x`` is ``c``);
4. the three InfoNCE terms through ``contrastive`` (default: the Triton InfoNCE);
5. ``L_f``, ``L_x`` and ``L_m`` of each modality in one fused pass over ``(X, X^s, X^m)``
   (``kernels/constraints.py``).

float64 inputs are routed to the reference (spec section 9).

Cost at ``(B, P, L, D) = (256, 50, 77, 512)`` bf16 (bytes from HBM, both modalities): stats
forward 33 MB and backward 67 MB, constraints forward 100 MB and backward 200 MB, plus 100 MB for
autograd's sum of the two ``X^s`` gradients (the stats backward and the constraints backward each
write one; they cannot share a kernel because the statistics' gradients are complete only after
the sampling backward has run) -- about 0.5 GB, ~170 us at 3 TB/s, the floor of this path besides
the sampling and InfoNCE kernels and a few dozen small ``[B, D]`` ops (term weights, autograd's
gradient sums); the four pooled-feature normalisations are one ``l2_normalize`` launch.
Extra memory beyond the gradients: one ``X^s``-sized gradient before that sum plus ~15 MB of
``[B, D]`` partials; the ``[B, D, D]`` and ``[B, N, D]`` fp32 tensors of the reference never exist.

Behaviour at the edges equals the reference's, including where the reference is NaN: if modality
components are so large that a softmax column ``qbar_d`` underflows to exactly 0, ``L_m`` is NaN on
both paths (``log 0`` in ``KL(q || qbar)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdds_fast.kernels.contrastive import info_nce_triton
from cdds_fast.kernels.constraints import constraint_losses
from cdds_fast.kernels.normalize import l2_normalize
from cdds_fast.kernels.sampling import related_sampling
from cdds_fast.kernels.stats import column_stats
from cdds_fast.reference import cdds_loss as _reference_cdds_loss
from cdds_fast.reference.loss import Contrastive
from cdds_fast.reference.validation import validate_cdds_inputs


def _default_contrastive() -> Contrastive:
    # the kernels' own entry point: the loss validated its inputs (logit_scale included) already
    return info_nce_triton


def cdds_loss_triton(
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
    check_finite: bool = False,
    contrastive: Contrastive | None = None,
) -> dict[str, Tensor]:
    """The CDDS loss terms, already weighted, on the Triton kernels.

    Arguments, shapes and returns as :func:`cdds_fast.reference.cdds_loss` (image ``[B, P, D]``,
    text ``[B, L, D]``, ``text_mask`` bool ``[B, L]``, the six parameter vectors ``[D]``,
    ``logit_scale`` 0-d or a number); tensors may be fp32/bf16/fp16 (mixed), any strides.
    ``check_finite`` defaults to False here (the check costs a device synchronisation).
    ``contrastive`` defaults to :func:`cdds_fast.kernels.contrastive.info_nce_triton`.

    Returns:
        dict ``contrastive_loss, semantic_loss, modality_loss, completeness_loss,
        x_completeness_loss`` of 0-d float32 tensors whose sum is the total loss.
    """
    validate_cdds_inputs(
        image_tokens=image_tokens, image_semantic=image_semantic, image_modality=image_modality,
        text_tokens=text_tokens, text_semantic=text_semantic, text_modality=text_modality,
        text_mask=text_mask, alpha_image=alpha_image, alpha_text=alpha_text,
        w_s_image=w_s_image, w_m_image=w_m_image, w_s_text=w_s_text, w_m_text=w_m_text,
        logit_scale=logit_scale, tau_kl=tau_kl, rho=rho, a_c=a_c, a_s=a_s, a_m=a_m, a_f=a_f,
        finite=check_finite,
    )
    tensors = (image_tokens, image_semantic, image_modality, text_tokens, text_semantic,
               text_modality)
    params = dict(alpha_image=alpha_image, alpha_text=alpha_text, w_s_image=w_s_image,
                  w_m_image=w_m_image, w_s_text=w_s_text, w_m_text=w_m_text)
    if any(t.dtype == torch.float64 for t in (*tensors, *params.values())) or (
        isinstance(logit_scale, Tensor) and logit_scale.dtype == torch.float64
    ):
        return _reference_cdds_loss(
            *tensors, text_mask, **params, logit_scale=logit_scale, a_c=a_c, a_s=a_s, a_m=a_m,
            a_f=a_f, tau_kl=tau_kl, rho=rho, check_finite=False, contrastive=contrastive,
        )
    contrastive = contrastive or _default_contrastive()
    v, v_s, v_m, t, t_s, t_m = (x.contiguous() for x in tensors)
    mask = text_mask.contiguous()

    # Section 3: column statistics. Sections 4-5: related weights -> sampling coefficients c, a.
    mu_v, s_v = column_stats(v_s)
    mu_t, s_t = column_stats(t_s, mask)
    c_v, a_v, c_t, a_t = related_sampling(
        mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, tau_kl=tau_kl, rho=rho
    )

    # Section 6, contrastive terms on the pooled features: pool(X^s) = normalize(mu),
    # pool(X^x) = normalize(c).
    # (the four normalisations as one launch each way: l2_normalize of the stacked [4, B, D])
    image_feat, text_feat, image_x_feat, text_x_feat = l2_normalize(
        torch.stack((mu_v, mu_t, c_v, c_t))
    ).unbind(0)
    l_clip = contrastive(image_feat, text_feat, logit_scale)
    l_s = (
        contrastive(image_feat, image_x_feat, logit_scale)
        + contrastive(text_feat, text_x_feat, logit_scale)
    ) / 2

    # Section 6, constraint losses: (L_f, L_x, L_m) per modality in one fused pass each.
    image_terms = constraint_losses(v, v_s, v_m, w_s_image, w_m_image, mu_v, s_v, c_v, a_v)
    text_terms = constraint_losses(t, t_s, t_m, w_s_text, w_m_text, mu_t, s_t, c_t, a_t, mask)
    l_f, l_x, l_m = ((image_terms + text_terms) / 2).unbind()
    return {
        "contrastive_loss": a_c * l_clip,
        "semantic_loss": a_s * l_s,
        "modality_loss": a_m * l_m,
        "completeness_loss": a_f * l_f,
        "x_completeness_loss": (1.0 - a_f) * l_x,
    }
