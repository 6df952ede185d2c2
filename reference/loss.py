"""Reference CDDS loss (docs/method.md sections 2-5): the function every backend is tested
against. It computes; it does not check its inputs (the API does that before calling it:
``cdds_fast.functional.cdds_loss``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .common import compute_dtype
from .constraints import modality_kl, reconstruction_loss
from .contrastive import info_nce, pool
from .sampling import related_sampling as _related_sampling
from .sampling import x_semantic
from .stats import column_stats


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
    contrastive: Callable[[Tensor, Tensor, Tensor | float], Tensor] | None = None,
    related_sampling: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """The CDDS loss, term by term, already weighted (their sum is the total ``L``).

    Args:
        image_tokens, image_semantic, image_modality: ``[B, P, D]`` ``V``, ``V^s``, ``V^m``.
        text_tokens, text_semantic, text_modality: ``[B, L, D]`` ``T``, ``T^s``, ``T^m``.
        text_mask: ``[B, L]`` bool, True = valid token, at least one per row.
        alpha_image, alpha_text: ``[D]`` threshold scales. w_*: ``[D]`` reconstruction weights.
        logit_scale: CLIP's exponentiated logit scale (``model.logit_scale.exp()``), a 0-d
            tensor or a number, finite and > 0.
        a_c, a_s, a_m, a_f: term weights; ``L = a_c L_clip + a_s L_s + a_m L_m + a_f L_f
            + (1 - a_f) L_x``.
        tau_kl, rho: related-weights temperature and threshold clamp (docs/method.md section 3).
        contrastive: ``f(a, b, logit_scale) -> loss`` for the two InfoNCE terms; default the local
            :func:`info_nce`. ``CDDSLoss`` passes a gathering version under DDP
            (docs/method.md section 6).
        related_sampling: computes ``(c_v, a_v, c_t, a_t)`` from the column statistics, with
            :func:`related_sampling`'s signature; default that function. The API's reference
            backend passes one that builds the ``[B, D, D]`` matrices a bounded chunk of pairs at
            a time (``cdds_fast.chunked_sampling``).
    Returns:
        dict with keys ``contrastive_loss, semantic_loss, modality_loss, completeness_loss,
        x_completeness_loss``, each a 0-d float32 tensor (float64 for float64 inputs).
    """
    contrastive = contrastive or info_nce
    related_sampling = related_sampling or _related_sampling
    mask = text_mask
    # Every input is widened to the compute dtype ONCE, so the gradients of its several uses are
    # added in fp32 and rounded to the input dtype once. Casting per use made autograd add 16-bit
    # partial gradients, which overflow where they are large and cancel (inf - inf = NaN in fp16
    # although the gradient itself is ~10: found by the fuzz test at D = 2).
    inputs = (
        image_tokens,
        image_semantic,
        image_modality,
        text_tokens,
        text_semantic,
        text_modality,
        alpha_image,
        alpha_text,
        w_s_image,
        w_m_image,
        w_s_text,
        w_m_text,
    )
    cd = compute_dtype(*inputs)
    (
        image_tokens,
        image_semantic,
        image_modality,
        text_tokens,
        text_semantic,
        text_modality,
        alpha_image,
        alpha_text,
        w_s_image,
        w_m_image,
        w_s_text,
        w_m_text,
    ) = (t.to(cd) for t in inputs)

    # docs/method.md section 2: column statistics of the semantic components.
    mu_v, s_v = column_stats(image_semantic)
    mu_t, s_t = column_stats(text_semantic, mask)
    # Sections 3 and 4: related weights, both directions, and x-semantic components.
    c_v, a_v, c_t, a_t = related_sampling(
        mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, tau_kl=tau_kl, rho=rho
    )
    image_x = x_semantic(image_semantic, mu_v, s_v, c_v, a_v)
    text_x = x_semantic(text_semantic, mu_t, s_t, c_t, a_t)

    # Section 5: losses.
    image_feat, text_feat = pool(image_semantic), pool(text_semantic, mask)
    l_clip = contrastive(image_feat, text_feat, logit_scale)
    l_s = (
        contrastive(image_feat, pool(image_x), logit_scale)
        + contrastive(text_feat, pool(text_x, mask), logit_scale)
    ) / 2
    l_m = (modality_kl(image_modality) + modality_kl(text_modality, mask)) / 2
    l_f = (
        reconstruction_loss(image_tokens, image_semantic, image_modality, w_s_image, w_m_image)
        + reconstruction_loss(text_tokens, text_semantic, text_modality, w_s_text, w_m_text, mask)
    ) / 2
    l_x = (
        reconstruction_loss(image_tokens, image_x, image_modality, w_s_image, w_m_image)
        + reconstruction_loss(text_tokens, text_x, text_modality, w_s_text, w_m_text, mask)
    ) / 2
    return {
        "contrastive_loss": a_c * l_clip,
        "semantic_loss": a_s * l_s,
        "modality_loss": a_m * l_m,
        "completeness_loss": a_f * l_f,
        "x_completeness_loss": (1.0 - a_f) * l_x,
    }
