r"""The passes of the CDDS loss over the token tensors (docs/method.md sections 2, 5): column
statistics and decoupling-constraint losses ``L_f``, ``L_x``, ``L_m`` of both modalities.

Per modality: tokens ``X``, semantic ``X^s``, modality ``X^m`` ``[B, N, D]`` (each in its own dtype:
fp32/bf16/fp16), weights ``w_s, w_m [D]``, mask ``[B, N]`` (text) or none (images). With ``n_b`` the
valid tokens of pair ``b`` and ``Ntok = sum_b n_b``:

- column statistics (section 2): ``mu, s`` of every column of ``X^s`` over the valid tokens;
- ``r_f = w_s X^s + w_m X^m - X``, ``L_f = sum_valid r_f^2 / (D Ntok)``;
- ``zeta = (X^s - mu) / s``, ``X^x = c + a zeta`` (never written), ``r_x = w_s X^x + w_m X^m - X``,
  ``L_x = sum_valid r_x^2 / (D Ntok)``;
- ``q_n = softmax(X^m_n)``, ``qbar = sum_valid q_n / Ntok``,
  ``L_m = mean_n KL(q_n || qbar) = sum_valid sum_d q log q / Ntok - sum_d qbar log qbar``.

One read of the tokens forward
------------------------------
``L_x`` needs ``c, a``, which need the statistics of BOTH modalities (related sampling, section
3-4), which need a pass over ``X^s``. Instead of a second forward pass over the tokens, ``r_x`` is
rewritten through ``r_f``: with ``X^s = mu + s zeta``,
``r_x = r_f + w_s (u + v zeta)``, ``u = c - mu``, ``v = a - s`` (per column), so per ``(b, column)``

    sum_n r_x      = F1 + w_s u n_b
    sum_n r_x zeta = FZ + w_s v Z2
    sum_n r_x^2    = sum r_f^2 + 2 w_s (u F1 + v FZ) + w_s^2 (u^2 n_b + v^2 Z2)
    sum_n r_x X^m  = FM + w_s (u M1 + v ZM)

with ``F1 = sum r_f``, ``FZ = sum r_f zeta``, ``FM = sum r_f X^m``, ``M1 = sum X^m``,
``ZM = sum zeta X^m``, ``Z2 = sum zeta^2 = n_b var / s^2`` (and ``sum zeta = 0``).

The forward pass (``_constraints_fwd_kernel``, one program per (pair, modality), both modalities
in one launch) therefore needs no ``c, a``: it reads ``X, X^s, X^m`` once and writes per
``(b, column)`` the statistics ``mu, s, mu_res`` and ``F1, FZ, FM, M1, ZM, sum q`` (``col``), per
pair ``n_b, sum r_f^2, sum q log q`` (``pair``) and the per-token log-sum-exp of ``X^m``.
It loops over the pair's tokens twice (corrected two-pass: ``kernels/stats.finish_column_stats``):
first ``X^s`` alone for a provisional mean, then all three tensors; the second read of ``X^s``
comes from L2 (a pair's slab is 79 KB at L = 77, D = 512 bf16). Every sum is in fp32 and taken
about that mean (``e = X^s - mean1``), so ``FZ`` and ``ZM`` carry no cancellation from a large
column mean. The ``c, a``-dependent sums above are formed from these by the sampling kernels
(``kernels/sampling.py``), which own ``c, a``: ``L_x`` per pair in its forward, the gradients of
``c, a, mu, s, w_s, w_m`` in its backward. The rewrite is exact algebra; its rounding differs from
an elementwise ``r_x`` only where ``r_x`` is much smaller than both ``r_f`` and ``w_s (X^x - X^s)``.
Rows wider than one block (``_row_block_cap``: 2048 on a GPU) are looped in ``D`` chunks after
``_row_lse_kernel`` computed the per-token log-sum-exp (one extra read of ``X^m``).

``_constraints_finalize_kernel`` (one program) reduces the per-pair sums to the losses, ``log
qbar`` and ``Ntok`` and combines them with the InfoNCE losses into the five weighted loss terms;
it also checks that every text row has a valid token (a flag for one device-side assertion).

Backward: ``_constraints_bwd_kernel``, program = (pair, token tile, modality), one elementwise pass
that recomputes ``q``, ``zeta``, ``r_f``, ``r_x`` and writes ``grad X``, ``grad X^s``, ``grad X^m``
of both modalities, each once in its input dtype (zeros at masked tokens). ``grad X^s`` holds the
constraint terms AND the statistics' term ``(g_mu + g_s zeta) / n_b`` (``g_mu, g_s`` complete,
after the sampling backward): one rounding. A first loop over the row forms the softmax
backward's ``KL_n = sum_d q (log q - log qbar)``. ``_terms_grad_kernel`` turns the five terms'
upstream gradients into the InfoNCE gradients and the per-modality coefficients
``k_f = 2 dL/dL_f / (D Ntok)`` etc. the other backward kernels read.

Bytes per modality, ``E = B*N*D`` elements of ``e`` bytes (2 for bf16), ``V <= E`` of them valid
(masked tokens are never read): forward ``3*V*e`` read (+ ``V*e`` from L2) and ``36*B*D + 16*B*N``
written; backward ``3*V*e`` read (``X^m`` twice, the second time from L1) and ``3*E*e`` written.
FLOPs: forward ~40 per element and one ``exp``; backward ~40 and two ``exp``: bandwidth bound.
The whole-step model (all kernels, both modalities) is in ``cdds_fast/fused_loss.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cdds_fast.kernels.launch import (
    HEAVY_TILE_ELEMS_GPU,
    ROW_BLOCK_CAP,
    sized_for_gpu,
    tile_elems,
    tile_warps,
    token_tile,
)
from cdds_fast.kernels.stats import STD_EPS, finish_column_stats, stats_grad
from cdds_fast.kernels.tokens import mask_arg, valid_tokens

# Triton kernels may only read globals that are ``tl.constexpr`` objects (``.value`` in Python).
_STD_EPS = tl.constexpr(STD_EPS)
#: F.normalize's eps for the pooled features (docs/method.md, decision 5)
NORM_EPS = tl.constexpr(1e-12)

# Planes of ``col`` [N_COL, 2, B, D] fp32 (dim 1: modality, 0 = image, 1 = text): per-column
# statistics of X^s and the token sums of the module docstring.
MU, SD, MU_RES, F1, FZ, FM, M1, ZM, Q = map(tl.constexpr, range(9))
N_COL = 9
# Planes of ``pair`` [N_PAIR, 2, B] fp32: per (modality, pair) valid tokens n_b, sum r_f^2,
# sum q log q, the L_x sum beyond sum r_f^2 (written by the sampling forward), |mu| and |c|.
COUNT, F2, QLQ, LX, NORM_MU, NORM_C = map(tl.constexpr, range(6))
N_PAIR = 6
# ``coef`` [N_COEF] fp32 of the backward: the three InfoNCE problems' upstream gradients, then
# k_f, k_x, k_m of the image and of the text modality.
K_NCE, K_F, K_X, K_M = map(tl.constexpr, (0, 3, 4, 5))
N_COEF = 9


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _sqrt(x):
    """``sqrt(x)`` for positive normal ``x``: the hardware root refined by one Newton step (fmas),
    within an ulp of the correctly rounded root. ``tl.sqrt_rn`` gives that ulp too, but ptxas
    expands it with a slow-path subroutine whose call saves live registers to local memory."""
    s = tl.sqrt(x)
    return tl.fma(tl.fma(-s, s, x), 0.5 / s, s)


@triton.jit
def _row_lse_pair(
    XM, M, LSE, b, blk, N, D, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = valid_tokens(M, b, rows, N, N, HAS_MASK)
    row_base = b * N * D + rows[:, None].to(tl.int64) * D
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ld = valid[:, None] & (cols < D)[None, :]
        xm = tl.load(XM + row_base + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(xm, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(
            tl.exp(xm - safe_max[:, None]), axis=1
        )
        run_max = new_max
    lse = tl.where(valid, run_max + tl.log(tl.where(valid, run_sum, 1.0)), 0.0)
    tl.store(LSE + b * N + rows, lse, mask=rows < N)


@triton.jit
def _row_lse_kernel(XMV, XMT, M, LSE, B, P, L, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-token log-sum-exp of ``X^m`` rows wider than one block (online max / sum), both
    modalities: grid (pair, token block, modality)."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    if tl.program_id(2) == 0:
        if blk * BLOCK_N < P:
            _row_lse_pair(XMV, M, LSE, b, blk, P, D, False, BLOCK_N, BLOCK_D)
    else:
        if blk * BLOCK_N < L:
            _row_lse_pair(XMT, M, LSE + B * P, b, blk, L, D, True, BLOCK_N, BLOCK_D)


@triton.jit
def _constraints_fwd_pair(
    X,
    XS,
    XM,
    M,
    WS,
    WM,
    COL,
    PAIR,
    LSE,
    b,
    mod,
    N,
    B,
    D,
    HAS_MASK: tl.constexpr,
    LSE_GIVEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The forward pass over pair ``b`` of one modality (see the module docstring)."""
    plane = 2 * B * D
    stat0 = (mod * B + b) * D
    x0 = b * N * D
    cnt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cnt += valid_tokens(M, b, n0 + tl.arange(0, BLOCK_N), N, N, HAS_MASK).to(tl.float32)
    count = tl.sum(cnt, axis=0)
    sum_rf2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_qlogq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        ws = tl.load(WS + cols, mask=col_ok, other=0.0).to(tl.float32)
        wm = tl.load(WM + cols, mask=col_ok, other=0.0).to(tl.float32)
        # pass 1: provisional mean of X^s
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            ld = valid_tokens(M, b, rows, N, N, HAS_MASK)[:, None] & col_ok[None, :]
            offs = x0 + rows[:, None].to(tl.int64) * D + cols[None, :]
            acc += tl.sum(tl.load(XS + offs, mask=ld, other=0.0).to(tl.float32), axis=0)
        mean1 = acc / count
        # pass 2: every sum about that mean
        s_e = tl.zeros([BLOCK_D], dtype=tl.float32)
        s_ee = tl.zeros([BLOCK_D], dtype=tl.float32)
        s_f = tl.zeros([BLOCK_D], dtype=tl.float32)
        s_fe = tl.zeros([BLOCK_D], dtype=tl.float32)
        s_fm = tl.zeros([BLOCK_D], dtype=tl.float32)
        s_m = tl.zeros([BLOCK_D], dtype=tl.float32)
        s_em = tl.zeros([BLOCK_D], dtype=tl.float32)
        s_q = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            valid = valid_tokens(M, b, rows, N, N, HAS_MASK)
            ld = valid[:, None] & col_ok[None, :]
            offs = x0 + rows[:, None].to(tl.int64) * D + cols[None, :]
            x = tl.load(X + offs, mask=ld, other=0.0).to(tl.float32)
            xs = tl.load(XS + offs, mask=ld, other=0.0).to(tl.float32)
            xm = tl.load(XM + offs, mask=ld, other=0.0).to(tl.float32)
            if LSE_GIVEN:
                lse = tl.load(LSE + b * N + rows, mask=row_ok, other=0.0)
            else:  # the whole row is in this block
                row_max = tl.where(valid, tl.max(tl.where(ld, xm, float("-inf")), axis=1), 0.0)
                ex = tl.where(ld, tl.exp(xm - row_max[:, None]), 0.0)
                lse = row_max + tl.log(tl.where(valid, tl.sum(ex, axis=1), 1.0))
                tl.store(LSE + b * N + rows, lse, mask=row_ok)
            log_q = xm - lse[:, None]
            q = tl.where(ld, tl.exp(log_q), 0.0)
            e = tl.where(ld, xs - mean1[None, :], 0.0)
            r_f = tl.where(ld, ws[None, :] * xs + wm[None, :] * xm - x, 0.0)
            s_e += tl.sum(e, axis=0)
            s_ee += tl.sum(e * e, axis=0)
            s_f += tl.sum(r_f, axis=0)
            s_fe += tl.sum(r_f * e, axis=0)
            s_fm += tl.sum(r_f * xm, axis=0)
            s_m += tl.sum(xm, axis=0)
            s_em += tl.sum(e * xm, axis=0)
            s_q += tl.sum(q, axis=0)
            sum_rf2 += tl.sum(r_f * r_f, axis=1)
            sum_qlogq += tl.sum(tl.where(ld, q * log_q, 0.0), axis=1)
        mu, mu_res, shift, var = finish_column_stats(mean1, s_e, s_ee, count)
        s = _sqrt(var + _STD_EPS)
        # zeta = (e - shift) / s exactly (shift = mu + mu_res - mean1)
        inv_s = 1.0 / s
        out = COL + stat0 + cols
        tl.store(out + MU * plane, mu, mask=col_ok)
        tl.store(out + SD * plane, s, mask=col_ok)
        tl.store(out + MU_RES * plane, mu_res, mask=col_ok)
        tl.store(out + F1 * plane, s_f, mask=col_ok)
        tl.store(out + FZ * plane, (s_fe - shift * s_f) * inv_s, mask=col_ok)
        tl.store(out + FM * plane, s_fm, mask=col_ok)
        tl.store(out + M1 * plane, s_m, mask=col_ok)
        tl.store(out + ZM * plane, (s_em - shift * s_m) * inv_s, mask=col_ok)
        tl.store(out + Q * plane, s_q, mask=col_ok)
    pair_plane = 2 * B
    o = PAIR + mod * B + b
    tl.store(o + COUNT * pair_plane, count)
    tl.store(o + F2 * pair_plane, tl.sum(sum_rf2, axis=0))
    tl.store(o + QLQ * pair_plane, tl.sum(sum_qlogq, axis=0))


