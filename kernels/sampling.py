r"""Fused related-semantics weights + distribution sampling (docs/method.md sections 3-4), both
directions.

``related_sampling(mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, *, tau_kl, rho)`` returns
``(c_v, a_v, c_t, a_t)`` with ``c_v = W_v mu_t``, ``a_v = W_v s_t`` (image -> text, ``W_v`` from
``alpha_image``) and ``c_t = W_t mu_v``, ``a_t = W_t s_v`` (text -> image, ``alpha_text``), equal to
``reference.related.related_weights`` + ``reference.sampling.sampling_coefficients`` in values and
in gradients (including the reference's conventions at non-differentiable points). The ``[B, D, D]``
matrices ``S``, ``Pr``, ``A``, ``W`` are never stored: every kernel recomputes its 2-D tile of them
from ``[B, D]`` vectors, so memory is ``O(B * D)``. The direction is a grid axis (one launch per
kernel for both directions). The CDDS loss (``cdds_fast/fused_loss.py``) runs the same kernels with
``FUSED``: they then also form what needs ``c, a`` of the constraint losses and the pooled
features (see "Fused into the loss" below).

Math (one direction, one pair ``b``; rows ``i`` = source columns ``(mu_i, s_i, alpha_i)``, columns
``j`` = destination columns ``(nu_j, sigma_j)``)
--------------------------------------------------------------------------------------------------
Logits.  ``d_ij = mu_i - nu_j``, ``w_ij = s_i^2 + d_ij^2``,
``S_ij = ln sigma_j - ln s_i + w_ij / (2 sigma_j^2) - 1/2``. The row constants ``-ln s_i - 1/2``
cancel in the softmax, and so does a per-pair constant ``ln sigma_0`` (``sigma_0`` = the pair's
first destination column, which keeps ``|colA|`` small), so the kernels use base-2 logits
``y_ij = colA_j + w_ij colB_j`` with ``colA_j = -log2(sigma_j / sigma_0) / tau``,
``colB_j = -log2(e) / (2 tau sigma_j^2)`` (computed once per column by the forward program that
owns the pair, together with ``1 / sigma_j^2``): one sub + two explicit FMAs per element,
bit-identical in every kernel (the tie tests of tests/test_sampling.py rely on it).
``Pr_ij = 2^(y_ij - m_i) / l_i``.

Forward (``_related_sampling_fwd_kernel``, program = pair b x direction, looping over the rows in
blocks of ``BLOCK_I``, three sweeps over ``j`` in ``[BLOCK_I, BLOCK_J]`` tiles per row block; every
sum is accumulated element-wise in a tile of registers and reduced once after its sweep, so no
cross-thread traffic inside the loops):
* sweep 0: ``m_i = max_j y_ij`` (no exp).
* sweep 1: ``e = 2^(y - m)``; Welford mean / M2 per column slot, merged with Chan's formula:
  ``l_i = sum_j e``, ``M2_i = sum_j (e - l/D)^2`` (numerically a two-pass variance). Then
  ``mean = 1/D`` (the exact value of the reference's ``Pr.mean()``), ``var = M2 / (D l^2)``
  (population), ``std = sqrt(var)`` (0 where var == 0), ``t1 = mean + alpha_i std``,
  ``t2 = (1 - rho) max_j Pr = (1 - rho) / l``, ``k = min(t1, t2)``, branch weight ``w1`` = 1 / 0 /
  0.5 for ``t1 < t2`` / ``>`` / tie (torch.minimum's split). ``k`` and ``w1`` are recomputed from
  ``std`` and ``l`` by the backward kernels with the same explicit FMA (``_threshold``), so every
  kernel sees the same threshold to the bit.
* sweep 2: ``A = relu(Pr - k)``, ``Z = sum A``, ``c = sum A nu / Z``, ``a = sum A sigma / Z``;
  for the backward ``N+ = #{A > 0}``, ``Snu = sum_{A>0} nu``, ``Ssig = sum_{A>0} sigma`` and the tie
  count ``T = #{j: 2^(y - m) == 1}`` (the entries amax splits its gradient over; >= 1).
  ``Z >= rho / l > 0`` since rho >= 1e-6. The values enter these sums shifted by per-pair offsets
  ``nu - mu_v[b,0]``, ``sigma - s_v[b,0]`` (and ``c``, ``a`` are stored shifted): with large common
  means (mu ~ 1e4) ``gW_j - u`` below is then free of cancellation (the float32 reference loses
  3 digits there).

Backward (given ``gc_i, ga_i``). ``gW_ij = gc_i nu_j + ga_i sigma_j``, ``u = gc c + ga a``,
``gA_ij = (gW_ij - u_i) / Z_i``. relu: ``g_k = -H`` with
``H = sum_{A>0} gA = (gc Snu + ga Ssig - u N+) / Z`` (from saved sums, no sweep).
min: ``g_t1 = w1 g_k``, ``g_t2 = (1 - w1) g_k``.
``g_alpha_i = sum_b std g_t1``; ``g_std = alpha g_t1``. The mean's ``g_t1 / D`` and the ``-mean``
part of ``d std / d Pr = (Pr - mean) / (D std)`` are constant shifts of ``gPr`` that the softmax
backward annihilates, so ``gPr_ij = [A>0] gA_ij + gamma_i Pr_ij + [tie] delta_i`` with
``gamma = g_std / (D std)`` (0 when std == 0) and ``delta = (1 - rho) g_t2 / T``. Softmax:
``g_x_ij = Pr_ij (gPr_ij - dot_i)``, ``dot_i = sum_j Pr gPr``; ``g_S = -g_x / tau``.
* row-owned (``_related_sampling_bwd_row_kernel``, program = pair x direction, looping over the
  row blocks, one sweep over ``j`` per block): ``g_x`` is linear in ``dot``, so
  ``sum_j g_x f = sum_j Pr gPr f - dot sum_j Pr f`` for ``f = 1/sigma^2`` and ``d / sigma^2``
  (dot itself summed in the same sweep, hence consistent with the per-element ``gPr``: for
  D = 1 the softmax gradient is exactly 0 as in the reference):
  ``g_mu_i = -(1/tau) sum_j g_x d_ij / sigma_j^2``, ``g_s_i = -(1/tau) s_i sum_j g_x / sigma_j^2``
  (the ``-1/s_i`` term multiplies ``sum_j g_x = 0``). Writes dot and the per-row scalars.
* column-owned (``_related_sampling_bwd_col_kernel``, program = ``BLOCK_J`` columns, sweep over all
  rows ``i`` with tiles ``[columns, rows]``, flash-attention-backward style, deterministic, no
  atomics): ``g_nu_j = (1/(tau sigma_j^2)) sum_i g_x d_ij + sum_i W_ij gc_i``,
  ``g_sigma_j = -(1/(tau sigma_j)) sum_i g_x (1 - w_ij / sigma_j^2) + sum_i W_ij ga_i``; added into
  the buffer the row kernel of the other direction wrote (``mu_v, s_v`` get the row part of
  image->text plus the column part of text->image, and vice versa).
* ``_related_sampling_vec_kernel`` sums the per-pair rows ``std g_t1`` over pairs (``g_alpha``).

Fused into the loss (``FUSED``)
-------------------------------
The statistics come from the loss's token pass (``kernels/constraints.py``: the ``col`` planes,
also holding ``F1 = sum r_f``, ``FZ = sum r_f zeta``, ``FM``, ``M1``, ``ZM`` per column). With
``u = c - mu`` and ``v = a - s`` of the source modality (``X^x = c + a zeta``):
* the forward program adds ``sum_i [2 w_s (u F1 + v FZ) + w_s^2 (u^2 n_b + v^2 Z2)]`` (the part of
  ``sum r_x^2`` beyond ``sum r_f^2``, ``Z2 = n_b var / s^2``) to the pair's ``L_x`` sum and writes
  the pooled features ``pool(X^s) = mu / |mu|`` and ``pool(X^x) = c / |c|`` of its source
  modality into the InfoNCE rows and columns;
* the row program forms its rows' ``gc, ga`` itself: the constraint part
  ``gc = k_x w_s (F1 + w_s u n_b)``, ``ga = k_x w_s (FZ + w_s v Z2)`` plus the pooled feature's
  gradient through the normalisation, ``(g - y <g, y>) / |c|`` (``F.normalize``'s backward; the
  ``<g, y>`` of the pair's row is summed first); it adds to ``g_mu, g_s`` the direct
  terms ``-(a/s) gc_con``, ``-(a/s) ga_con`` (``X^x`` depends on ``mu, s`` through ``zeta``) and
  ``pool(X^s)``'s gradient through its normalisation, and writes per-pair parts of the ``w_s,
  w_m`` gradients (``k_f sum r_f X^s + k_x sum r_x X^x``, ``k_f FM + k_x sum r_x X^m``, the sums
  formed as in ``kernels/constraints.py``), which ``_related_sampling_vec_kernel`` sums over pairs
  with ``g_alpha``.

Saved for backward (``row`` [N_ROW, 2, B, D] fp32): colA, colB, 1/sigma^2 (per destination
column), m, 1/l, std, Z, T, N+, Snu, Ssig, c - offset, a - offset (per row). Backward scratch
[N_SCRATCH, 2, B, D]: gc/Z, ga/Z, u/Z, gamma, delta, dot; per-pair gradient rows [3, 2, B, D].

Cost (fp32).  Bytes: O(B D) only: 13 x 2 B D saved (+ the 2 x 2 B D statistics read), the
backward's 6 x 2 B D scratch, 3 x 2 B D per-pair rows and 2 x 2 B D gradients: ~25 x 2 B D x 4 B
= 26 MB at B = 256, D = 512, most of it written and read back while still in L2, so the op is
compute bound. Per element of the virtual [B, D, D] per direction: forward 3 sweeps, 2 exp2
(sweeps 1, 2), backward 2 sweeps (row, column), 2 exp2: 4 exp2 in all. The innermost loop bodies
of the loss's specialisations, compiled for sm_90 (triton 3.8, ``FUSED``, 1024-element tiles at 8
warps: 16 x 64 forward and row, 64 x 16 column; D % 64 == 0), hold 8 + 14.25 + 25.5 (forward
sweeps), 29 (row) and 39.25 (column) PTX instructions per element, ~116 in all; the SASS ptxas
makes of them, 6.8 + 15.25 + 22.5, 30.75 and 39.25: 114.6 (``benchmarks/kernel_resources.py
--sampling-sass``; tests/test_kernel_resources.py holds it to at most 125). At B = 256,
D = 512, both directions: 2 x 256 x 512^2 = 134 M elements -> 537 M exp2 = 0.13 ms of MUFU at
16 ex2/clk/SM x 132 SMs x 1.98 GHz (4.2 T/s), and ~15.6 G instructions = 0.47 ms at 33.4 T
lane-instructions/s (the FMA pipe): the ALU bound (fwd ~0.19 ms, bwd ~0.27 ms) dominates the MUFU
one (a model, not a measurement; kernels/launch.pairwise_tiles has the tile choice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cdds_fast.contract import check_hyper, check_same_device, check_tensor
from cdds_fast.kernels.constraints import (
    COUNT,
    F1,
    FM,
    FZ,
    K_F,
    K_X,
    LX,
    M1,
    MU,
    MU_RES,
    NORM_C,
    NORM_EPS,
    NORM_MU,
    SD,
    ZM,
    _sqrt,
)
from cdds_fast.kernels.launch import (
    block_for,
    device_supports_triton,
    num_warps_for,
    pairwise_tiles,
)
from cdds_fast.kernels.stats import STD_EPS

LOG2E = 1.4426950408889634
_STD_EPS = tl.constexpr(STD_EPS)

# Planes of the saved tensor ``row`` [N_ROW, 2, B, D] (dim 1: index 0 = image->text rows, i.e.
# image columns; 1 = text->image). COLA/COLB/RINV: the per-column logit coefficients of that
# modality as a destination; the rest: per-row statistics of the forward sweeps.
(COLA, COLB, RINV, ROW_MAX, INV_L, STD, Z, TIES, NPOS, SNU, SSIG, CSH, ASH) = map(
    tl.constexpr, range(13)
)
N_ROW = 13
# Planes of the backward scratch [N_SCRATCH, 2, B, D]: per-row scalars the column kernel needs.
GCZ, GAZ, UZ, GAMMA, DELTA, DOT = map(tl.constexpr, range(6))
N_SCRATCH = 6
# Planes of the per-pair gradient rows [N_PART, 2, B, D], summed over pairs by the vec kernel.
G_ALPHA, G_WS, G_WM = map(tl.constexpr, range(3))
N_PART = 3


def _tiles(d: int, kernel: str, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_I, BLOCK_J, num_warps)`` of ``kernel`` (``"fwd"``, ``"row"`` or ``"col"``) from
    :func:`launch.pairwise_tiles`. The column kernel's tile is ``[BLOCK_J owned columns, BLOCK_I
    rows per step]`` with the rows along the fast axis, so it takes the two sides swapped. (Tests
    reach the multi-tile paths at small ``D`` by replacing this function: the ``sampling_tiles``
    fixture of ``tests/test_sampling.py``.)"""
    bi, bj, warps = pairwise_tiles(d, device)
    return (bj, bi, warps) if kernel == "col" else (bi, bj, warps)


