r"""Fused related-semantics weights + distribution sampling (spec sections 4-5), both directions.

``related_sampling(mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, *, tau_kl, rho)`` returns
``(c_v, a_v, c_t, a_t)`` with ``c_v = W_v mu_t``, ``a_v = W_v s_t`` (image -> text, ``W_v`` from
``alpha_image``) and ``c_t = W_t mu_v``, ``a_t = W_t s_v`` (text -> image, ``alpha_text``), equal to
``reference.related.related_weights`` + ``reference.sampling.sampling_coefficients`` in values and
in gradients (including the reference's conventions at non-differentiable points). The ``[B, D, D]``
matrices ``S``, ``Pr``, ``A``, ``W`` are never stored: every kernel recomputes its 2-D tile of them
from ``[B, D]`` vectors, so memory is ``O(B * D)``. The direction is a grid axis (one launch per
kernel for both directions).

Math (one direction, one pair ``b``; rows ``i`` = source columns ``(mu_i, s_i, alpha_i)``, columns
``j`` = destination columns ``(nu_j, sigma_j)``)
--------------------------------------------------------------------------------------------------
Logits.  ``d_ij = mu_i - nu_j``, ``w_ij = s_i^2 + d_ij^2``,
``S_ij = ln sigma_j - ln s_i + w_ij / (2 sigma_j^2) - 1/2``. The row constants ``-ln s_i - 1/2``
cancel in the softmax, and so does a per-pair constant ``ln sigma_0`` (``sigma_0`` = the pair's
first destination column, which keeps ``|colA|`` small), so the kernels use base-2 logits
``y_ij = colA_j + w_ij colB_j`` with ``colA_j = -log2(sigma_j / sigma_0) / tau``,
``colB_j = -log2(e) / (2 tau sigma_j^2)`` (precomputed once per column by
``_related_sampling_coef_kernel``, together with ``1 / sigma_j^2``): one sub + two explicit FMAs
per element, bit-identical in every kernel (the tie test below relies on it).
``Pr_ij = 2^(y_ij - m_i) / l_i``.

Forward (``_related_sampling_fwd_kernel``, program = pair b x direction x ``BLOCK_I`` rows, three
sweeps over ``j`` in ``[BLOCK_I, BLOCK_J]`` tiles; every sum is accumulated element-wise in a tile
of registers and reduced once after its sweep, so no cross-thread traffic inside the loops):
* sweep 0: ``m_i = max_j y_ij`` (no exp).
* sweep 1: ``e = 2^(y - m)``; Welford mean / M2 per column slot, merged with Chan's formula:
  ``l_i = sum_j e``, ``M2_i = sum_j (e - l/D)^2`` (numerically a two-pass variance). Then
  ``mean = 1/D`` (the exact value of the reference's ``Pr.mean()``), ``var = M2 / (D l^2)``
  (population), ``std = sqrt(var)`` (0 where var == 0), ``t1 = mean + alpha_i std``,
  ``t2 = (1 - rho) max_j Pr = (1 - rho) / l``, ``k = min(t1, t2)``, branch weight ``w1`` = 1 / 0 /
  0.5 for ``t1 < t2`` / ``>`` / tie (torch.minimum's split).
* sweep 2: ``A = relu(Pr - k)``, ``Z = sum A``, ``c = sum A nu / Z``, ``a = sum A sigma / Z``;
  for the backward ``N+ = #{A > 0}``, ``Snu = sum_{A>0} nu``, ``Ssig = sum_{A>0} sigma`` and the tie
  count ``T = #{j: 2^(y - m) == 1}`` (the entries amax splits its gradient over; >= 1).
  ``Z >= rho / l > 0`` since rho >= 1e-6. The values enter these sums shifted by per-pair offsets
  ``nu - mu_v[b,0]``, ``sigma - s_v[b,0]`` (and ``c``, ``a`` are shifted back): with large common
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
* row-owned (``_related_sampling_bwd_row_kernel``, one sweep over ``j``): ``g_x`` is linear in
  ``dot``, so ``sum_j g_x f = sum_j Pr gPr f - dot sum_j Pr f`` for ``f = 1/sigma^2`` and
  ``d / sigma^2`` (dot itself summed in the same sweep, hence consistent with the per-element
  ``gPr``: for D = 1 the softmax gradient is exactly 0 as in the reference):
  ``g_mu_i = -(1/tau) sum_j g_x d_ij / sigma_j^2``, ``g_s_i = -(1/tau) s_i sum_j g_x / sigma_j^2``
  (the ``-1/s_i`` term multiplies ``sum_j g_x = 0``). Writes dot and the per-row scalars.
* column-owned (``_related_sampling_bwd_col_kernel``, program = ``BLOCK_J`` columns, sweep over all
  rows ``i`` with tiles ``[columns, rows]``, flash-attention-backward style, deterministic, no
  atomics): ``g_nu_j = (1/(tau sigma_j^2)) sum_i g_x d_ij + sum_i W_ij gc_i``,
  ``g_sigma_j = -(1/(tau sigma_j)) sum_i g_x (1 - w_ij / sigma_j^2) + sum_i W_ij ga_i``; added into
  the buffer the row kernel of the other direction wrote (``mu_v, s_v`` get the row part of
  image->text plus the column part of text->image, and vice versa).

Saved for backward (``stats`` [17, 2, B, D] fp32, one tensor): mu, s (contiguous copies), colA,
colB, 1/sigma^2, m, 1/l, std, k, w1, Z, T, N+, Snu, Ssig, c - offset, a - offset; plus the two
alphas.
Backward scratch: 6 x [2, B, D] (gc/Z, ga/Z, u/Z, gamma, delta, dot).

Cost (fp32).  Bytes: O(B D) only: 4 B D in, 4 B D out, 17 x 2 B D saved; backward reads those and
g_c, g_a, writes 6 x 2 B D scratch and 6 B D grads: ~40 MB at B = 256, D = 512 (~10 us at 4 TB/s),
so the op is compute bound. Per element of the virtual [B, D, D] per direction: forward 3 sweeps,
2 exp2 (sweeps 1, 2), backward 2 sweeps (row, column), 2 exp2: 4 exp2 in all. The loop bodies
compiled for sm_90 (triton 3.8, default tiles 16 x 64 at 8 warps, D % 64 == 0; 94 / 117 / 91
registers, no spills) hold about 8 + 14 + 25 (forward sweeps), 29 (row) and 37.5 (column) PTX
instructions per element, ~114 in all (~98 with 8 elements per thread at 4 warps, at 147-201
registers). At B = 256, D = 512, both directions: 2 x 256 x 512^2 = 134 M elements -> 537 M exp2
(fwd 268 M, bwd 268 M) = 0.13 ms of MUFU at 16 ex2/clk/SM x 132 SMs x 1.98 GHz (4.2 T/s), and
~15 G instructions = 0.46 ms at 33.4 T lane-instructions/s (the FMA pipe, 67 TFLOP/s): the ALU
bound (fwd ~0.19 ms, bwd ~0.27 ms) dominates the MUFU one. Measured on an H200 (torch 2.11,
triton 3.6) with an earlier version of these kernels that reduced every sum across threads inside
the loops and computed log2 per tile (254 registers, spills): 1.84 ms forward, 2.02 ms backward
(the fp32 reference: 23 ms, 4.8 GiB). The present version has not been timed on a GPU yet (see
kernels/launch.pairwise_tiles for the tile choice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cdds_fast.kernels.launch import (
    block_for,
    device_supports_triton,
    num_warps_for,
    pairwise_tiles,
    scratch,
    scratch_like,
)
from cdds_fast.reference.validation import check_hyper, check_same_device, check_tensor

LOG2E = 1.4426950408889634

# Planes of the saved-statistics tensor ``stats`` [N_STATS, 2, B, D] (index 0 = image->text rows,
# i.e. image columns; 1 = text->image rows). MU/SD hold the (contiguous fp32) inputs themselves.
# Triton kernels may only read globals that are ``tl.constexpr`` objects (``.value`` in Python).
# Planes of the saved-statistics tensor ``stats`` [N_STATS, 2, B, D] (index 0 = image->text rows,
# i.e. image columns; 1 = text->image rows). MU/SD hold the (contiguous fp32) inputs themselves;
# COLA/COLB/RINV the per-column logit coefficients of that modality as a destination.
(MU, SD, COLA, COLB, RINV, ROW_MAX, INV_L, STD, THRESH, W1, Z, TIES, NPOS, SNU, SSIG, CSH,
 ASH) = map(tl.constexpr, range(17))
N_STATS = 17
# Planes of the backward scratch [N_SCRATCH, 2, B, D]: per-row scalars the column kernel needs.
GCZ, GAZ, UZ, GAMMA, DELTA, DOT = map(tl.constexpr, range(6))
N_SCRATCH = 6

# Tests and benchmarks only: (BLOCK_I, BLOCK_J, num_warps) for every kernel, or a dict
# {"fwd" | "row" | "col": (BLOCK_I, BLOCK_J, num_warps)}; None = launch.pairwise_tiles. The column
# kernel's tile is [BLOCK_J owned columns, BLOCK_I rows per step], rows along the fast axis.
_TILE_OVERRIDE: tuple[int, int, int] | dict | None = None


def _tiles(d: int, kernel: str) -> tuple[int, int, int]:
    o = _TILE_OVERRIDE
    if isinstance(o, dict):
        o = o.get(kernel)
    if o is not None:
        return o
    bi, bj, warps = pairwise_tiles(d)
    return (bj, bi, warps) if kernel == "col" else (bi, bj, warps)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _pair_block(ST, B, D, plane, n_blk):
    """Where a program of the three sweeping kernels works: grid axis 0 = pair ``b`` x block
    ``blk`` of ``n_blk``, axis 1 = direction ``dr``. Returns ``(dr, blk, src, dst, o_mu, o_sd)``:
    the row offsets of the source and destination modality's ``[D]`` vectors of pair ``b`` and
    the pair's value offsets ``mu_v[b, 0]``, ``s_v[b, 0]`` (see "sweep 2")."""
    pid = tl.program_id(0)
    dr = tl.program_id(1).to(tl.int64)
    b = (pid // n_blk).to(tl.int64)
    src = (dr * B + b) * D
    dst = ((1 - dr) * B + b) * D
    o_mu = tl.load(ST + MU * plane + b * D)
    o_sd = tl.load(ST + SD * plane + b * D)
    return dr, pid % n_blk, src, dst, o_mu, o_sd


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
def _dest_logits(ST, plane, dst, cols, cmask, mu_i, s2_i):
    """``_logits`` of a ``[rows, BLOCK_J]`` tile against the destination columns ``cols`` of the
    pair (padded columns load neutral values; mask ``y`` where it matters). Returns
    ``(nu, d, w, y)`` with ``nu`` the 1-D column means."""
    nu = tl.load(ST + MU * plane + dst + cols, mask=cmask, other=0.0)
    col_a = tl.load(ST + COLA * plane + dst + cols, mask=cmask, other=0.0)[None, :]
    col_b = tl.load(ST + COLB * plane + dst + cols, mask=cmask, other=0.0)[None, :]
    d, w, y = _logits(mu_i, s2_i, nu[None, :], col_a, col_b)
    return nu, d, w, y


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
def _related_sampling_coef_kernel(ST, n, D, plane, inv_tau, coef_b, BLOCK: tl.constexpr):
    """Per-column logit coefficients of every (modality, pair, column):
    ``colA = -log2(sigma / sigma_0) / tau`` (``sigma_0`` = the pair's first column: a per-pair
    constant that cancels in the softmax and keeps |colA| small), ``colB = -log2(e) / (2 tau
    sigma^2)``, ``rinv = 1 / sigma^2``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sig = tl.load(ST + SD * plane + offs, mask=mask, other=1.0)
    sig0 = tl.load(ST + SD * plane + (offs // D) * D, mask=mask, other=1.0)
    rinv = 1.0 / (sig * sig)
    tl.store(ST + COLA * plane + offs, -tl.log2(sig / sig0) * inv_tau, mask=mask)
    tl.store(ST + COLB * plane + offs, coef_b * rinv, mask=mask)
    tl.store(ST + RINV * plane + offs, rinv, mask=mask)


@triton.jit
def _related_sampling_fwd_kernel(
    ST, ALPHA, C, A, B, D, plane, n_blk, one_minus_rho,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, EVEN_J: tl.constexpr,
):
    dr, blk, src, dst, o_mu, o_sd = _pair_block(ST, B, D, plane, n_blk)
    rows = blk * BLOCK_I + tl.arange(0, BLOCK_I)
    rmask = rows < D
    mu_i = tl.load(ST + MU * plane + src + rows, mask=rmask, other=0.0)[:, None]
    s_i = tl.load(ST + SD * plane + src + rows, mask=rmask, other=1.0)
    alpha_i = tl.load(ALPHA + dr * D + rows, mask=rmask, other=0.0)
    s2_i = (s_i * s_i)[:, None]
    d_f = D * 1.0

    # sweep 0: row max of the logits (no exp); element-wise into a tile, one reduction at the end
    m_acc = tl.full([BLOCK_I, BLOCK_J], float("-inf"), tl.float32)
    for j0 in range(0, D, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        cmask = cols < D
        _, _, _, y = _dest_logits(ST, plane, dst, cols, cmask, mu_i, s2_i)
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
        _, _, _, y = _dest_logits(ST, plane, dst, cols, cmask, mu_i, s2_i)
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
    l = tl.sum(e_mean * n_slot[None, :], 1)
    spread = e_mean - (l / d_f)[:, None]
    m2 = tl.sum(e_m2 + spread * spread * n_slot[None, :], 1)

    inv_l = 1.0 / l
    var = m2 * inv_l * inv_l / d_f
    pos = var > 0.0
    std = tl.where(pos, tl.sqrt(tl.where(pos, var, 1.0)), 0.0)
    t1 = 1.0 / d_f + alpha_i * std
    t2 = one_minus_rho * inv_l
    k = tl.minimum(t1, t2)
    w1 = tl.where(t1 < t2, 1.0, tl.where(t1 == t2, 0.5, 0.0))

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
        cols = j0 + tl.arange(0, BLOCK_J)
        cmask = cols < D
        sig = tl.load(ST + SD * plane + dst + cols, mask=cmask, other=1.0)
        nu, d, w, y = _dest_logits(ST, plane, dst, cols, cmask, mu_i, s2_i)
        if EVEN_J:
            e = tl.exp2(y - m[:, None])
            pr = e * inv_l[:, None]
            above = pr > k[:, None]
        else:
            valid = cmask[None, :]
            e = tl.exp2(tl.where(valid, y, float("-inf")) - m[:, None])
            pr = e * inv_l[:, None]
            above = (pr > k[:, None]) & valid
        a_t = tl.where(above, pr - k[:, None], 0.0)
        pos_f = above.to(tl.float32)
        nu_sh = (nu - o_mu)[None, :]
        sig_sh = (sig - o_sd)[None, :]
        z_acc += a_t
        a_nu_acc += a_t * nu_sh
        a_sig_acc += a_t * sig_sh
        n_pos_acc += pos_f
        s_nu_acc += pos_f * nu_sh
        s_sig_acc += pos_f * sig_sh
        ties_acc += (e >= 1.0).to(tl.float32)  # masked entries have e == 0
    z = tl.sum(z_acc, 1)
    a_nu = tl.sum(a_nu_acc, 1)
    a_sig = tl.sum(a_sig_acc, 1)
    n_pos = tl.sum(n_pos_acc, 1)
    s_nu = tl.sum(s_nu_acc, 1)
    s_sig = tl.sum(s_sig_acc, 1)
    ties = tl.sum(ties_acc, 1)

    inv_z = 1.0 / z
    c_sh = a_nu * inv_z
    a_sh = a_sig * inv_z
    o = src + rows
    tl.store(C + o, c_sh + o_mu, mask=rmask)
    tl.store(A + o, a_sh + o_sd, mask=rmask)
    tl.store(ST + CSH * plane + o, c_sh, mask=rmask)
    tl.store(ST + ASH * plane + o, a_sh, mask=rmask)
    tl.store(ST + ROW_MAX * plane + o, m, mask=rmask)
    tl.store(ST + INV_L * plane + o, inv_l, mask=rmask)
    tl.store(ST + STD * plane + o, std, mask=rmask)
    tl.store(ST + THRESH * plane + o, k, mask=rmask)
    tl.store(ST + W1 * plane + o, w1, mask=rmask)
    tl.store(ST + Z * plane + o, z, mask=rmask)
    tl.store(ST + TIES * plane + o, ties, mask=rmask)
    tl.store(ST + NPOS * plane + o, n_pos, mask=rmask)
    tl.store(ST + SNU * plane + o, s_nu, mask=rmask)
    tl.store(ST + SSIG * plane + o, s_sig, mask=rmask)


@triton.jit
def _related_sampling_bwd_row_kernel(
    ST, ALPHA, GC, GA, SCR, GMU, GSD, GALPHA, B, D, plane, n_blk, inv_tau, one_minus_rho,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, EVEN_J: tl.constexpr,
):
    dr, blk, src, dst, o_mu, o_sd = _pair_block(ST, B, D, plane, n_blk)
    rows = blk * BLOCK_I + tl.arange(0, BLOCK_I)
    rmask = rows < D
    o = src + rows
    mu_i = tl.load(ST + MU * plane + o, mask=rmask, other=0.0)
    s_i = tl.load(ST + SD * plane + o, mask=rmask, other=1.0)
    alpha_i = tl.load(ALPHA + dr * D + rows, mask=rmask, other=0.0)
    m = tl.load(ST + ROW_MAX * plane + o, mask=rmask, other=float("inf"))
    inv_l = tl.load(ST + INV_L * plane + o, mask=rmask, other=0.0)
    std = tl.load(ST + STD * plane + o, mask=rmask, other=0.0)
    k = tl.load(ST + THRESH * plane + o, mask=rmask, other=1.0)
    w1 = tl.load(ST + W1 * plane + o, mask=rmask, other=0.0)
    z = tl.load(ST + Z * plane + o, mask=rmask, other=1.0)
    ties = tl.load(ST + TIES * plane + o, mask=rmask, other=1.0)
    n_pos = tl.load(ST + NPOS * plane + o, mask=rmask, other=0.0)
    s_nu = tl.load(ST + SNU * plane + o, mask=rmask, other=0.0)
    s_sig = tl.load(ST + SSIG * plane + o, mask=rmask, other=0.0)
    c_sh = tl.load(ST + CSH * plane + o, mask=rmask, other=0.0)
    a_sh = tl.load(ST + ASH * plane + o, mask=rmask, other=0.0)
    gc = tl.load(GC + o, mask=rmask, other=0.0)
    ga = tl.load(GA + o, mask=rmask, other=0.0)
    d_f = D * 1.0

    inv_z = 1.0 / z
    u = gc * c_sh + ga * a_sh  # = gc c + ga a, up to the offsets that cancel in gW - u
    h = (gc * s_nu + ga * s_sig - u * n_pos) * inv_z  # sum_{A>0} gA  (g_k = -h)
    g_t1 = -h * w1
    g_t2 = -h - g_t1
    pos = std > 0.0
    gamma = tl.where(pos, alpha_i * g_t1 / (d_f * tl.where(pos, std, 1.0)), 0.0)
    delta = one_minus_rho * g_t2 / ties
    gcz = gc * inv_z
    gaz = ga * inv_z
    uz = u * inv_z
    tl.store(GALPHA + o, std * g_t1, mask=rmask)
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
        cols = j0 + tl.arange(0, BLOCK_J)
        cmask = cols < D
        sig = tl.load(ST + SD * plane + dst + cols, mask=cmask, other=1.0)
        r = tl.load(ST + RINV * plane + dst + cols, mask=cmask, other=0.0)[None, :]
        nu, d, w, y = _dest_logits(ST, plane, dst, cols, cmask, mu_c, s2_c)
        valid = cmask[None, :]
        if EVEN_J:
            e = tl.exp2(y - m_c)
        else:
            e = tl.exp2(tl.where(valid, y, float("-inf")) - m_c)
        pr = e * inv_l_c
        g_pr, above = _grad_pr(pr, e, valid, (nu - o_mu)[None, :], (sig - o_sd)[None, :], k_c,
                               gcz_c, gaz_c, uz_c, gamma_c, delta_c)
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
    tl.store(GMU + o, -inv_tau * r_mu, mask=rmask)
    tl.store(GSD + o, -inv_tau * s_i * r_r, mask=rmask)


@triton.jit
def _related_sampling_bwd_col_kernel(
    ST, SCR, GMU, GSD, B, D, plane, n_blk, inv_tau,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, EVEN_I: tl.constexpr,
):
    # tile [BLOCK_J owned columns j, BLOCK_I rows i]: the eleven per-row vectors loaded at every
    # step lie along the fast axis (vector loads); the per-column ones are loaded once
    dr, blk, src, dst, o_mu, o_sd = _pair_block(ST, B, D, plane, n_blk)
    cols = blk * BLOCK_J + tl.arange(0, BLOCK_J)
    cmask = cols < D
    oc = dst + cols
    nu = tl.load(ST + MU * plane + oc, mask=cmask, other=0.0)
    sig = tl.load(ST + SD * plane + oc, mask=cmask, other=1.0)
    r = tl.load(ST + RINV * plane + oc, mask=cmask, other=0.0)
    nu_c = nu[:, None]
    col_a = tl.load(ST + COLA * plane + oc, mask=cmask, other=0.0)[:, None]
    col_b = tl.load(ST + COLB * plane + oc, mask=cmask, other=0.0)[:, None]
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
        mu_i = tl.load(ST + MU * plane + o, mask=rmask, other=0.0)
        s_i = tl.load(ST + SD * plane + o, mask=rmask, other=1.0)
        m = tl.load(ST + ROW_MAX * plane + o, mask=rmask, other=float("inf"))
        inv_l = tl.load(ST + INV_L * plane + o, mask=rmask, other=0.0)
        k = tl.load(ST + THRESH * plane + o, mask=rmask, other=1.0)[None, :]
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


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _forward(
    mu_v: Tensor, s_v: Tensor, mu_t: Tensor, s_t: Tensor, alpha_image: Tensor, alpha_text: Tensor,
    tau_kl: float, rho: float,
) -> tuple[Tensor, Tensor, Tensor]:
    bsz, d = mu_v.shape
    dev = mu_v.device
    stats = scratch((N_STATS, 2, bsz, d), torch.float32, dev)
    # the one copy: inputs (any strides / float dtype) -> contiguous fp32 planes of `stats`
    stats[MU.value, 0].copy_(mu_v)
    stats[MU.value, 1].copy_(mu_t)
    stats[SD.value, 0].copy_(s_v)
    stats[SD.value, 1].copy_(s_t)
    alpha = torch.stack([alpha_image.float(), alpha_text.float()]).contiguous()
    c = scratch((2, bsz, d), torch.float32, dev)
    a = scratch_like(c)
    plane = 2 * bsz * d
    block = block_for(plane, cap=1024)
    _related_sampling_coef_kernel[(triton.cdiv(plane, block),)](
        stats, plane, d, plane, 1.0 / tau_kl, -0.5 * LOG2E / tau_kl, BLOCK=block,
        num_warps=num_warps_for(block),
    )
    bi, bj, warps = _tiles(d, "fwd")
    n_blk = triton.cdiv(d, bi)
    _related_sampling_fwd_kernel[(bsz * n_blk, 2)](
        stats, alpha, c, a, bsz, d, plane, n_blk, 1.0 - rho,
        BLOCK_I=bi, BLOCK_J=bj, EVEN_J=d % bj == 0, num_warps=warps,
    )
    return c, a, stats


def _backward(
    g_c: Tensor, g_a: Tensor, alpha_image: Tensor, alpha_text: Tensor, stats: Tensor,
    tau_kl: float, rho: float,
) -> tuple[Tensor, Tensor, Tensor]:
    _, _, bsz, d = stats.shape
    dev = stats.device
    g_c = g_c.float().contiguous()
    g_a = g_a.float().contiguous()
    alpha = torch.stack([alpha_image.float(), alpha_text.float()]).contiguous()
    row_scratch = scratch((N_SCRATCH, 2, bsz, d), torch.float32, dev)
    g_mu = scratch((2, bsz, d), torch.float32, dev)
    g_sd = scratch_like(g_mu)
    g_alpha_rows = scratch_like(g_mu)
    plane = 2 * bsz * d
    bi, bj, warps = _tiles(d, "row")
    n_blk = triton.cdiv(d, bi)
    _related_sampling_bwd_row_kernel[(bsz * n_blk, 2)](
        stats, alpha, g_c, g_a, row_scratch, g_mu, g_sd, g_alpha_rows, bsz, d, plane, n_blk,
        1.0 / tau_kl, 1.0 - rho, BLOCK_I=bi, BLOCK_J=bj, EVEN_J=d % bj == 0, num_warps=warps,
    )
    bi, bj, warps = _tiles(d, "col")
    n_blk_c = triton.cdiv(d, bj)
    _related_sampling_bwd_col_kernel[(bsz * n_blk_c, 2)](
        stats, row_scratch, g_mu, g_sd, bsz, d, plane, n_blk_c, 1.0 / tau_kl,
        BLOCK_I=bi, BLOCK_J=bj, EVEN_I=d % bi == 0, num_warps=warps,
    )
    return g_mu, g_sd, g_alpha_rows.sum(1)


# --------------------------------------------------------------------------------------------
# torch.library ops (so that torch.compile'd callers treat the kernels as opaque) + autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("cdds_fast::related_sampling", mutates_args=())
def _related_sampling_op(
    mu_v: Tensor, s_v: Tensor, mu_t: Tensor, s_t: Tensor, alpha_image: Tensor,
    alpha_text: Tensor, tau_kl: float, rho: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``c [2, B, D]``, ``a [2, B, D]`` (index 0 = image->text) and ``stats``."""
    return _forward(mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, tau_kl, rho)


@_related_sampling_op.register_fake
def _(mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, tau_kl, rho):
    bsz, d = mu_v.shape
    c = mu_v.new_empty((2, bsz, d), dtype=torch.float32)
    return c, torch.empty_like(c), mu_v.new_empty((N_STATS, 2, bsz, d), dtype=torch.float32)


@torch.library.custom_op("cdds_fast::related_sampling_backward", mutates_args=())
def _related_sampling_backward_op(
    g_c: Tensor, g_a: Tensor, alpha_image: Tensor, alpha_text: Tensor, stats: Tensor,
    tau_kl: float, rho: float,
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
        g_mu[0].to(dt_mu_v), g_sd[0].to(dt_s_v), g_mu[1].to(dt_mu_t), g_sd[1].to(dt_s_t),
        g_alpha[0].to(alpha_image.dtype), g_alpha[1].to(alpha_text.dtype), None, None,
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
    for name, v in (("tau_kl", tau_kl), ("rho", rho)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    check_hyper(tau_kl=tau_kl, rho=rho)
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
    """Sampling coefficients of both directions from column statistics (spec sections 4-5).

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


__all__ = ["related_sampling"]
