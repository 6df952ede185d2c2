r"""The CDDS loss on the Triton kernels: ``backend="triton"`` of
:func:`cdds_fast.functional.cdds_loss`.

Same function as :func:`cdds_fast.reference.cdds_loss` (docs/method.md sections 2-5), computed
without ever materialising the ``[B, D, D]`` relation matrices or the ``[B, N, D]`` x-semantic
components, as ONE custom op forward (``cdds_fast::cdds_loss``) and ONE backward
(``cdds_fast::cdds_loss_backward``, registered as its autograd), so ``torch.compile`` sees one
opaque node each way and autograd adds nothing between the kernels. Forward, both modalities in
every launch:

1. ``kernels/constraints.py``: one pass over ``X, X^s, X^m``: the column statistics ``mu, s`` of
   ``X^s`` (section 2), every token sum the constraint losses need (section 5; ``L_x``'s
   ``c, a``-dependent parts are rewritten through ``r_f`` sums) and the per-token log-sum-exp
   of ``X^m``;
2. ``kernels/sampling.py``: related weights and sampling coefficients ``c, a`` of both
   directions (sections 3-4), the pair's ``L_x`` sum, and the pooled features
   ``pool(X^s) = mu / |mu|`` (the masked mean *is* ``mu``) and ``pool(X^x) = c / |c|`` (section 4:
   the masked mean of ``X^x`` is ``c``);
3. the three InfoNCE problems (image, text), (image, image_x), (text, text_x) batched
   (``kernels/contrastive.py``);
4. ``_constraints_finalize_kernel``: the five weighted terms.

Backward: the terms' gradients -> InfoNCE gradients and per-modality coefficients (one small
kernel); the batched InfoNCE backward; the sampling backward (row kernel: also the constraint
gradients of ``c, a, mu, s`` and the pooled features' normalisation; column kernel; the ``[D]``
vector gradients summed over pairs); one pass writing ``grad X, X^s, X^m`` of both modalities.
Every input gradient is written exactly once, in its input's dtype, rounded once (``X^s`` gets
the statistics' and the constraints' terms in one fp32 sum).

Launches at (B, P, L, D) = (256, 50, 77, 512) bf16, counted by
``benchmarks/kernel_resources.py --count-launches`` (tests/test_kernel_resources.py): forward
3 Triton + the batched InfoNCE forward (one kernel + one sum) + the assertion below + the caller's
sum of the five terms (5 aten adds) = 11; backward autograd's ``ones_like`` + 5 Triton + the
batched InfoNCE backward (one kernel + the ``dscale`` sum) = 8. With ``D > 2048`` on a GPU
(``kernels/constraints.py``) the forward adds one row-LSE launch.

Checks
------
This module checks nothing: :func:`cdds_fast.functional.cdds_loss` has checked every argument
once (``cdds_fast.contract``) and routed float64 inputs to the reference (docs/method.md decision
4) before it calls :func:`cdds_loss_triton`. Two value checks it leaves to the kernels here: at
least one valid token per text row, and a ``logit_scale`` tensor finite and > 0, folded into the
finalize kernel (it has every row's token count, and reads the scale) and raised by ONE
device-side ``torch._assert_async``: no synchronisation, CUDA-graph capturable, traced by
``torch.compile(fullgraph=True)``. On CPU tensors a failure raises a RuntimeError naming both (one
flag) at once; on CUDA it surfaces at the next synchronisation as "device-side assert triggered"
and leaves the CUDA context unusable. With ``check_finite=True`` the caller
reads those values on the host instead, before any launch; with a ``contrastive`` of the caller's
the op never sees the scale, and the caller asserts it.

Traffic and memory model (a model, not a measurement; :func:`hbm_traffic`, :func:`memory_model`)
-------------------------------------------------------------------------------------------------
At (B, P, L, D) = (256, 50, 77, 512) bf16; ``E = B (P + L) D = 16.6 M`` elements per token kind
(``X, X^s, X^m``), ``V`` of them valid (masked text tokens are never read):
* forward: ``3 V e`` read once (``X^s`` a second time from L2): 100 MB at ``V = E``;
* backward: ``3 V e`` read (``X^m`` twice, the second time from L1) + ``3 E e`` written (the
  gradients, zeros at masked tokens): 200 MB at ``V = E``;
* fp32 ``[2, B, D]``-sized state (1.05 MB a plane): the token pass writes 9 planes, the
  sampling forward 13 (logit coefficients and per-row statistics), the pooled features 3, the
  backward the InfoNCE gradients (3), the sampling scratch (6), the statistics' gradients (2) and
  per-pair vector-gradient rows (3): 41 MB, each written once and read back by a later kernel of
  the same step (from L2 where it is still resident: counted as one HBM write).
Total: **341 MB with every text token valid** (the token tensors alone: 300 MB), **284 MB with the
benchmarks' text lengths** (uniform in [5, 77]: 53 % of the text tokens valid). The ``[B, D]``
state is what a further cut would have to remove, and its floor is near: short of recomputing a
sweep of the sampling (~20 % more of its instructions for 7 planes) or re-reading the tokens, a
deterministic step must keep ``mu, s, c, a``, the token sums ``F1, FZ``, the row statistics
``m, 1/l, std, Z`` (10 planes), hand the backward token pass ``g_mu, g_s`` (2), the sampling
backward the four pooled features' gradients (2) and its column kernel four per-row scalars
(4), and reduce ``qbar`` and the ``alpha, w_s, w_m`` gradients over pairs through per-pair
partials (4): 22 planes, 23 MB, even with the pooled features normalised inside the InfoNCE
kernels and every other plane folded away. Sampling instructions per
element of the virtual ``[2, B, D, D]``: ~116 (``kernels/sampling.py``); at this shape the
sampling is the compute-bound part (~0.47 ms ALU by the instruction count), the rest bandwidth
bound (~0.07 ms at 4.8 TB/s).
Extra memory above the inputs: the saved state (26.4 MB) plus the larger of the sampling
backward's buffers (14.7 MB) and the token gradients with the statistics' gradients (99.9 +
2.1 MB): **128 MB** peak, gradients included (plus < 64 KB of scalars and partials); the
``[B, D, D]`` and ``[B, N, D]`` fp32 tensors of the reference never exist. At (1024, 50, 77, 512):
513 MB peak, 1.36 GB moved (every text token valid); at (256, 50, 77, 1024): 257 MB, 681 MB.
``tests/test_kernel_resources.py`` checks the buffers the launchers allocate against the model.

Behaviour at the edges equals the reference's, including where the reference is NaN: if modality
components are so large that a softmax column ``qbar_d`` underflows to exactly 0, ``L_m`` is NaN on
both paths (``log 0`` in ``KL(q || qbar)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from cdds_fast.contract import LOSS_KEYS, Contrastive
from cdds_fast.kernels.constraints import (
    N_COL,
    N_PAIR,
    constraints_backward,
    constraints_forward,
    finalize_terms,
    terms_grad,
)
from cdds_fast.kernels.contrastive import nce_backward, nce_forward
from cdds_fast.kernels.sampling import (
    ASH,
    CSH,
    N_PART,
    N_ROW,
    N_SCRATCH,
    sampling_backward,
    sampling_forward,
)

#: The fast path's one device-side assertion (``_constraints_finalize_kernel``'s flag): the two
#: value checks ``contract.check_cdds_values`` leaves to the kernels without ``check_finite``.
_VALUES_MESSAGE = (
    "text_mask: expected at least one valid token per row, or logit_scale: "
    "expected a finite value > 0 (the exponentiated scale, "
    "model.logit_scale.exp()): one of them does not hold"
)
#: The InfoNCE problems of a step: rows x = (image, image, text), columns y = (text, image_x,
#: text_x) of the pooled features (``feat`` [2, 3, B, D] = (x, y)).
N_NCE = 3


# ------------------------------------------------------------------------------------------------
# Memory model
# ------------------------------------------------------------------------------------------------


#: Per-call scalars and partials the model leaves out: the five terms, ``glob``, the backward's
#: coefficients, the InfoNCE finalize and ``dscale`` partials, the six ``[D]`` vector gradients
#: (a few KB at realistic shapes; tests/test_kernel_resources.py bounds them by this).
SMALL_BYTES = 64 * 2**10


class MemoryModel(NamedTuple):
    """Bytes of the fast path's buffers at one shape (fp32 state; gradients in the input dtype).

    ``saved``: forward -> backward state (the token pass's ``col``, ``pair``, ``lse``, the pooled
    features, the sampling's ``row``, the InfoNCE statistics). ``sampling_stage``: the backward's
    buffers alive during the sampling backward (InfoNCE gradients, sampling scratch, the
    statistics' gradients, per-pair vector-gradient rows). ``final_stage``: alive with the token
    gradients during the last kernel (the statistics' gradients). ``gradients``: the six token
    gradients."""

    saved: int
    sampling_stage: int
    final_stage: int
    gradients: int

    @property
    def peak(self) -> int:
        """Peak extra memory of a forward + backward above its inputs, gradients included."""
        return self.saved + max(self.sampling_stage, self.final_stage + self.gradients)


def memory_model(
    batch: int, patches: int, length: int, dim: int, elem_bytes: int = 2
) -> MemoryModel:
    """The buffers ``cdds_loss_triton`` allocates at ``(B, P, L, D)`` with token tensors of
    ``elem_bytes`` bytes (see :class:`MemoryModel`; plus at most :data:`SMALL_BYTES`)."""
    plane = 4 * 2 * batch * dim  # one fp32 [2, B, D] plane
    saved = (
        (N_COL + N_ROW + N_NCE) * plane
        + 4 * N_PAIR * 2 * batch
        + 4 * batch * (patches + length)
        + 2 * 4 * N_NCE * 3 * batch
    )
    sampling = (N_NCE + N_SCRATCH + 2 + N_PART) * plane
    gradients = 3 * elem_bytes * batch * (patches + length) * dim
    return MemoryModel(saved, sampling, 2 * plane, gradients)


def hbm_traffic(
    batch: int, patches: int, length: int, dim: int, elem_bytes: int = 2, text_valid: float = 1.0
) -> tuple[int, int]:
    """``(token bytes, state bytes)`` one step moves: ``X, X^s, X^m`` read forward and backward
    (valid tokens only: a fraction ``text_valid`` of the text's), the three gradients written
    (every token), and every fp32 state buffer written once (its reads hit L2)."""
    valid = batch * dim * (patches + text_valid * length)
    tokens = int(3 * elem_bytes * (2 * valid + batch * dim * (patches + length)))
    model = memory_model(batch, patches, length, dim, elem_bytes)
    return tokens, model.saved + model.sampling_stage


# ------------------------------------------------------------------------------------------------
# The op: one forward, one backward
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("cdds_fast::cdds_loss", mutates_args=())
def _cdds_loss_op(
    v: Tensor,
    v_s: Tensor,
    v_m: Tensor,
    t: Tensor,
    t_s: Tensor,
    t_m: Tensor,
    mask: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    w_s_image: Tensor,
    w_m_image: Tensor,
    w_s_text: Tensor,
    w_m_text: Tensor,
    scale: Tensor | None,
    a_c: float,
    a_s: float,
    a_m: float,
    a_f: float,
    tau_kl: float,
    rho: float,
) -> tuple[
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
]:
    """``(5 weighted terms, feat, col, row, pair, lse, glob, nce_r, nce_c)``; with ``scale=None``
    the InfoNCE problems are left to the caller (the first two terms are 0 and ``feat`` holds
    the pooled features they need)."""
    col, pair, lse = constraints_forward(
        (v, v_s, v_m),
        (t, t_s, t_m),
        mask,
        (w_s_image, w_m_image),
        (w_s_text, w_m_text),
    )
    _, _, batch, dim = col.shape
    row = torch.empty((N_ROW, 2, batch, dim), dtype=torch.float32, device=v.device)
    feat = torch.empty((2, N_NCE, batch, dim), dtype=torch.float32, device=v.device)
    sampling_forward(
        col,
        row,
        alpha_image,
        alpha_text,
        tau_kl=tau_kl,
        rho=rho,
        fused=dict(pair=pair, w_s=(w_s_image, w_s_text), feat=feat),
    )
    if scale is not None:
        nce_loss, nce_r, nce_c = nce_forward(feat[0], feat[1], scale)
    else:
        nce_loss, nce_r, nce_c = None, feat.new_empty((0,)), feat.new_empty((0,))
    terms, glob, ok = finalize_terms(col, pair, nce_loss, scale, a_c=a_c, a_s=a_s, a_m=a_m, a_f=a_f)
    torch._assert_async(ok, _VALUES_MESSAGE)
    return (*terms, feat, col, row, pair, lse, glob, nce_r, nce_c)


@_cdds_loss_op.register_fake
def _(
    v,
    v_s,
    v_m,
    t,
    t_s,
    t_m,
    mask,
    alpha_image,
    alpha_text,
    w_s_image,
    w_m_image,
    w_s_text,
    w_m_text,
    scale,
    a_c,
    a_s,
    a_m,
    a_f,
    tau_kl,
    rho,
):
    batch, patches, dim = v.shape
    length = t.shape[1]
    f32 = dict(dtype=torch.float32)
    nce = (N_NCE, 3, batch) if scale is not None else (0,)
    shapes = (
        (2, N_NCE, batch, dim),
        (N_COL, 2, batch, dim),
        (N_ROW, 2, batch, dim),
        (N_PAIR, 2, batch),
        (batch * (patches + length),),
        (2, dim + 1),
        nce,
        nce,
    )
    return (
        *(v.new_empty((), **f32) for _ in range(5)),
        *(v.new_empty(shape, **f32) for shape in shapes),
    )


@torch.library.custom_op("cdds_fast::cdds_loss_backward", mutates_args=())
def _cdds_loss_backward_op(
    g_clip: Tensor,
    g_sem: Tensor,
    g_mod: Tensor,
    g_f: Tensor,
    g_x: Tensor,
    g_feat: Tensor | None,
    v: Tensor,
    v_s: Tensor,
    v_m: Tensor,
    t: Tensor,
    t_s: Tensor,
    t_m: Tensor,
    mask: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    w_s_image: Tensor,
    w_m_image: Tensor,
    w_s_text: Tensor,
    w_m_text: Tensor,
    scale: Tensor | None,
    feat: Tensor,
    col: Tensor,
    row: Tensor,
    pair: Tensor,
    lse: Tensor,
    glob: Tensor,
    nce_r: Tensor,
    nce_c: Tensor,
    a_c: float,
    a_s: float,
    a_m: float,
    a_f: float,
    tau_kl: float,
    rho: float,
    need_dscale: bool,
) -> tuple[
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
]:
    """Gradients of the 13 differentiable inputs (``scale``'s is empty unless ``need_dscale``)."""
    coef = terms_grad((g_clip, g_sem, g_mod, g_f, g_x), glob, a_c=a_c, a_s=a_s, a_m=a_m, a_f=a_f)
    dscale = None
    if scale is not None:
        dx, dy, dscale = nce_backward(
            coef[:N_NCE], feat[0], feat[1], scale, nce_r, nce_c, need_dscale=need_dscale
        )
        if g_feat is not None:  # the pooled features were used outside the loss too
            dx, dy = dx + g_feat[0], dy + g_feat[1]
    elif g_feat is not None:
        dx, dy = g_feat[0].contiguous(), g_feat[1].contiguous()
    else:
        dx = dy = torch.zeros_like(feat[0])
    g_alpha = (torch.empty_like(alpha_image), torch.empty_like(alpha_text))
    g_w = tuple(torch.empty_like(w) for w in (w_s_image, w_s_text, w_m_image, w_m_text))
    g_mu, g_sd = sampling_backward(
        col,
        row,
        alpha_image,
        alpha_text,
        tau_kl=tau_kl,
        rho=rho,
        fused=dict(coef=coef, pair=pair, w_s=(w_s_image, w_s_text), feat=feat, dx=dx, dy=dy),
        g_alpha=g_alpha,
        g_w=g_w,
    )
    del dx, dy
    grads = constraints_backward(
        (v, v_s, v_m),
        (t, t_s, t_m),
        mask,
        (w_s_image, w_m_image),
        (w_s_text, w_m_text),
        col,
        row,
        pair,
        lse,
        glob,
        coef,
        g_mu,
        g_sd,
        (CSH.value, ASH.value),
    )
    g_scale = (
        dscale.to(scale.dtype) if dscale is not None else v.new_empty((0,), dtype=torch.float32)
    )
    return (*grads, *g_alpha, g_w[0], g_w[2], g_w[1], g_w[3], g_scale)


@_cdds_loss_backward_op.register_fake
def _(
    g_clip,
    g_sem,
    g_mod,
    g_f,
    g_x,
    g_feat,
    v,
    v_s,
    v_m,
    t,
    t_s,
    t_m,
    mask,
    alpha_image,
    alpha_text,
    w_s_image,
    w_m_image,
    w_s_text,
    w_m_text,
    scale,
    feat,
    col,
    row,
    pair,
    lse,
    glob,
    nce_r,
    nce_c,
    a_c,
    a_s,
    a_m,
    a_f,
    tau_kl,
    rho,
    need_dscale,
):
    ins = (
        v,
        v_s,
        v_m,
        t,
        t_s,
        t_m,
        alpha_image,
        alpha_text,
        w_s_image,
        w_m_image,
        w_s_text,
        w_m_text,
    )
    g_scale = (
        scale.new_empty(())
        if scale is not None and need_dscale
        else v.new_empty((0,), dtype=torch.float32)
    )
    return (*(torch.empty_like(x, memory_format=torch.contiguous_format) for x in ins), g_scale)


def _setup_context(ctx, inputs, output):
    *tensors, scale, a_c, a_s, a_m, a_f, tau_kl, rho = inputs
    _, _, _, _, _, feat, *state = output
    ctx.save_for_backward(*tensors, scale, feat, *state)
    # saved state, not results: no gradient and no zero-filled gradient tensors at every backward
    ctx.mark_non_differentiable(*state)
    ctx.set_materialize_grads(False)
    ctx.hyper = (a_c, a_s, a_m, a_f, tau_kl, rho)


def _backward(ctx, g_clip, g_sem, g_mod, g_f, g_x, g_feat, *_state):
    saved = ctx.saved_tensors
    tensors, scale, feat, state = saved[:13], saved[13], saved[14], saved[15:]
    g_terms = [g if g is not None else feat.new_zeros(()) for g in (g_clip, g_sem, g_mod, g_f, g_x)]
    need_dscale = scale is not None and ctx.needs_input_grad[13]
    grads = _cdds_loss_backward_op(
        *g_terms, g_feat, *tensors, scale, feat, *state, *ctx.hyper, need_dscale
    )
    # inputs: 6 token tensors, mask, 6 vectors, scale, 6 hyper-parameters
    return (*grads[:6], None, *grads[6:12], grads[12] if need_dscale else None, *(None,) * 6)


_cdds_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


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
    contrastive: Contrastive | None = None,
) -> dict[str, Tensor]:
    """The CDDS loss terms, already weighted, on the Triton kernels.

    Arguments, shapes and returns as :func:`cdds_fast.reference.cdds_loss` (image ``[B, P, D]``,
    text ``[B, L, D]``, ``text_mask`` bool ``[B, L]``, the six parameter vectors ``[D]``,
    ``logit_scale`` 0-d or a number); tensors may be fp32/bf16/fp16 (mixed), any strides. The
    arguments are those :func:`cdds_fast.functional.cdds_loss` has checked (see "Checks" in the
    module docstring); call that, not this, with inputs of unknown shape. ``contrastive`` (e.g.
    ``CDDSLoss``'s gathering InfoNCE under DDP) replaces the three fused InfoNCE problems; by
    default they run inside the op.

    Returns:
        dict ``contrastive_loss, semantic_loss, modality_loss, completeness_loss,
        x_completeness_loss`` of 0-d float32 tensors whose sum is the total loss.
    """
    scale = None
    if contrastive is None:
        scale = (
            logit_scale
            if isinstance(logit_scale, Tensor)
            else torch.full((), float(logit_scale), dtype=torch.float32, device=image_tokens.device)
        )
    tensors = (
        image_tokens,
        image_semantic,
        image_modality,
        text_tokens,
        text_semantic,
        text_modality,
        text_mask,
        alpha_image,
        alpha_text,
        w_s_image,
        w_m_image,
        w_s_text,
        w_m_text,
    )
    hyper = (a_c, a_s, a_m, a_f, tau_kl, rho)
    out = _cdds_loss_op(*(x.contiguous() for x in tensors), scale, *map(float, hyper))
    terms = dict(zip(LOSS_KEYS, out[:5], strict=True))
    if contrastive is not None:
        # pool(X^s) of image and text, pool(X^x) of image and text (see N_NCE)
        feat = out[5]
        image_feat, text_feat, image_x_feat, text_x_feat = (
            feat[0, 0],
            feat[1, 0],
            feat[1, 1],
            feat[1, 2],
        )
        l_clip = contrastive(image_feat, text_feat, logit_scale)
        l_s = (
            contrastive(image_feat, image_x_feat, logit_scale)
            + contrastive(text_feat, text_x_feat, logit_scale)
        ) / 2
        terms["contrastive_loss"] = a_c * l_clip
        terms["semantic_loss"] = a_s * l_s
    return terms