# --------------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _pair(COL, B, D, plane, b, dr):
    """Offsets of pair ``b``'s source (modality ``dr``) and destination rows of ``[2, B, D]``
    planes, and the pair's value offsets ``mu_v[b, 0]``, ``s_v[b, 0]`` (see "sweep 2")."""
    src = (dr * B + b) * D
    dst = ((1 - dr) * B + b) * D
    o_mu = tl.load(COL + MU * plane + b * D)
    o_sd = tl.load(COL + SD * plane + b * D)
    return src, dst, o_mu, o_sd


@triton.jit
def _by_direction(V_IMAGE, V_TEXT, dr, offs, mask):
    """``V_IMAGE[offs]`` for direction 0, ``V_TEXT[offs]`` for 1, as fp32 (the two vectors may
    have different dtypes)."""
    if dr == 0:
        v = tl.load(V_IMAGE + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.load(V_TEXT + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _logits(mu_i, s2_i, nu_j, col_a, col_b):
    """``d = mu_i - nu_j``, ``w = s_i^2 + d^2`` and base-2 logits ``y = colA + w colB`` on a tile;
    the arguments come already broadcast (``[:, None]`` / ``[None, :]``), so the same helper serves
    ``[rows, cols]`` and ``[cols, rows]`` tiles. Explicit fmas: every kernel must recompute
    bit-identical logits (ties at the max are detected as ``2^(y - m) == 1`` in the forward and
    again in both backward kernels)."""
    d = mu_i - nu_j
    w = tl.fma(d, d, s2_i)
    y = tl.fma(w, col_b, col_a)
    return d, w, y


@triton.jit
def _dest_logits(COL, ROW, plane, dst, cols, cmask, mu_i, s2_i):
    """``_logits`` of a ``[rows, BLOCK_J]`` tile against the destination columns ``cols`` of the
    pair (padded columns load neutral values; mask ``y`` where it matters). Returns
    ``(nu, d, w, y)`` with ``nu`` the 1-D column means."""
    nu = tl.load(COL + MU * plane + dst + cols, mask=cmask, other=0.0)
    col_a = tl.load(ROW + COLA * plane + dst + cols, mask=cmask, other=0.0)[None, :]
    col_b = tl.load(ROW + COLB * plane + dst + cols, mask=cmask, other=0.0)[None, :]
    d, w, y = _logits(mu_i, s2_i, nu[None, :], col_a, col_b)
    return nu, d, w, y


@triton.jit
def _dest_probs(
    COL,
    ROW,
    plane,
    dst,
    j0,
    D,
    mu_c,
    s2_c,
    m_c,
    inv_l_c,
    o_mu,
    o_sd,
    BLOCK_J: tl.constexpr,
    EVEN_J: tl.constexpr,
):
    """``Pr`` of a ``[rows, BLOCK_J]`` tile against the destination columns from ``j0`` (the
    forward's sweep 2 and the row backward's sweep): returns ``(cols, cmask, valid, d, w, e, pr,
    nu_sh, sig_sh)`` with ``e = 2^(y - m)`` (0 on padded columns) and the column values shifted
    by the pair's offsets; row vectors come broadcast (``[:, None]``)."""
    cols = j0 + tl.arange(0, BLOCK_J)
    cmask = cols < D
    valid = cmask[None, :]
    sig = tl.load(COL + SD * plane + dst + cols, mask=cmask, other=1.0)
    nu, d, w, y = _dest_logits(COL, ROW, plane, dst, cols, cmask, mu_c, s2_c)
    if EVEN_J:
        e = tl.exp2(y - m_c)
    else:
        e = tl.exp2(tl.where(valid, y, float("-inf")) - m_c)
    return cols, cmask, valid, d, w, e, e * inv_l_c, (nu - o_mu)[None, :], (sig - o_sd)[None, :]


@triton.jit
def _threshold(alpha_i, std, inv_l, d_f, one_minus_rho):
    """``k = min(t1, t2)`` with ``t1 = 1/D + alpha std`` (one explicit fma, so every kernel gets
    the same bits) and ``t2 = (1 - rho) / l``; ``w1`` = torch.minimum's gradient share of ``t1``."""
    t1 = tl.fma(alpha_i, std, 1.0 / d_f)
    t2 = one_minus_rho * inv_l
    k = tl.minimum(t1, t2)
    w1 = tl.where(t1 < t2, 1.0, tl.where(t1 == t2, 0.5, 0.0))
    return k, w1


@triton.jit
def _grad_pr(pr, e, valid, nu_sh, sig_sh, k, gcz, gaz, uz, gamma, delta):
    """``gPr`` on a tile (0 on masked entries, where also ``pr == 0``) and the mask ``A > 0``;
    arguments already broadcast."""
    above = (pr > k) & valid
    g_a = gcz * nu_sh + gaz * sig_sh - uz
    tie = e >= 1.0  # masked entries have e == 0
    g_pr = tl.where(above, g_a, 0.0) + gamma * pr + tl.where(tie, delta, 0.0)
    return g_pr, above


@triton.jit
def _norm(sum_sq):
    """``sqrt(sum_sq)`` of a sum of squares, Newton-refined (``constraints._sqrt``) where that is
    defined: the root of ``fl(x^2)`` is then ``|x|`` exactly, as torch's norm gives it, so at
    D = 1 the pooled feature is exactly +-1 (the device's ``sqrt.approx`` alone can be an ulp off,
    and normalize's vanishing gradient would become rounding noise / ``|x|``)."""
    ok = (sum_sq >= 1.1754943508222875e-38) & (sum_sq < float("inf"))
    return tl.where(ok, _sqrt(tl.where(ok, sum_sq, 1.0)), tl.sqrt(sum_sq))


@triton.jit
def _x_semantic_sums(ws, u, v, f1, fz, n_b, s):
    """``(sum_n r_x, sum_n r_x zeta, Z2)`` of a column from the token pass's ``r_f`` sums
    (kernels/constraints.py): ``r_x = r_f + w_s (u + v zeta)``, ``sum zeta = 0``,
    ``Z2 = sum zeta^2 = n_b var / s^2``."""
    s2 = s * s
    z2 = n_b * tl.maximum(s2 - _STD_EPS, 0.0) / s2
    return f1 + ws * u * n_b, fz + ws * v * z2, z2


@triton.jit
def _fwd_row_block(
    COL,
    ROW,
    plane,
    dst,
    mu_i,
    s_i,
    alpha_i,
    o_mu,
    o_sd,
    D,
    one_minus_rho,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    EVEN_J: tl.constexpr,
):
    """The three forward sweeps of one row block; returns its per-row statistics."""
    mu_c = mu_i[:, None]
    s2_i = (s_i * s_i)[:, None]
    d_f = D * 1.0

    # sweep 0: row max of the logits (no exp); element-wise into a tile, one reduction at the end
    m_acc = tl.full([BLOCK_I, BLOCK_J], float("-inf"), tl.float32)
    for j0 in range(0, D, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        cmask = cols < D
        _, _, _, y = _dest_logits(COL, ROW, plane, dst, cols, cmask, mu_c, s2_i)
        if not EVEN_J:
            y = tl.where(cmask[None, :], y, float("-inf"))
        m_acc = tl.maximum(m_acc, y)
    m = tl.max(m_acc, 1)

    # sweep 1: e = 2^(y - m); Welford mean / M2 per column slot of the tile (slot jj sees columns
    # jj, jj + BLOCK_J, ...), merged across slots with Chan's formula after the loop
    e_mean = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    e_m2 = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    for j0 in range(0, D, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        cmask = cols < D
        _, _, _, y = _dest_logits(COL, ROW, plane, dst, cols, cmask, mu_c, s2_i)
        inv_n = 1.0 / (j0 // BLOCK_J + 1)  # 1 / (columns seen so far by each slot)
        if EVEN_J:
            e = tl.exp2(y - m[:, None])
            dev = e - e_mean
            e_mean = e_mean + dev * inv_n
            e_m2 = e_m2 + dev * (e - e_mean)
        else:
            valid = cmask[None, :]
            e = tl.exp2(tl.where(valid, y, float("-inf")) - m[:, None])
            dev = e - e_mean
            new_mean = e_mean + dev * inv_n
            e_m2 = tl.where(valid, e_m2 + dev * (e - new_mean), e_m2)
            e_mean = tl.where(valid, new_mean, e_mean)
    slots = tl.arange(0, BLOCK_J)
    n_slot = tl.where(slots < D, (D - slots + BLOCK_J - 1) // BLOCK_J, 0).to(tl.float32)
    row_sum = tl.sum(e_mean * n_slot[None, :], 1)
    spread = e_mean - (row_sum / d_f)[:, None]
    m2 = tl.sum(e_m2 + spread * spread * n_slot[None, :], 1)

    inv_l = 1.0 / row_sum
    var = m2 * inv_l * inv_l / d_f
    pos = var > 0.0
    std = tl.where(pos, tl.sqrt(tl.where(pos, var, 1.0)), 0.0)
    k, _ = _threshold(alpha_i, std, inv_l, d_f, one_minus_rho)

    # sweep 2: soft threshold, normalisation sums and the sums the backward needs (element-wise
    # accumulation into tiles, reduced once after the loop)
    z_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    a_nu_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    a_sig_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    n_pos_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    s_nu_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    s_sig_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    ties_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    for j0 in range(0, D, BLOCK_J):
        cols, cmask, valid, d, w, e, pr, nu_sh, sig_sh = _dest_probs(
            COL,
            ROW,
            plane,
            dst,
            j0,
            D,
            mu_c,
            s2_i,
            m[:, None],
            inv_l[:, None],
            o_mu,
            o_sd,
            BLOCK_J,
            EVEN_J,
        )
        above = pr > k[:, None]
        if not EVEN_J:
            above = above & valid
        a_t = tl.where(above, pr - k[:, None], 0.0)
        pos_f = above.to(tl.float32)
        z_acc += a_t
        a_nu_acc += a_t * nu_sh
        a_sig_acc += a_t * sig_sh
        n_pos_acc += pos_f
        s_nu_acc += pos_f * nu_sh
        s_sig_acc += pos_f * sig_sh
        ties_acc += (e >= 1.0).to(tl.float32)  # masked entries have e == 0
    z = tl.sum(z_acc, 1)
    inv_z = 1.0 / z
    c_sh = tl.sum(a_nu_acc, 1) * inv_z
    a_sh = tl.sum(a_sig_acc, 1) * inv_z
    return (
        m,
        inv_l,
        std,
        z,
        tl.sum(ties_acc, 1),
        tl.sum(n_pos_acc, 1),
        tl.sum(s_nu_acc, 1),
        tl.sum(s_sig_acc, 1),
        c_sh,
        a_sh,
    )


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _related_sampling_fwd_kernel(
    COL,
    ROW,
    ALPHA_V,
    ALPHA_T,
    C,
    A,
    PAIR,
    WSV,
    WST,
    FEAT,
    B,
    D,
    inv_tau,
    coef_b,
    one_minus_rho,
    FUSED: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    EVEN_J: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    dr = tl.program_id(1).to(tl.int64)
    plane = 2 * B * D
    src, dst, o_mu, o_sd = _pair(COL, B, D, plane, b, dr)
    # Logit coefficients of the destination columns (``sigma_0`` = the pair's first one): this
    # program is their only writer; the sweeps read them back after the barrier.
    sig0 = tl.load(COL + SD * plane + dst)
    for j0 in range(0, D, BLOCK_P):
        cols = j0 + tl.arange(0, BLOCK_P)
        cmask = cols < D
        sig = tl.load(COL + SD * plane + dst + cols, mask=cmask, other=1.0)
        rinv = 1.0 / (sig * sig)
        tl.store(ROW + COLA * plane + dst + cols, -tl.log2(sig / sig0) * inv_tau, mask=cmask)
        tl.store(ROW + COLB * plane + dst + cols, coef_b * rinv, mask=cmask)
        tl.store(ROW + RINV * plane + dst + cols, rinv, mask=cmask)
    tl.debug_barrier()

    lx_acc = tl.zeros([BLOCK_I], tl.float32)
    c_sq = tl.zeros([BLOCK_I], tl.float32)
    mu_sq = tl.zeros([BLOCK_I], tl.float32)
    if FUSED:
        n_b = tl.load(PAIR + COUNT * 2 * B + dr * B + b)
    for i0 in range(0, D, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        rmask = rows < D
        o = src + rows
        mu_i = tl.load(COL + MU * plane + o, mask=rmask, other=0.0)
        s_i = tl.load(COL + SD * plane + o, mask=rmask, other=1.0)
        alpha_i = _by_direction(ALPHA_V, ALPHA_T, dr, rows, rmask)
        m, inv_l, std, z, ties, n_pos, s_nu, s_sig, c_sh, a_sh = _fwd_row_block(
            COL,
            ROW,
            plane,
            dst,
            mu_i,
            s_i,
            alpha_i,
            o_mu,
            o_sd,
            D,
            one_minus_rho,
            BLOCK_I,
            BLOCK_J,
            EVEN_J,
        )
        tl.store(ROW + ROW_MAX * plane + o, m, mask=rmask)
        tl.store(ROW + INV_L * plane + o, inv_l, mask=rmask)
        tl.store(ROW + STD * plane + o, std, mask=rmask)
        tl.store(ROW + Z * plane + o, z, mask=rmask)
        tl.store(ROW + TIES * plane + o, ties, mask=rmask)
        tl.store(ROW + NPOS * plane + o, n_pos, mask=rmask)
        tl.store(ROW + SNU * plane + o, s_nu, mask=rmask)
        tl.store(ROW + SSIG * plane + o, s_sig, mask=rmask)
        tl.store(ROW + CSH * plane + o, c_sh, mask=rmask)
        tl.store(ROW + ASH * plane + o, a_sh, mask=rmask)
        if FUSED:
            # the pair's sum r_x^2 beyond sum r_f^2 (kernels/constraints.py), and |c|^2
            ws = _by_direction(WSV, WST, dr, rows, rmask)
            f1 = tl.load(COL + F1 * plane + o, mask=rmask, other=0.0)
            fz = tl.load(COL + FZ * plane + o, mask=rmask, other=0.0)
            u = c_sh + (o_mu - mu_i)
            v = a_sh + (o_sd - s_i)
            _, _, z2 = _x_semantic_sums(ws, u, v, f1, fz, n_b, s_i)
            lx = 2.0 * ws * (u * f1 + v * fz) + ws * ws * (u * u * n_b + v * v * z2)
            lx_acc += tl.where(rmask, lx, 0.0)
            c = c_sh + o_mu
            c_sq += tl.where(rmask, c * c, 0.0)
            mu_sq += mu_i * mu_i  # 0 on padded rows
        else:
            tl.store(C + o, c_sh + o_mu, mask=rmask)
            tl.store(A + o, a_sh + o_sd, mask=rmask)
    if FUSED:
        o_pair = PAIR + dr * B + b
        tl.store(o_pair + LX * 2 * B, tl.sum(lx_acc, 0))
        norm_c = _norm(tl.sum(c_sq, 0))
        norm_mu = _norm(tl.sum(mu_sq, 0))
        tl.store(o_pair + NORM_C * 2 * B, norm_c)
        tl.store(o_pair + NORM_MU * 2 * B, norm_mu)
        # The pooled features of the source modality into the InfoNCE rows x and columns y of
        # FEAT [2, 3, B, D] (problems (image, text), (image, image_x), (text, text_x)):
        # pool(X^s) = mu / max(|mu|, eps) into x[0], x[1] (image) or y[0], x[2] (text),
        # pool(X^x) = c / max(|c|, eps) into y[1 + dr]; c read back after every thread's store.
        # IEEE divisions, as F.normalize's: at D = 1 the features are then exactly +-1 and
        # normalize's gradient exactly 0 (a reciprocal, or the device's div.full, is an ulp off)
        den_c = tl.maximum(norm_c, NORM_EPS)
        den_mu = tl.maximum(norm_mu, NORM_EPS)
        tl.debug_barrier()
        for i0 in range(0, D, BLOCK_I):
            rows = i0 + tl.arange(0, BLOCK_I)
            rmask = rows < D
            c = tl.load(ROW + CSH * plane + src + rows, mask=rmask, other=0.0) + o_mu
            tl.store(FEAT + ((4 + dr) * B + b) * D + rows, tl.math.div_rn(c, den_c), mask=rmask)
            mu = tl.load(COL + MU * plane + src + rows, mask=rmask, other=0.0)
            mu = tl.math.div_rn(mu, den_mu)
            tl.store(FEAT + (3 * dr * B + b) * D + rows, mu, mask=rmask)
            tl.store(FEAT + ((1 + dr) * B + b) * D + rows, mu, mask=rmask)


@triton.jit
def _related_sampling_bwd_row_kernel(
    COL,
    ROW,
    ALPHA_V,
    ALPHA_T,
    GC_IN,
    GA_IN,
    COEF,
    PAIR,
    WSV,
    WST,
    FEAT,
    DX,
    DY,
    SCR,
    GMU,
    GSD,
    PART,
    B,
    D,
    inv_tau,
    one_minus_rho,
    FUSED: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    EVEN_J: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    dr = tl.program_id(1).to(tl.int64)
    plane = 2 * B * D
    src, dst, o_mu, o_sd = _pair(COL, B, D, plane, b, dr)
    d_f = D * 1.0
    if FUSED:
        k_f = tl.load(COEF + K_F + 3 * dr)
        k_x = tl.load(COEF + K_X + 3 * dr)
        o_pair = PAIR + dr * B + b
        n_b = tl.load(o_pair + COUNT * 2 * B)
        norm_mu = tl.load(o_pair + NORM_MU * 2 * B)
        norm_c = tl.load(o_pair + NORM_C * 2 * B)
        # the pooled features of this pair and direction in FEAT [2, 3, B, D] (x, y of the three
        # InfoNCE problems) and their gradients DX, DY [3, B, D]: pool(X^s) is x[0] (image) or
        # y[0] (text), also x[1 + dr]; pool(X^x) is y[1 + dr]
        feat_mu = FEAT + (3 * dr * B + b) * D
        feat_c = FEAT + ((4 + dr) * B + b) * D
        g_mu_also = DX + ((1 + dr) * B + b) * D
        g_c_feat = DY + ((1 + dr) * B + b) * D
        dot_mu_acc = tl.zeros([BLOCK_P], tl.float32)
        dot_c_acc = tl.zeros([BLOCK_P], tl.float32)
        for j0 in range(0, D, BLOCK_P):
            cols = j0 + tl.arange(0, BLOCK_P)
            cmask = cols < D
            g_mu_f = _by_direction(DX, DY, dr, b * D + cols, cmask) + tl.load(
                g_mu_also + cols, mask=cmask, other=0.0
            )
            dot_mu_acc += g_mu_f * tl.load(feat_mu + cols, mask=cmask, other=0.0)
            dot_c_acc += tl.load(g_c_feat + cols, mask=cmask, other=0.0) * tl.load(
                feat_c + cols, mask=cmask, other=0.0
            )
        # F.normalize's backward: (g - y <g, y>) / max(|x|, eps); a clamped norm is a constant
        dot_mu = tl.where(norm_mu > NORM_EPS, tl.sum(dot_mu_acc, 0), 0.0)
        dot_c = tl.where(norm_c > NORM_EPS, tl.sum(dot_c_acc, 0), 0.0)
        inv_q_mu = 1.0 / tl.maximum(norm_mu, NORM_EPS)
        inv_q_c = 1.0 / tl.maximum(norm_c, NORM_EPS)
        # Pass A (elementwise): every row's gc, ga and direct mu, s terms, stashed where the
        # sweep loop reads them back (the rows' gc/Z, ga/Z scratch and the gradient rows it
        # completes); a pass of its own, as interleaved with the sweep this work would about
        # double the kernel's registers (benchmarks/RESULTS.md).
        for i0 in range(0, D, BLOCK_I):
            rows = i0 + tl.arange(0, BLOCK_I)
            rmask = rows < D
            o = src + rows
            mu_i = tl.load(COL + MU * plane + o, mask=rmask, other=0.0)
            s_i = tl.load(COL + SD * plane + o, mask=rmask, other=1.0)
            c_sh = tl.load(ROW + CSH * plane + o, mask=rmask, other=0.0)
            a_sh = tl.load(ROW + ASH * plane + o, mask=rmask, other=0.0)
            ws = _by_direction(WSV, WST, dr, rows, rmask)
            f1 = tl.load(COL + F1 * plane + o, mask=rmask, other=0.0)
            fz = tl.load(COL + FZ * plane + o, mask=rmask, other=0.0)
            fm = tl.load(COL + FM * plane + o, mask=rmask, other=0.0)
            sum_m = tl.load(COL + M1 * plane + o, mask=rmask, other=0.0)
            zm = tl.load(COL + ZM * plane + o, mask=rmask, other=0.0)
            mu_res = tl.load(COL + MU_RES * plane + o, mask=rmask, other=0.0)
            u = c_sh + (o_mu - mu_i)
            v = a_sh + (o_sd - s_i)
            rx1, rxz, _ = _x_semantic_sums(ws, u, v, f1, fz, n_b, s_i)
            gc_con = k_x * ws * rx1
            ga_con = k_x * ws * rxz
            c = c_sh + o_mu
            a = a_sh + o_sd
            a_over_s = a / s_i
            g_mu_f = _by_direction(DX, DY, dr, b * D + rows, rmask) + tl.load(
                g_mu_also + rows, mask=rmask, other=0.0
            )
            y_mu = tl.load(feat_mu + rows, mask=rmask, other=0.0)
            g_c_f = tl.load(g_c_feat + rows, mask=rmask, other=0.0)
            y_c = tl.load(feat_c + rows, mask=rmask, other=0.0)
            tl.store(SCR + GCZ * plane + o, gc_con + (g_c_f - y_c * dot_c) * inv_q_c, mask=rmask)
            tl.store(SCR + GAZ * plane + o, ga_con, mask=rmask)
            tl.store(GMU + o, (g_mu_f - y_mu * dot_mu) * inv_q_mu - a_over_s * gc_con, mask=rmask)
            tl.store(GSD + o, -a_over_s * ga_con, mask=rmask)
            # w gradients: sum r_f X^s = (mu + mu_res) F1 + s FZ; sum r_x X^x = c rx1 + a rxz;
            # sum r_x X^m = FM + w_s (u M1 + v ZM)
            fxs = (mu_i + mu_res) * f1 + s_i * fz
            tl.store(PART + G_WS * plane + o, k_f * fxs + k_x * (c * rx1 + a * rxz), mask=rmask)
            tl.store(
                PART + G_WM * plane + o,
                k_f * fm + k_x * (fm + ws * (u * sum_m + v * zm)),
                mask=rmask,
            )
        tl.debug_barrier()
        G_C = SCR + GCZ * plane
        G_A = SCR + GAZ * plane
    else:
        G_C = GC_IN
        G_A = GA_IN
    for i0 in range(0, D, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        rmask = rows < D
        o = src + rows
        gc = tl.load(G_C + o, mask=rmask, other=0.0)
        ga = tl.load(G_A + o, mask=rmask, other=0.0)
        if FUSED:
            extra_mu = tl.load(GMU + o, mask=rmask, other=0.0)
            extra_s = tl.load(GSD + o, mask=rmask, other=0.0)
            # every thread has read this block's stash before any overwrites it (the stores
            # below may map rows to other threads)
            tl.debug_barrier()
        else:
            extra_mu = 0.0
            extra_s = 0.0
        mu_i = tl.load(COL + MU * plane + o, mask=rmask, other=0.0)
        s_i = tl.load(COL + SD * plane + o, mask=rmask, other=1.0)
        alpha_i = _by_direction(ALPHA_V, ALPHA_T, dr, rows, rmask)
        m = tl.load(ROW + ROW_MAX * plane + o, mask=rmask, other=float("inf"))
        inv_l = tl.load(ROW + INV_L * plane + o, mask=rmask, other=0.0)
        std = tl.load(ROW + STD * plane + o, mask=rmask, other=0.0)
        z = tl.load(ROW + Z * plane + o, mask=rmask, other=1.0)
        ties = tl.load(ROW + TIES * plane + o, mask=rmask, other=1.0)
        n_pos = tl.load(ROW + NPOS * plane + o, mask=rmask, other=0.0)
        s_nu = tl.load(ROW + SNU * plane + o, mask=rmask, other=0.0)
        s_sig = tl.load(ROW + SSIG * plane + o, mask=rmask, other=0.0)
        c_sh = tl.load(ROW + CSH * plane + o, mask=rmask, other=0.0)
        a_sh = tl.load(ROW + ASH * plane + o, mask=rmask, other=0.0)
        k, w1 = _threshold(alpha_i, std, inv_l, d_f, one_minus_rho)

        inv_z = 1.0 / z
        u_g = gc * c_sh + ga * a_sh  # = gc c + ga a, up to the offsets that cancel in gW - u
        h = (gc * s_nu + ga * s_sig - u_g * n_pos) * inv_z  # sum_{A>0} gA  (g_k = -h)
        g_t1 = -h * w1
        g_t2 = -h - g_t1
        pos = std > 0.0
        gamma = tl.where(pos, alpha_i * g_t1 / (d_f * tl.where(pos, std, 1.0)), 0.0)
        delta = one_minus_rho * g_t2 / ties
        gcz = gc * inv_z
        gaz = ga * inv_z
        uz = u_g * inv_z
        tl.store(PART + G_ALPHA * plane + o, std * g_t1, mask=rmask)
        tl.store(SCR + GCZ * plane + o, gcz, mask=rmask)
        tl.store(SCR + GAZ * plane + o, gaz, mask=rmask)
        tl.store(SCR + UZ * plane + o, uz, mask=rmask)
        tl.store(SCR + GAMMA * plane + o, gamma, mask=rmask)
        tl.store(SCR + DELTA * plane + o, delta, mask=rmask)

        # One sweep: g_x = Pr (gPr - dot) is linear in dot = sum_j Pr gPr, so the row sums
        # sum_j g_x f_j = sum_j Pr gPr f_j - dot sum_j Pr f_j are accumulated as two sums each.
        mu_c = mu_i[:, None]
        s2_c = (s_i * s_i)[:, None]
        m_c = m[:, None]
        inv_l_c = inv_l[:, None]
        k_c = k[:, None]
        gcz_c = gcz[:, None]
        gaz_c = gaz[:, None]
        uz_c = uz[:, None]
        gamma_c = gamma[:, None]
        delta_c = delta[:, None]
        dot_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        q_r_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        q_dr_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        p_r_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        p_dr_acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        for j0 in range(0, D, BLOCK_J):
            cols, cmask, valid, d, w, e, pr, nu_sh, sig_sh = _dest_probs(
                COL, ROW, plane, dst, j0, D, mu_c, s2_c, m_c, inv_l_c, o_mu, o_sd, BLOCK_J, EVEN_J
            )
            r = tl.load(ROW + RINV * plane + dst + cols, mask=cmask, other=0.0)[None, :]
            g_pr, above = _grad_pr(
                pr, e, valid, nu_sh, sig_sh, k_c, gcz_c, gaz_c, uz_c, gamma_c, delta_c
            )
            pg = pr * g_pr
            d_r = d * r
            dot_acc += pg
            q_r_acc += pr * r
            q_dr_acc += pr * d_r
            p_r_acc += pg * r
            p_dr_acc += pg * d_r
        dot = tl.sum(dot_acc, 1)
        q_r = tl.sum(q_r_acc, 1)
        q_dr = tl.sum(q_dr_acc, 1)
        p_r = tl.sum(p_r_acc, 1)
        p_dr = tl.sum(p_dr_acc, 1)

        tl.store(SCR + DOT * plane + o, dot, mask=rmask)
        # sum_j g_x_ij = dot (1 - sum_j Pr_ij) = 0: the -1/s_i part of dS/ds_i (the row constant
        # -ln s_i of the KL) has no effect on the softmax and is left out
        r_r = p_r - dot * q_r  # sum_j g_x_ij / sigma_j^2
        r_mu = p_dr - dot * q_dr  # sum_j g_x_ij d_ij / sigma_j^2
        tl.store(GMU + o, -inv_tau * r_mu + extra_mu, mask=rmask)
        tl.store(GSD + o, -inv_tau * s_i * r_r + extra_s, mask=rmask)


@triton.jit
def _related_sampling_bwd_col_kernel(
    COL,
    ROW,
    ALPHA_V,
    ALPHA_T,
    SCR,
    GMU,
    GSD,
    B,
    D,
    n_blk,
    inv_tau,
    one_minus_rho,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    EVEN_I: tl.constexpr,
):
    # tile [BLOCK_J owned columns j, BLOCK_I rows i]: the per-row vectors loaded at every step
    # lie along the fast axis (vector loads); the per-column ones are loaded once
    pid = tl.program_id(0)
    dr = tl.program_id(1).to(tl.int64)
    b = (pid // n_blk).to(tl.int64)
    plane = 2 * B * D
    src, dst, o_mu, o_sd = _pair(COL, B, D, plane, b, dr)
    d_f = D * 1.0
    cols = (pid % n_blk) * BLOCK_J + tl.arange(0, BLOCK_J)
    cmask = cols < D
    oc = dst + cols
    nu = tl.load(COL + MU * plane + oc, mask=cmask, other=0.0)
    sig = tl.load(COL + SD * plane + oc, mask=cmask, other=1.0)
    r = tl.load(ROW + RINV * plane + oc, mask=cmask, other=0.0)
    nu_c = nu[:, None]
    col_a = tl.load(ROW + COLA * plane + oc, mask=cmask, other=0.0)[:, None]
    col_b = tl.load(ROW + COLB * plane + oc, mask=cmask, other=0.0)[:, None]
    r_c = r[:, None]
    nu_sh = (nu - o_mu)[:, None]
    sig_sh = (sig - o_sd)[:, None]

    c_d_acc = tl.zeros([BLOCK_J, BLOCK_I], tl.float32)
    c_t_acc = tl.zeros([BLOCK_J, BLOCK_I], tl.float32)
    c_c_acc = tl.zeros([BLOCK_J, BLOCK_I], tl.float32)
    c_a_acc = tl.zeros([BLOCK_J, BLOCK_I], tl.float32)
    for i0 in range(0, D, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        rmask = rows < D
        o = src + rows
        mu_i = tl.load(COL + MU * plane + o, mask=rmask, other=0.0)
        s_i = tl.load(COL + SD * plane + o, mask=rmask, other=1.0)
        m = tl.load(ROW + ROW_MAX * plane + o, mask=rmask, other=float("inf"))
        inv_l = tl.load(ROW + INV_L * plane + o, mask=rmask, other=0.0)
        std = tl.load(ROW + STD * plane + o, mask=rmask, other=0.0)
        alpha_i = _by_direction(ALPHA_V, ALPHA_T, dr, rows, rmask)
        k, _ = _threshold(alpha_i, std, inv_l, d_f, one_minus_rho)
        k = tl.where(rmask, k, 1.0)[None, :]
        gcz = tl.load(SCR + GCZ * plane + o, mask=rmask, other=0.0)[None, :]
        gaz = tl.load(SCR + GAZ * plane + o, mask=rmask, other=0.0)[None, :]
        uz = tl.load(SCR + UZ * plane + o, mask=rmask, other=0.0)[None, :]
        gamma = tl.load(SCR + GAMMA * plane + o, mask=rmask, other=0.0)[None, :]
        delta = tl.load(SCR + DELTA * plane + o, mask=rmask, other=0.0)[None, :]
        dot = tl.load(SCR + DOT * plane + o, mask=rmask, other=0.0)[None, :]
        d, w, y = _logits(mu_i[None, :], (s_i * s_i)[None, :], nu_c, col_a, col_b)
        if EVEN_I:
            valid = cmask[:, None]
            e = tl.exp2(y - m[None, :])
        else:
            valid = rmask[None, :] & cmask[:, None]
            e = tl.exp2(tl.where(rmask[None, :], y, float("-inf")) - m[None, :])
        pr = e * inv_l[None, :]
        g_pr, above = _grad_pr(pr, e, valid, nu_sh, sig_sh, k, gcz, gaz, uz, gamma, delta)
        g_x = pr * (g_pr - dot)  # 0 on masked rows (pr == 0, g_pr finite)
        c_d_acc += g_x * d
        c_t_acc += g_x * (1.0 - w * r_c)
        a_t = tl.where(above, pr - k, 0.0)
        c_c_acc += a_t * gcz
        c_a_acc += a_t * gaz
    c_d = tl.sum(c_d_acc, 1)
    c_t = tl.sum(c_t_acc, 1)
    c_c = tl.sum(c_c_acc, 1)
    c_a = tl.sum(c_a_acc, 1)

    # GMU/GSD of the destination modality already hold the row part of the other direction
    g_nu = tl.load(GMU + oc, mask=cmask, other=0.0) + r * inv_tau * c_d + c_c
    g_sig = tl.load(GSD + oc, mask=cmask, other=0.0) - inv_tau * c_t / sig + c_a
    tl.store(GMU + oc, g_nu, mask=cmask)
    tl.store(GSD + oc, g_sig, mask=cmask)


@triton.jit
def _related_sampling_vec_kernel(
    PART,
    GAV,
    GAT,
    GWSV,
    GWST,
    GWMV,
    GWMT,
    B,
    D,
    HAS_W: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (column block, modality): the per-pair rows of ``PART`` summed over pairs, stored in
    each output's dtype (``g_alpha``; with ``HAS_W`` also ``g_w_s``, ``g_w_m``)."""
    dr = tl.program_id(1).to(tl.int64)
    plane = 2 * B * D
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc_a = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    acc_s = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    acc_m = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        ld = (rb < B)[:, None] & col_ok[None, :]
        offs = (dr * B + rb[:, None]) * D + cols[None, :]
        acc_a += tl.load(PART + G_ALPHA * plane + offs, mask=ld, other=0.0)
        if HAS_W:
            acc_s += tl.load(PART + G_WS * plane + offs, mask=ld, other=0.0)
            acc_m += tl.load(PART + G_WM * plane + offs, mask=ld, other=0.0)
    g_alpha = tl.sum(acc_a, 0)
    g_ws = tl.sum(acc_s, 0)
    g_wm = tl.sum(acc_m, 0)
    if dr == 0:
        tl.store(GAV + cols, g_alpha.to(GAV.dtype.element_ty), mask=col_ok)
        if HAS_W:
            tl.store(GWSV + cols, g_ws.to(GWSV.dtype.element_ty), mask=col_ok)
            tl.store(GWMV + cols, g_wm.to(GWMV.dtype.element_ty), mask=col_ok)
    else:
        tl.store(GAT + cols, g_alpha.to(GAT.dtype.element_ty), mask=col_ok)
        if HAS_W:
            tl.store(GWST + cols, g_ws.to(GWST.dtype.element_ty), mask=col_ok)
            tl.store(GWMT + cols, g_wm.to(GWMT.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _prologue_block(d: int) -> tuple[int, int]:
    block = block_for(d, cap=1024)
    return block, num_warps_for(block)


def sampling_forward(
    col: Tensor,
    row: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    *,
    tau_kl: float,
    rho: float,
    fused: dict | None = None,
) -> tuple[Tensor, Tensor] | None:
    """Launch the forward: fills ``row`` [N_ROW, 2, B, D] from the statistics planes of ``col``
    ([>= 2, 2, B, D]: ``MU``, ``SD``, and with ``fused`` the token-pass sums).

    Without ``fused`` returns ``(c, a)`` [2, B, D] fp32 (index 0 = image->text). With
    ``fused = dict(pair=, w_s=(image, text), feat=)`` (the loss) writes the ``L_x``, ``|mu|`` and
    ``|c|`` entries of ``pair`` and the pooled features ``feat`` [2, 3, B, D] instead, and
    returns None."""
    _, _, bsz, d = col.shape
    dev = col.device
    bi, bj, warps = _tiles(d, "fwd", dev)
    block_p, _ = _prologue_block(d)
    if fused is None:
        c = torch.empty((2, bsz, d), dtype=torch.float32, device=dev)
        a = torch.empty((2, bsz, d), dtype=torch.float32, device=dev)
        extra = (col, col, col, col)  # unused pointers (FUSED is a constexpr)
    else:
        c = a = col
        extra = (fused["pair"], *fused["w_s"], fused["feat"])
    _related_sampling_fwd_kernel[(bsz, 2)](
        col,
        row,
        alpha_image,
        alpha_text,
        c,
        a,
        *extra,
        bsz,
        d,
        1.0 / tau_kl,
        -0.5 * LOG2E / tau_kl,
        1.0 - rho,
        FUSED=fused is not None,
        BLOCK_I=bi,
        BLOCK_J=bj,
        EVEN_J=d % bj == 0,
        BLOCK_P=block_p,
        num_warps=warps,
    )
    return None if fused is not None else (c, a)


def sampling_backward(
    col: Tensor,
    row: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    *,
    tau_kl: float,
    rho: float,
    g_c: Tensor | None = None,
    g_a: Tensor | None = None,
    fused: dict | None = None,
    g_alpha: tuple[Tensor, Tensor],
    g_w: tuple[Tensor, ...] = (),
) -> tuple[Tensor, Tensor]:
    """Launch the backward: returns fp32 ``g_mu``, ``g_s`` [2, B, D] (index 0 = image) and
    writes the gradients of ``alpha_image``, ``alpha_text`` into ``g_alpha`` (any dtypes).

    Without ``fused``: the upstream gradients ``g_c``, ``g_a`` [2, B, D] of the outputs. With
    ``fused = dict(coef=, pair=, w_s=(image, text), feat=, dx=, dy=)`` (the loss) they are formed
    in the row kernel (module docstring) and ``g_w = (w_s_image, w_s_text, w_m_image,
    w_m_text)`` gradient buffers are written too."""
    _, _, bsz, d = col.shape
    dev = col.device
    row_scratch = torch.empty((N_SCRATCH, 2, bsz, d), dtype=torch.float32, device=dev)
    g_mu = torch.empty((2, bsz, d), dtype=torch.float32, device=dev)
    g_sd = torch.empty((2, bsz, d), dtype=torch.float32, device=dev)
    part = torch.empty(
        (N_PART if fused is not None else 1, 2, bsz, d), dtype=torch.float32, device=dev
    )
    block_p, _ = _prologue_block(d)
    if fused is None:
        g_c = g_c.float().contiguous()
        g_a = g_a.float().contiguous()
        extra = (col, col, col, col, col, col, col)
    else:
        g_c = g_a = col
        extra = (
            fused["coef"],
            fused["pair"],
            *fused["w_s"],
            fused["feat"],
            fused["dx"],
            fused["dy"],
        )
    bi, bj, warps = _tiles(d, "row", dev)
    _related_sampling_bwd_row_kernel[(bsz, 2)](
        col,
        row,
        alpha_image,
        alpha_text,
        g_c,
        g_a,
        *extra,
        row_scratch,
        g_mu,
        g_sd,
        part,
        bsz,
        d,
        1.0 / tau_kl,
        1.0 - rho,
        FUSED=fused is not None,
        BLOCK_I=bi,
        BLOCK_J=bj,
        EVEN_J=d % bj == 0,
        BLOCK_P=block_p,
        num_warps=warps,
    )
    bi, bj, warps = _tiles(d, "col", dev)
    n_blk = triton.cdiv(d, bj)
    _related_sampling_bwd_col_kernel[(bsz * n_blk, 2)](
        col,
        row,
        alpha_image,
        alpha_text,
        row_scratch,
        g_mu,
        g_sd,
        bsz,
        d,
        n_blk,
        1.0 / tau_kl,
        1.0 - rho,
        BLOCK_I=bi,
        BLOCK_J=bj,
        EVEN_I=d % bi == 0,
        num_warps=warps,
    )
    block_b, block_d = 8, block_for(d, cap=128)
    _related_sampling_vec_kernel[(triton.cdiv(d, block_d), 2)](
        part,
        *g_alpha,
        *(g_w or (g_alpha[0],) * 4),
        bsz,
        d,
        HAS_W=bool(g_w),
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        num_warps=num_warps_for(block_b * block_d),
    )
    return g_mu, g_sd


# --------------------------------------------------------------------------------------------
# The standalone op: torch.library ops (so that torch.compile'd callers treat the kernels as
# opaque) + autograd
# --------------------------------------------------------------------------------------------


def _forward(
    mu_v: Tensor,
    s_v: Tensor,
    mu_t: Tensor,
    s_t: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    tau_kl: float,
    rho: float,
) -> tuple[Tensor, Tensor, Tensor]:
    bsz, d = mu_v.shape
    # one saved tensor: the statistics planes (MU, SD) followed by the forward's ``row`` planes
    stats = torch.empty((2 + N_ROW, 2, bsz, d), dtype=torch.float32, device=mu_v.device)
    # the one copy: inputs (any strides / float dtype) -> contiguous fp32 planes
    stats[MU.value, 0].copy_(mu_v)
    stats[MU.value, 1].copy_(mu_t)
    stats[SD.value, 0].copy_(s_v)
    stats[SD.value, 1].copy_(s_t)
    c, a = sampling_forward(
        stats, stats[2:], alpha_image.contiguous(), alpha_text.contiguous(), tau_kl=tau_kl, rho=rho
    )
    return c, a, stats


def _backward(
    g_c: Tensor,
    g_a: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    stats: Tensor,
    tau_kl: float,
    rho: float,
) -> tuple[Tensor, Tensor, Tensor]:
    d = stats.shape[3]
    g_alpha = torch.empty((2, d), dtype=torch.float32, device=stats.device)
    g_mu, g_sd = sampling_backward(
        stats,
        stats[2:],
        alpha_image.contiguous(),
        alpha_text.contiguous(),
        tau_kl=tau_kl,
        rho=rho,
        g_c=g_c,
        g_a=g_a,
        g_alpha=(g_alpha[0], g_alpha[1]),
    )
    return g_mu, g_sd, g_alpha


@torch.library.custom_op("cdds_fast::related_sampling", mutates_args=())
def _related_sampling_op(
    mu_v: Tensor,
    s_v: Tensor,
    mu_t: Tensor,
    s_t: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    tau_kl: float,
    rho: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``c [2, B, D]``, ``a [2, B, D]`` (index 0 = image->text) and ``stats``."""
    return _forward(mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, tau_kl, rho)


@_related_sampling_op.register_fake
def _(mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, tau_kl, rho):
    bsz, d = mu_v.shape
    c = mu_v.new_empty((2, bsz, d), dtype=torch.float32)
    return c, torch.empty_like(c), mu_v.new_empty((2 + N_ROW, 2, bsz, d), dtype=torch.float32)


@torch.library.custom_op("cdds_fast::related_sampling_backward", mutates_args=())
def _related_sampling_backward_op(
    g_c: Tensor,
    g_a: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    stats: Tensor,
    tau_kl: float,
    rho: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 ``g_mu [2, B, D]``, ``g_s [2, B, D]`` (index 0 = image) and ``g_alpha [2, D]``."""
    return _backward(g_c, g_a, alpha_image, alpha_text, stats, tau_kl, rho)


@_related_sampling_backward_op.register_fake
def _(g_c, g_a, alpha_image, alpha_text, stats, tau_kl, rho):
    g_mu = stats.new_empty(stats.shape[1:], dtype=torch.float32)
    return g_mu, torch.empty_like(g_mu), stats.new_empty((2, stats.shape[3]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, tau_kl, rho = inputs
    c, a, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)  # no zero-filled [fields, 2, B, D] gradient for stats
    ctx.save_for_backward(alpha_image, alpha_text, stats)
    ctx.tau_kl, ctx.rho = tau_kl, rho
    ctx.dtypes = (mu_v.dtype, s_v.dtype, mu_t.dtype, s_t.dtype)


def _autograd_backward(ctx, g_c, g_a, g_stats):
    alpha_image, alpha_text, stats = ctx.saved_tensors
    g_c = torch.zeros_like(stats[0]) if g_c is None else g_c
    g_a = torch.zeros_like(stats[0]) if g_a is None else g_a
    g_mu, g_sd, g_alpha = _related_sampling_backward_op(
        g_c, g_a, alpha_image, alpha_text, stats, ctx.tau_kl, ctx.rho
    )
    dt_mu_v, dt_s_v, dt_mu_t, dt_s_t = ctx.dtypes
    return (
        g_mu[0].to(dt_mu_v),
        g_sd[0].to(dt_s_v),
        g_mu[1].to(dt_mu_t),
        g_sd[1].to(dt_s_t),
        g_alpha[0].to(alpha_image.dtype),
        g_alpha[1].to(alpha_text.dtype),
        None,
        None,
    )


_related_sampling_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def _check_inputs(mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, tau_kl, rho) -> None:
    stats = {"mu_v": mu_v, "s_v": s_v, "mu_t": mu_t, "s_t": s_t}
    for name, t in stats.items():
        check_tensor(name, t, ndim=2)
    shape = list(mu_v.shape)
    for name, t in stats.items():
        if list(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (same as mu_v), got {list(t.shape)}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"mu_v: expected shape [B, D] with B, D >= 1, got {shape}")
    for name, t in (("alpha_image", alpha_image), ("alpha_text", alpha_text)):
        check_tensor(name, t, ndim=1)
        if t.shape[0] != shape[1]:
            raise ValueError(f"{name}: expected shape [D] = [{shape[1]}], got {list(t.shape)}")
    check_same_device({**stats, "alpha_image": alpha_image, "alpha_text": alpha_text})
    check_hyper(tau_kl=tau_kl, rho=rho)  # numbers (TypeError otherwise) in their ranges
    if not device_supports_triton(mu_v.device):
        raise ValueError(
            f"mu_v: expected CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 and triton "
            f"installed), got device {mu_v.device}; use cdds_fast.reference for this device"
        )


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
    """Sampling coefficients of both directions from column statistics (sections 3-4).

    Args:
        mu_v, s_v, mu_t, s_t: ``[B, D]`` column statistics (any float dtype and strides; computed
            in fp32). ``s`` must be positive (column_stats guarantees ``s >= sqrt(1e-5)``).
        alpha_image, alpha_text: ``[D]`` threshold scales (gradients returned in their dtype).
        tau_kl: softmax temperature on ``-KL`` (> 0). rho: threshold clamp, in ``[1e-6, 1)``.
    Returns:
        ``(c_v, a_v, c_t, a_t)``, each ``[B, D]`` float32: ``c_v = W_v mu_t``, ``a_v = W_v s_t``,
        ``c_t = W_t mu_v``, ``a_t = W_t s_v``. Differentiable w.r.t. all six tensors.
    """
    _check_inputs(mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, tau_kl, rho)
    c, a, _ = _related_sampling_op(
        mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, float(tau_kl), float(rho)
    )
    return c[0], a[0], c[1], a[1]


__all__ = ["related_sampling", "sampling_backward", "sampling_forward"]