@triton.jit
def _constraints_fwd_kernel(
    XV,
    XSV,
    XMV,
    XT,
    XST,
    XMT,
    M,
    WSV,
    WMV,
    WST,
    WMT,
    COL,
    PAIR,
    LSE,
    B,
    P,
    L,
    D,
    LSE_GIVEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (pair, modality)."""
    b = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        _constraints_fwd_pair(
            XV,
            XSV,
            XMV,
            M,
            WSV,
            WMV,
            COL,
            PAIR,
            LSE,
            b,
            0,
            P,
            B,
            D,
            False,
            LSE_GIVEN,
            BLOCK_N,
            BLOCK_D,
        )
    else:
        _constraints_fwd_pair(
            XT,
            XST,
            XMT,
            M,
            WST,
            WMT,
            COL,
            PAIR,
            LSE + B * P,
            b,
            1,
            L,
            B,
            D,
            True,
            LSE_GIVEN,
            BLOCK_N,
            BLOCK_D,
        )


@triton.jit
def _constraints_finalize_kernel(
    COL,
    PAIR,
    NCE,
    SCALE,
    T_CLIP,
    T_SEM,
    T_MOD,
    T_F,
    T_X,
    GLOB,
    OK,
    B,
    D,
    a_c,
    a_s,
    a_m,
    a_f,
    HAS_NCE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: per modality ``Ntok``, ``log qbar`` (``GLOB`` [2, D + 1]: ``log qbar`` then
    ``Ntok``), ``L_f, L_x, L_m``; the five weighted terms (the InfoNCE losses ``NCE`` [3] of the
    scale ``SCALE`` when ``HAS_NCE``, else those two terms are 0); ``OK``: the fewest valid
    tokens of a text row, 0 if the scale is not finite and > 0 (non-zero iff both hold: the
    operand of the caller's one device-side assertion)."""
    plane = 2 * B * D
    pair_plane = 2 * B
    l_f = 0.0
    l_x = 0.0
    l_m = 0.0
    for mod in tl.static_range(2):
        acc_n = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_f = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_x = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_q = tl.zeros([BLOCK_B], dtype=tl.float32)
        least = tl.full([BLOCK_B], float("inf"), dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            rb = b0 + tl.arange(0, BLOCK_B)
            ok = rb < B
            o = PAIR + mod * B + rb
            n_b = tl.load(o + COUNT * pair_plane, mask=ok, other=0.0)
            acc_n += n_b
            least = tl.minimum(least, tl.where(ok, n_b, float("inf")))
            rf2 = tl.load(o + F2 * pair_plane, mask=ok, other=0.0)
            acc_f += rf2
            acc_x += rf2 + tl.load(o + LX * pair_plane, mask=ok, other=0.0)
            acc_q += tl.load(o + QLQ * pair_plane, mask=ok, other=0.0)
        n_tok = tl.sum(acc_n, axis=0)
        qbar_logq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            q = tl.zeros([BLOCK_D], dtype=tl.float32)
            for b0 in range(0, B, BLOCK_B):
                rb = b0 + tl.arange(0, BLOCK_B)
                ld = (rb < B)[:, None] & col_ok[None, :]
                offs = Q * plane + (mod * B + rb[:, None]).to(tl.int64) * D + cols[None, :]
                q += tl.sum(tl.load(COL + offs, mask=ld, other=0.0), axis=0)
            # IEEE division, as the reference's mean: on a GPU ``/`` is div.full.f32 (<= 2 ulp),
            # which would make qbar = n / n (D = 1: every q_n = 1) 1 +- ulp and L_m's exact 0
            # rounding noise; one program per step, so the exact division costs nothing
            q_bar = tl.math.div_rn(q, n_tok)
            log_qbar = tl.log(tl.where(col_ok, q_bar, 1.0))
            tl.store(GLOB + mod * (D + 1) + cols, log_qbar, mask=col_ok)
            # qbar_d == 0 gives 0 * -inf = NaN, exactly where the reference's log(qbar) does
            qbar_logq += tl.where(col_ok, q_bar * log_qbar, 0.0)
        tl.store(GLOB + mod * (D + 1) + D, n_tok)
        inv = 1.0 / (n_tok * D)
        l_f += tl.sum(acc_f, axis=0) * inv
        l_x += tl.sum(acc_x, axis=0) * inv
        l_m += tl.sum(acc_q, axis=0) / n_tok - tl.sum(qbar_logq, axis=0)
        if mod == 1:
            fewest = tl.min(least, axis=0)
            if HAS_NCE:
                scale = tl.load(SCALE).to(tl.float32)
                fewest = tl.where((scale > 0.0) & (scale < float("inf")), fewest, 0.0)
            tl.store(OK, fewest)
    if HAS_NCE:
        tl.store(T_CLIP, a_c * tl.load(NCE))
        tl.store(T_SEM, a_s * 0.5 * (tl.load(NCE + 1) + tl.load(NCE + 2)))
    else:
        tl.store(T_CLIP, 0.0)
        tl.store(T_SEM, 0.0)
    tl.store(T_MOD, a_m * 0.5 * l_m)
    tl.store(T_F, a_f * 0.5 * l_f)
    tl.store(T_X, (1.0 - a_f) * 0.5 * l_x)


@triton.jit
def _terms_grad_kernel(G_CLIP, G_SEM, G_MOD, G_F, G_X, GLOB, COEF, D, a_c, a_s, a_m, a_f):
    """Upstream gradients of the five terms -> ``COEF`` (see N_COEF): the InfoNCE problems'
    gradients and, per modality, ``k_f = dL/dr_f / r_f``, ``k_x``, ``k_m = dL/d(KL_n) / n``."""
    g_sem = 0.5 * a_s * tl.load(G_SEM)
    tl.store(COEF + K_NCE, a_c * tl.load(G_CLIP))
    tl.store(COEF + K_NCE + 1, g_sem)
    tl.store(COEF + K_NCE + 2, g_sem)
    for mod in tl.static_range(2):
        n_tok = tl.load(GLOB + mod * (D + 1) + D)
        tl.store(COEF + K_F + 3 * mod, a_f * tl.load(G_F) / (D * n_tok))
        tl.store(COEF + K_X + 3 * mod, (1.0 - a_f) * tl.load(G_X) / (D * n_tok))
        tl.store(COEF + K_M + 3 * mod, 0.5 * a_m * tl.load(G_MOD) / n_tok)


@triton.jit
def _constraints_bwd_tile(
    X,
    XS,
    XM,
    M,
    WS,
    WM,
    COL,
    ROW,
    PAIR,
    LSE,
    GLOB,
    COEF,
    GMU,
    GSD,
    GX,
    GXS,
    GXM,
    b,
    blk,
    mod,
    N,
    B,
    D,
    CSH: tl.constexpr,
    ASH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    plane = 2 * B * D
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    valid = valid_tokens(M, b, rows, N, N, HAS_MASK)
    k_f = tl.load(COEF + K_F + 3 * mod)
    k_x = tl.load(COEF + K_X + 3 * mod)
    k_m = tl.load(COEF + K_M + 3 * mod)
    inv_count = 1.0 / tl.load(PAIR + COUNT * 2 * B + mod * B + b)
    # c and a are stored shifted by the pair's first image column (kernels/sampling.py)
    o_mu = tl.load(COL + MU * plane + b * D)
    o_sd = tl.load(COL + SD * plane + b * D)
    stat0 = (mod * B + b) * D
    glob = GLOB + mod * (D + 1)
    lse = tl.load(LSE + b * N + rows, mask=valid, other=0.0)
    row_base = b * N * D + rows[:, None].to(tl.int64) * D
    # loop 1: KL_n = sum_d q (log q - log qbar), the softmax backward's row term
    kl = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ld = valid[:, None] & (cols < D)[None, :]
        xm = tl.load(XM + row_base + cols[None, :], mask=ld, other=0.0).to(tl.float32)
        log_q = xm - lse[:, None]
        log_qbar = tl.load(glob + cols, mask=cols < D, other=0.0)
        kl += tl.sum(tl.where(ld, tl.exp(log_q) * (log_q - log_qbar[None, :]), 0.0), axis=1)
    # loop 2: the three gradients
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        st = stat0 + cols
        ws = tl.load(WS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        wm = tl.load(WM + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mu = tl.load(COL + MU * plane + st, mask=col_ok, other=0.0)[None, :]
        s = tl.load(COL + SD * plane + st, mask=col_ok, other=1.0)[None, :]
        mu_res = tl.load(COL + MU_RES * plane + st, mask=col_ok, other=0.0)[None, :]
        c = (tl.load(ROW + CSH * plane + st, mask=col_ok, other=0.0) + o_mu)[None, :]
        a = (tl.load(ROW + ASH * plane + st, mask=col_ok, other=0.0) + o_sd)[None, :]
        g_mu = tl.load(GMU + st, mask=col_ok, other=0.0)[None, :]
        g_s = tl.load(GSD + st, mask=col_ok, other=0.0)[None, :]
        log_qbar = tl.load(glob + cols, mask=col_ok, other=0.0)[None, :]
        ld = valid[:, None] & col_ok[None, :]
        offs = row_base + cols[None, :]
        x = tl.load(X + offs, mask=ld, other=0.0).to(tl.float32)
        xs = tl.load(XS + offs, mask=ld, other=0.0).to(tl.float32)
        xm = tl.load(XM + offs, mask=ld, other=0.0).to(tl.float32)
        zeta = ((xs - mu) - mu_res) / s
        r_f = ws * xs + wm * xm - x
        r_x = ws * (c + a * zeta) + wm * xm - x
        t_f = k_f * r_f
        t_x = k_x * r_x
        t = t_f + t_x
        log_q = xm - lse[:, None]
        g_q = k_m * tl.exp(log_q) * (log_q - log_qbar - kl[:, None])
        g_x = tl.where(ld, -t, 0.0)
        g_xs = tl.where(
            ld,
            ws * (t_f + (a / s) * t_x) + stats_grad(xs, mu, mu_res, s, g_mu, g_s, inv_count),
            0.0,
        )
        g_xm = tl.where(ld, wm * t + g_q, 0.0)
        st_ok = row_ok[:, None] & col_ok[None, :]
        tl.store(GX + offs, g_x.to(GX.dtype.element_ty), mask=st_ok)
        tl.store(GXS + offs, g_xs.to(GXS.dtype.element_ty), mask=st_ok)
        tl.store(GXM + offs, g_xm.to(GXM.dtype.element_ty), mask=st_ok)


@triton.jit
def _constraints_bwd_kernel(
    XV,
    XSV,
    XMV,
    XT,
    XST,
    XMT,
    M,
    WSV,
    WMV,
    WST,
    WMT,
    COL,
    ROW,
    PAIR,
    LSE,
    GLOB,
    COEF,
    GMU,
    GSD,
    GXV,
    GXSV,
    GXMV,
    GXT,
    GXST,
    GXMT,
    B,
    P,
    L,
    D,
    CSH: tl.constexpr,
    ASH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (pair, token tile, modality); tiles past a modality's tokens do nothing.
    ``GMU``/``GSD`` [2, B, D]: the complete gradients of the statistics."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    if tl.program_id(2) == 0:
        if blk * BLOCK_N < P:
            _constraints_bwd_tile(
                XV,
                XSV,
                XMV,
                M,
                WSV,
                WMV,
                COL,
                ROW,
                PAIR,
                LSE,
                GLOB,
                COEF,
                GMU,
                GSD,
                GXV,
                GXSV,
                GXMV,
                b,
                blk,
                0,
                P,
                B,
                D,
                CSH,
                ASH,
                False,
                BLOCK_N,
                BLOCK_D,
            )
    else:
        if blk * BLOCK_N < L:
            _constraints_bwd_tile(
                XT,
                XST,
                XMT,
                M,
                WST,
                WMT,
                COL,
                ROW,
                PAIR,
                LSE + B * P,
                GLOB,
                COEF,
                GMU,
                GSD,
                GXT,
                GXST,
                GXMT,
                b,
                blk,
                1,
                L,
                B,
                D,
                CSH,
                ASH,
                True,
                BLOCK_N,
                BLOCK_D,
            )


# ------------------------------------------------------------------------------------------------
# launchers (inputs checked before the op: cdds_fast.contract; contiguous, on one device)
# ------------------------------------------------------------------------------------------------


#: Widest row the forward pass holds in one block on a GPU: with its eight column accumulators a
#: [1, 4096] block spills in fp32 for sm_90 (benchmarks/RESULTS.md), so wider rows take the
#: row-LSE pass and ``HEAVY_TILE_ELEMS_GPU``-wide chunks.
_GPU_ROW_BLOCK_CAP = 2048


def _row_block_cap(device: torch.device) -> int:
    """Widest row (``D``) the token passes hold in one block on ``device``; wider rows are looped
    in chunks, the forward after a row-LSE pass (tests reach that path at small ``D`` through the
    ``row_block_cap`` fixture of ``tests/conftest.py``)."""
    return _GPU_ROW_BLOCK_CAP if sized_for_gpu(device) else ROW_BLOCK_CAP


def _fwd_tile(n: int, d: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_D, num_warps)`` of the forward pass and its row-LSE pass: on a GPU the
    heavy-tile budget (ten fp32 tiles and eight column accumulators live), 4 elements per
    thread."""
    cap = _row_block_cap(device)
    if not sized_for_gpu(device):
        block_n, block_d = token_tile(n, d, device, col_cap=cap)
        return block_n, block_d, tile_warps(block_n * block_d)
    if d > cap:
        cap = min(cap, HEAVY_TILE_ELEMS_GPU)
    block_n, block_d = token_tile(n, d, device, col_cap=cap, elems=HEAVY_TILE_ELEMS_GPU)
    return block_n, block_d, tile_warps(block_n * block_d, elems_per_thread=4)


def _bwd_tile(n: int, d: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_D, num_warps)`` of the backward pass. It loops over ``D`` in blocks
    whatever their width (the forward saved each row's log-sum-exp), so its blocks stay within
    one tile: a [1, 4096] block spills for sm_90 (benchmarks/RESULTS.md)."""
    cap = min(_row_block_cap(device), tile_elems(device))
    block_n, block_d = token_tile(n, d, device, col_cap=cap)
    return block_n, block_d, tile_warps(block_n * block_d)


def constraints_forward(
    image: tuple[Tensor, Tensor, Tensor],
    text: tuple[Tensor, Tensor, Tensor],
    mask: Tensor,
    w_image: tuple[Tensor, Tensor],
    w_text: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward token pass of both modalities.

    Args:
        image: ``(V, V^s, V^m)`` ``[B, P, D]``; text: ``(T, T^s, T^m)`` ``[B, L, D]`` (each
            contiguous, fp32/bf16/fp16); mask: bool ``[B, L]``; w_image, w_text: ``(w_s, w_m)``.
    Returns:
        ``col`` [N_COL, 2, B, D], ``pair`` [N_PAIR, 2, B] (``LX``, ``NORM_MU`` and ``NORM_C``
        left for the sampling forward) and ``lse`` [B * (P + L)], all fp32.
    """
    batch, p, d = image[0].shape
    length = text[0].shape[1]
    dev = image[0].device
    col = torch.empty((N_COL, 2, batch, d), dtype=torch.float32, device=dev)
    pair = torch.empty((N_PAIR, 2, batch), dtype=torch.float32, device=dev)
    lse = torch.empty((batch * (p + length),), dtype=torch.float32, device=dev)
    block_n, block_d, warps = _fwd_tile(max(p, length), d, dev)
    m_arg = mask_arg(mask, image[0])
    lse_given = block_d < d
    if lse_given:
        _row_lse_kernel[(batch, triton.cdiv(max(p, length), block_n), 2)](
            image[2],
            text[2],
            m_arg,
            lse,
            batch,
            p,
            length,
            d,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            num_warps=warps,
        )
    _constraints_fwd_kernel[(batch, 2)](
        *image,
        *text,
        m_arg,
        *w_image,
        *w_text,
        col,
        pair,
        lse,
        batch,
        p,
        length,
        d,
        LSE_GIVEN=lse_given,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return col, pair, lse


def finalize_terms(
    col: Tensor,
    pair: Tensor,
    nce: Tensor | None,
    scale: Tensor | None,
    *,
    a_c: float,
    a_s: float,
    a_m: float,
    a_f: float,
) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """The five weighted terms (0-d fp32 each, in ``LOSS_KEYS`` order), ``glob`` [2, D + 1]
    (``log qbar``, ``Ntok``) and ``ok`` (0-d fp32): the fewest valid tokens of a text row, 0 if
    ``scale`` (given with ``nce``) is not finite and > 0."""
    _, _, batch, d = col.shape
    dev = col.device
    terms = tuple(torch.empty((), dtype=torch.float32, device=dev) for _ in range(5))
    glob = torch.empty((2, d + 1), dtype=torch.float32, device=dev)
    ok = torch.empty((), dtype=torch.float32, device=dev)
    block_b, block_d = token_tile(batch, d, dev, col_cap=1024)
    _constraints_finalize_kernel[(1,)](
        col,
        pair,
        nce if nce is not None else pair,
        scale if nce is not None else pair,
        *terms,
        glob,
        ok,
        batch,
        d,
        float(a_c),
        float(a_s),
        float(a_m),
        float(a_f),
        HAS_NCE=nce is not None,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        num_warps=tile_warps(block_b * block_d),
    )
    return terms, glob, ok


def terms_grad(
    grads: tuple[Tensor, ...], glob: Tensor, *, a_c: float, a_s: float, a_m: float, a_f: float
) -> Tensor:
    """``coef`` [N_COEF] fp32 from the five terms' upstream gradients (0-d each)."""
    d = glob.shape[1] - 1
    coef = torch.empty((N_COEF,), dtype=torch.float32, device=glob.device)
    _terms_grad_kernel[(1,)](
        *grads, glob, coef, d, float(a_c), float(a_s), float(a_m), float(a_f), num_warps=1
    )
    return coef


def constraints_backward(
    image: tuple[Tensor, Tensor, Tensor],
    text: tuple[Tensor, Tensor, Tensor],
    mask: Tensor,
    w_image: tuple[Tensor, Tensor],
    w_text: tuple[Tensor, Tensor],
    col: Tensor,
    row: Tensor,
    pair: Tensor,
    lse: Tensor,
    glob: Tensor,
    coef: Tensor,
    g_mu: Tensor,
    g_sd: Tensor,
    row_planes: tuple[int, int],
) -> tuple[Tensor, ...]:
    """The backward token pass: ``(grad V, grad V^s, grad V^m, grad T, grad T^s, grad T^m)``, each
    in its input's dtype. ``row`` holds ``c, a`` (shifted) in the planes ``row_planes``;
    ``g_mu``/``g_sd`` [2, B, D] are the complete gradients of the statistics."""
    batch, p, d = image[0].shape
    length = text[0].shape[1]
    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (*image, *text))
    block_n, block_d, warps = _bwd_tile(max(p, length), d, image[0].device)
    _constraints_bwd_kernel[(batch, triton.cdiv(max(p, length), block_n), 2)](
        *image,
        *text,
        mask_arg(mask, image[0]),
        *w_image,
        *w_text,
        col,
        row,
        pair,
        lse,
        glob,
        coef,
        g_mu,
        g_sd,
        *grads,
        batch,
        p,
        length,
        d,
        CSH=row_planes[0],
        ASH=row_planes[1],
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return grads


__all__ = ["constraints_backward", "constraints_forward", "finalize_terms", "terms_grad"]
