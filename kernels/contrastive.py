r"""Fused symmetric InfoNCE (open_clip ``ClipLoss`` math) in O(B) memory: Triton kernels.

What is computed
================
Rows ``X [M, D]``, columns ``Y [N, D]``, scale ``s`` (CLIP's *exponentiated* ``logit_scale``),
logits ``S = s X Y^T`` (never materialised), label of row ``i`` is column ``i + o``.

* **symmetric** (``M == N``, ``o == 0``; single process or ``local_loss=False``)::

      L = ( CE(S, arange) + CE(S^T, arange) ) / 2
        = 1/(2M) * sum_i [ (lse_r[i] - S_ii) + (lse_c[i] - S_ii) ]

  with ``lse_r[i] = logsumexp_j S_ij`` and ``lse_c[j] = logsumexp_i S_ij``.
* **rectangular** (one direction of ``local_loss=True``: local rows against all gathered
  columns, ``o = B * rank``)::

      L = CE(S, arange(M) + o) = 1/M * sum_i (lse_r[i] - S_{i, i+o})

Forward: one pass, row and column statistics from the same tile
-----------------------------------------------------------------
The grid is ``(G, C)``: ``G`` *row groups* x ``C`` *column splits*. Program ``(g, c)`` walks the
row blocks ``g, g+G, g+2G, ...`` and, for each, the column blocks of split ``c``. Per tile
``R = X_blk Y_blk^T`` (``tl.dot``, fp32 accumulation, K-loop over ``D``) it

* updates the online row log-sum-exp (running max ``m_i`` and sum ``l_i``; registers),
* reduces the tile over its rows to a column partial (max, sum of exp) and merges it into
  ``COL_MAX/COL_SUM[g, cols]`` (only program ``(g, c)`` touches that slice, so no atomics),
* picks the label logit ``S_{i,i+o}`` out of the tile (the same fp32 value the LSE saw, so
  ``B = 1`` gives exactly 0).

Partials are combined by ``_info_nce_finalize_kernel`` (a max and a rescaled sum over ``C`` for
rows, ``G`` for columns; it also writes the backward's statistics and per-program loss sums, so
the whole epilogue is one launch plus a sum). Extra memory: ``2*C*M + 2*G*N + M`` fp32 with
``G <= #SMs`` and ``C`` at most a handful, i.e. **O(B)**; no ``[B, B]`` tensor exists at any
point. Statistics are kept in base 2 (``t = R * s * log2(e)``, ``exp2``/``log2``) and converted
back with ``ln 2`` at the end.
Max and sum are kept apart (never ``max + log2(sum)`` in one fp32 number): the loss of row ``i``
is ``(max_i - t_{i,label}) + log2(sum_i)``, whose first term is exact (both are the same tile
values) and 0 when the label wins, so a near-zero loss at ``s = 100`` is not swamped by the
rounding of a ~144-sized LSE (the same care ``log_softmax`` takes). The backward likewise uses
``exp2(t - max) * (1 / sum)``.

Backward: recompute tiles
-------------------------
With ``P^r_ij = exp(S_ij - lse_r[i])`` (row softmax) and ``P^c_ij = exp(S_ij - lse_c[j])``
(column softmax), differentiate ``L`` w.r.t. the logits:

* symmetric: ``dL/dS_ij = (P^r_ij + P^c_ij - 2 [j == i]) / (2M)``
  (``d lse_r[i] / d S_ij = P^r_ij``, ``d lse_c[j] / d S_ij = P^c_ij``, and ``S_ii`` appears twice
  with weight ``-1/(2M)``);
* rectangular: ``dL/dS_ij = (P^r_ij - [j == i + o]) / M``.

Call this ``G``. Since ``S_ij = s <x_i, y_j>``, with upstream gradient ``g``::

      dL/dx_i = g * s * sum_j G_ij y_j            (dX = g s G Y)
      dL/dy_j = g * s * sum_i G_ij x_i            (dY = g s G^T X)
      dL/ds   = g * sum_ij G_ij <x_i, y_j>        (R_ij = <x_i, y_j>, the unscaled tile)

One kernel computes ``dX`` for a row block by sweeping all column tiles (recompute ``R``, form
``G``, accumulate ``G @ Y_blk`` in fp32). ``dY`` is the *same kernel on the transposed problem*:
``G^T`` of the symmetric loss is the symmetric ``G`` of ``(Y, X)`` with the row/column
statistics swapped; ``G^T`` of the rectangular loss is ``P^c - [i == j - o]`` of ``(Y, X)``
with the column statistics := the row statistics of ``S``. ``dL/ds`` is reduced in the first
call only. Row blocks may be split over ``C`` column ranges to fill the GPU at small ``B`` (fp32
partial ``dX``, summed afterwards), and ``D`` over output chunks when ``D`` is large (each chunk
recomputes ``R``).

Chunked forward (optional, ``FORWARD_METHOD = "chunked"``)
----------------------------------------------------------
The same forward kernel with ``LOGITS_GIVEN``: a cuBLAS GEMM writes ``R_c = X_c Y^T`` (fp32) for
``c`` rows at a time and the kernel reads its tiles instead of forming them with ``tl.dot``; row
statistics land at the chunk's offset, the column partials of each row group are merged in place
by every chunk's launch (launches run in stream order). Two launches per chunk; extra memory one
``[c, N]`` fp32 buffer; extra HBM traffic ``8 * M * N`` bytes (write + read ``R``). It exists for
IEEE fp32, where cuBLAS's SGEMM outruns Triton's FMA ``tl.dot`` (the fused fp32 forward measured
18 TFLOP/s at B = 16384), and is off by default until a GPU run compares the two.

Chunked backward (the default, ``BACKWARD_METHOD = "chunked"``)
--------------------------------------------------------------
The same two calls, each over ``c`` rows of ``X`` at a time: ``R_c = X_c Y^T`` by a cuBLAS GEMM
with an fp32 result, ``G_c`` from ``R_c`` and the saved statistics by
``_info_nce_grad_logits_kernel`` (one read of ``R_c``, one write of ``G_c`` in the GEMM operand
dtype, the ``dL/ds`` partial on the way), then ``dX_c = G_c Y`` by a second GEMM. FLOPs are those
of the fused backward (``8*M*N*D`` for the symmetric loss), all on cuBLAS; the price is HBM
traffic of ``(4 + 4 + 2e) * M * N`` bytes per call (write and read ``R_c``, write ``G_c`` and
read it in the GEMM): 2 x 52 GB at ``B = 65536`` bf16, i.e. ~21 ms at ~4.8 TB/s next to ~25 ms
of GEMMs at ~700 TFLOP/s (arithmetic, not a measurement). Extra memory is one
chunk, :data:`CHUNK_BYTES` (at least :data:`MIN_CHUNK_ROWS` rows): O(B), no ``[B, B]`` tensor.
cuBLAS sums in another order than the forward's tiles, so a recomputed logit can differ from the
one the statistics saw by an ulp; label entries therefore use the forward's own label logit
(saved as ``stats_r[2]``), which keeps ``P_ii - 1`` consistent with the statistics (exactly 0 at
``B = 1``, and no cancellation error when the label's probability is ~1).
Why: the fused backward holds a ``[BLOCK_M, D]`` fp32 accumulator next to its logit tiles, and
for ``D = 512`` ptxas gives every tensor-core config 255 registers with spills
(``benchmarks/kernel_resources.py``); it measured 142 TFLOP/s (18% of the bf16 roofline) on an
H200. The chunked path has **not been timed yet** (no device since it was written);
``benchmarks/bench_contrastive.py`` times both.

Precision
---------
fp32 inputs: ``tl.dot(..., input_precision="ieee")`` (true fp32 FMA products, ~1e-6 relative
vs float64) unless ``allow_tf32=True`` is asked for. bf16/fp16 inputs: tensor-core products
with fp32 accumulation; ``G`` is rounded to the input dtype for the ``G @ Y`` product (like
FlashAttention's ``P``), pre-multiplied by ``2**14`` for fp16 so small probabilities stay
normal numbers. Everything else (statistics, ``exp2``, sums) is fp32.

Cost per call (``M x N`` logits, ``D`` features, ``e`` bytes per element)
-------------------------------------------------------------------------
FLOPs, counting a multiply-add as 2:

* forward: ``2*M*N*D`` for the logits (+ ~``12*M*N`` elementwise: 2 ``exp2`` per logit in the
  symmetric case, 1 in the rectangular one);
* backward, per call: ``2*M*N*D`` recompute + ``2*M*N*D`` for ``G @ Y`` (+ ~``10*M*N``
  elementwise); the symmetric loss needs 2 calls (``dX`` and ``dY``): ``8*M*N*D``.
* symmetric forward + backward: **10*B^2*D** (vs 6*B^2*D for eager ``ClipLoss``, which instead
  streams several ``[B, B]`` fp32 tensors through HBM). At ``B = 65536, D = 512``: 2.2e13 FLOP,
  i.e. a floor of ~28 ms on an H200 at ~790 TFLOP/s dense bf16 (fp32 "ieee" has no tensor cores:
  ~67 TFLOP/s, ~330 ms). The ``exp2`` work (6 per logit over fwd + bwd, 2.6e10 at ``B = 65536``)
  runs on the special-function units and mostly overlaps the matrix products.

Bytes (HBM, compulsory): forward reads ``X`` and ``Y`` once (``(M+N)*D*e``) and writes
``O((C+G)*B)`` fp32 statistics; each row block re-reads ``Y`` (``N*D*e`` per row block,
served mostly from L2); backward reads ``X``, ``Y`` and the statistics and writes ``dX``, ``dY``
(``2*(M+N)*D*e`` + O(B)). At ``B = 65536, D = 512``, bf16: ~0.27 GB compulsory, far below
the ~4.3 TB/s floor (~0.06 ms), so the op is compute-bound: arithmetic intensity of a tile is
``BLOCK_M*BLOCK_N*2D / ((BLOCK_M+BLOCK_N)*D*e)`` = 64 FLOP/B for 128x128 bf16 tiles from L2.

Measured (H200, triton 3.6, torch 2.11, D = 512, first tile choice; see kernels/launch.py for the
tuned one): bf16 forward + backward 1.3 / 13.8 / 257 ms at B = 4096 / 16384 / 65536 with
40 / 32 / 129 MiB of peak extra memory, against open_clip ``ClipLoss`` 1.3 / 4.3 / 71 ms with
168 / 2080 / 32897 MiB. Tuned tiles measured at B = 16384: forward 1.32 ms (208 TFLOP/s) +
backward 7.7 ms (142 TFLOP/s), i.e. ~25% / ~18% of the bf16 roofline: the kernels trade time for
memory where ``ClipLoss`` fits, and run where it does not. fp32 "ieee" is CUDA-core bound
(6.6 TFLOP/s end to end, the backward being the slow part); ``allow_tf32=True`` runs at
``ClipLoss``'s fp32 speed (37 ms vs 36 ms at B = 16384).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from cdds_fast.kernels.launch import (
    block_for,
    info_nce_tiles,
    interpreter_active,
    logit_tiles,
    num_sms,
    num_warps_for,
    scratch,
    sized_for_gpu,
    split_count,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_FP16_G_SCALE = 16384.0  # 2**14: |G| <= 2, so |G * 2**14| <= 32768 < 65504 (fp16 max)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. ``UPCAST`` (CPU interpreter only): the interpreter
    multiplies bfloat16 blocks as raw integer bits (triton 3.8) and float16 blocks with numpy's
    slow non-BLAS fp16 matmul, so there 16-bit operands are widened to fp32 first; products of
    16-bit values are exact in fp32, so the result matches the GPU's fp32-accumulated dot."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _tile_logits(
    X, Y, x_single, rows64, cols64, row_ok, col_ok, offs_k, D, stride_x, stride_y,
    SINGLE_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``R = X[rows] @ Y[cols]^T`` in fp32; padded rows/columns/features load as 0.

    ``Y`` is loaded directly as a ``[BLOCK_K, BLOCK_N]`` (transposed) block, as in Triton's
    matmul tutorial for a column-major right operand; this also keeps the interpreter's numpy
    matmul on contiguous operands (a transposed view makes it ~100x slower)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SINGLE_K:
        # the whole feature dimension fits one block: X's block was loaded once by the caller
        y_t = tl.load(
            Y + cols64[None, :] * stride_y + offs_k[:, None],
            mask=col_ok[None, :] & (offs_k[:, None] < D), other=0.0,
        )
        acc = _mm(x_single, y_t, acc, PRECISION, UPCAST)
    else:
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < D
            x = tl.load(
                X + rows64[:, None] * stride_x + kk[None, :],
                mask=row_ok[:, None] & k_ok[None, :], other=0.0,
            )
            y_t = tl.load(
                Y + cols64[None, :] * stride_y + kk[:, None],
                mask=col_ok[None, :] & k_ok[:, None], other=0.0,
            )
            acc = _mm(x, y_t, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _info_nce_fwd_kernel(
    X, Y, SCALE,                 # X [M, D], Y [N, D] (same dtype), SCALE 0-d (exponentiated)
    ROW_MAX, ROW_SUM,            # [C, M] fp32: base-2 row max / sum of exp2(t - max), per split
    COL_MAX, COL_SUM,            # [G, N] fp32: the same per row group for columns (-inf / 0 init)
    DIAG,                        # [M] fp32: base-2 label logit t[i, i + label_offset]
    R,                           # LOGITS_GIVEN: [M, N] fp32 logits <x_i, y_j> of these rows
    M, N, D, stride_x, stride_y, stride_r, label_offset,
    row0, stat_stride,           # row statistics are written at row0 + row, split stride
    col_init,                    # 1: COL_MAX/COL_SUM hold garbage; a group's first row block
                                 # writes its column partials instead of merging into them
                                 # (the launcher gives every group a row block)
    COMPUTE_COL: tl.constexpr,   # symmetric loss: also column statistics
    SINGLE_K: tl.constexpr,      # BLOCK_K >= D: load the X block once per row block
    LOGITS_GIVEN: tl.constexpr,  # chunked forward: read the tile from R instead of tl.dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_groups = tl.num_programs(0)
    n_splits = tl.num_programs(1)

    # base-2 logits: t = R * s * log2(e), so exp(S) = exp2(t)
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634

    n_row_blocks = tl.cdiv(M, BLOCK_M)
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_col_blocks, n_splits)
    cb_lo = pid_c * per_split
    cb_hi = tl.minimum(cb_lo + per_split, n_col_blocks)
    col_lo = cb_lo * BLOCK_N
    col_hi = tl.minimum(cb_hi * BLOCK_N, N)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    col_max_row = COL_MAX + pid_g.to(tl.int64) * N
    col_sum_row = COL_SUM + pid_g.to(tl.int64) * N
    row_max_row = ROW_MAX + pid_c.to(tl.int64) * stat_stride + row0
    row_sum_row = ROW_SUM + pid_c.to(tl.int64) * stat_stride + row0

    for rb in range(pid_g, n_row_blocks, n_groups):
        rows = rb * BLOCK_M + offs_m
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        x_single = tl.zeros((BLOCK_M, BLOCK_K), dtype=X.dtype.element_ty)
        if SINGLE_K:
            x_single = tl.load(
                X + rows64[:, None] * stride_x + offs_k[None, :],
                mask=row_ok[:, None] & (offs_k[None, :] < D), other=0.0,
            )
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        d_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        labels = rows + label_offset
        for cb in range(cb_lo, cb_hi):
            cols = cb * BLOCK_N + offs_n
            col_ok = cols < N
            cols64 = cols.to(tl.int64)
            if LOGITS_GIVEN:
                r = tl.load(R + rows64[:, None] * stride_r + cols64[None, :],
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            else:
                r = _tile_logits(X, Y, x_single, rows64, cols64, row_ok, col_ok, offs_k, D,
                                 stride_x, stride_y, SINGLE_K, BLOCK_M, BLOCK_N, BLOCK_K,
                                 PRECISION, UPCAST)
            t = r * scale2
            # -- row statistics (online LSE); padded columns are -inf, padded rows stay finite
            t_r = tl.where(col_ok[None, :], t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t_r, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t_r - m_new[:, None]), axis=1)
            m_i = m_new
            # -- label logit, taken from the very tile the LSE saw; only tiles that hold labels
            #    (rows r -> column r + offset) pay for the select and the row sum
            lab_lo = rb * BLOCK_M + label_offset
            if (cb * BLOCK_N < lab_lo + BLOCK_M) & (cb * BLOCK_N + BLOCK_N > lab_lo):
                d_i += tl.sum(tl.where(cols[None, :] == labels[:, None], t, 0.0), axis=1)
            # -- column statistics of this tile, merged into this row group's partial
            if COMPUTE_COL:
                t_c = tl.where(row_ok[:, None], t, float("-inf"))
                c_max = tl.max(t_c, axis=0)
                c_sum = tl.sum(tl.exp2(t_c - c_max[None, :]), axis=0)
                fresh = (rb == pid_g) & (col_init != 0)  # nothing merged here yet
                old_max = tl.load(col_max_row + cols64, mask=col_ok & ~fresh,
                                  other=float("-inf"))
                old_sum = tl.load(col_sum_row + cols64, mask=col_ok & ~fresh, other=0.0)
                new_max = tl.maximum(old_max, c_max)
                new_sum = old_sum * tl.exp2(old_max - new_max) + c_sum * tl.exp2(c_max - new_max)
                tl.store(col_max_row + cols64, new_max, mask=col_ok)
                tl.store(col_sum_row + cols64, new_sum, mask=col_ok)
        # an empty split stores max = -inf, sum = 0: neutral when the partials are combined
        tl.store(row_max_row + rows64, m_i, mask=row_ok)
        tl.store(row_sum_row + rows64, l_i, mask=row_ok)
        tl.store(DIAG + row0 + rows64, d_i,
                 mask=row_ok & (labels >= col_lo) & (labels < col_hi))


@triton.jit
def _logit_grad(t, is_label, max_r, inv_r, max_c, inv_c, diag_coef,
                HAS_R: tl.constexpr, HAS_C: tl.constexpr):
    """``G`` on a tile (without the ``1/(2M)`` or ``1/M`` factor; see "Backward"): the row and
    column softmax terms of the base-2 logits ``t`` minus ``diag_coef`` at the labels. Padded
    entries must have ``t = -inf`` (their softmax terms are then exactly 0); ``max_r, inv_r`` are
    per row, ``max_c, inv_c`` per column (ignored without ``HAS_R`` / ``HAS_C``)."""
    g = tl.where(is_label, -diag_coef, 0.0)
    if HAS_R:
        g += tl.exp2(t - max_r[:, None]) * inv_r[:, None]
    if HAS_C:
        g += tl.exp2(t - max_c[None, :]) * inv_c[None, :]
    return g


@triton.jit
def _info_nce_bwd_kernel(
    X, Y, SCALE, GRAD,           # GRAD: upstream gradient of the loss, 0-d fp32
    MAX_R, INV_R,                # per row of X [M]: base-2 max of t, 1 / sum exp2(t - max)
    MAX_C, INV_C,                # per row of Y [N]: the same for the columns
    DX,                          # [M, D] (input dtype) if one split, else [C, M, D] fp32
    DSCALE_PART,                 # [C, n_row_blocks] fp32
    M, N, D, stride_x, stride_y, stride_dx_split, label_offset,
    diag_coef,                   # weight of the label indicator in G (2 symmetric, 1 otherwise)
    norm,                        # 1/(2M) symmetric, 1/M rectangular (per loss term)
    HAS_R: tl.constexpr, HAS_C: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DSCALE: tl.constexpr,
    SINGLE_K: tl.constexpr,      # BLOCK_K == BLOCK_DO >= D: one Y tile serves both products
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,      # output feature chunk (grid axis 1)
    G_SCALE: tl.constexpr,       # 2**14 for fp16 (keeps G normal), 1 otherwise
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    n_splits = tl.num_programs(2)

    scale = tl.load(SCALE).to(tl.float32)
    scale2 = scale * 1.4426950408889634
    g_up = tl.load(GRAD).to(tl.float32)

    n_col_blocks = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_col_blocks, n_splits)
    cb_lo = pid_c * per_split
    cb_hi = tl.minimum(cb_lo + per_split, n_col_blocks)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = pid_m * BLOCK_M + offs_m
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    labels = rows + label_offset
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D

    max_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    inv_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_R:
        max_r = tl.load(MAX_R + rows64, mask=row_ok, other=0.0)
        inv_r = tl.load(INV_R + rows64, mask=row_ok, other=0.0)
    x_single = tl.zeros((BLOCK_M, BLOCK_K), dtype=X.dtype.element_ty)
    if SINGLE_K:
        x_single = tl.load(
            X + rows64[:, None] * stride_x + offs_k[None, :],
            mask=row_ok[:, None] & (offs_k[None, :] < D), other=0.0,
        )

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for cb in range(cb_lo, cb_hi):
        cols = cb * BLOCK_N + offs_n
        col_ok = cols < N
        cols64 = cols.to(tl.int64)
        y_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=Y.dtype.element_ty)
        if SINGLE_K:
            y_tile = tl.load(
                Y + cols64[:, None] * stride_y + offs_k[None, :],
                mask=col_ok[:, None] & (offs_k[None, :] < D), other=0.0,
            )
            r = _mm(x_single, tl.trans(y_tile), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                    PRECISION, UPCAST)
        else:
            r = _tile_logits(X, Y, x_single, rows64, cols64, row_ok, col_ok, offs_k, D,
                             stride_x, stride_y, False, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
                             UPCAST)
        # G (without the 1/(2M) or 1/M factor): softmax terms minus the label indicator.
        # Padded rows/columns get t = -inf, so their softmax terms are exactly 0 (no overflow);
        # exp2(t - max) <= 1 elsewhere.
        t = tl.where(row_ok[:, None] & col_ok[None, :], r * scale2, float("-inf"))
        max_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
        inv_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_C:
            max_c = tl.load(MAX_C + cols64, mask=col_ok, other=0.0)
            inv_c = tl.load(INV_C + cols64, mask=col_ok, other=0.0)
        g = _logit_grad(t, (cols[None, :] == labels[:, None]) & row_ok[:, None], max_r, inv_r,
                        max_c, inv_c, diag_coef, HAS_R, HAS_C)
        if COMPUTE_DSCALE:
            ds += tl.sum(g * r, axis=1)
        if COMPUTE_DX:
            if SINGLE_K:
                y_do = y_tile
            else:
                y_do = tl.load(
                    Y + cols64[:, None] * stride_y + offs_do[None, :],
                    mask=col_ok[:, None] & do_ok[None, :], other=0.0,
                )
            if Y.dtype.element_ty == tl.float32:
                acc = _mm(g, y_do, acc, PRECISION, UPCAST)
            else:
                acc = _mm((g * G_SCALE).to(Y.dtype.element_ty), y_do, acc, PRECISION, UPCAST)

    if COMPUTE_DX:
        dx = acc * (g_up * scale * (norm / G_SCALE))
        dx_ptrs = DX + pid_c.to(tl.int64) * stride_dx_split + rows64[:, None] * D + offs_do[None, :]
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=row_ok[:, None] & do_ok[None, :])
    if COMPUTE_DSCALE:
        if pid_d == 0:
            n_row_blocks = tl.num_programs(0)
            tl.store(DSCALE_PART + pid_c * n_row_blocks + pid_m, tl.sum(ds, axis=0) * norm * g_up)


@triton.jit
def _info_nce_grad_logits_kernel(
    R,                           # [C, N] fp32: unscaled logits <x_i, y_j> of rows row0 .. row0+C
    G,                           # [C, N] out: G * G_SCALE in G's dtype (the GEMM operand dtype)
    SCALE,
    MAX_R, INV_R,                # per row of the full X [M] (read at row0 + local row)
    MAX_C, INV_C,                # per column [N]
    LABEL_T,                     # the forward's base-2 label logits, per row of the original X
    DSCALE_PART,                 # [n_programs] fp32: sum_ij G_ij R_ij of this tile
    C, N, row0, label_offset,
    diag_coef,
    HAS_R: tl.constexpr, HAS_C: tl.constexpr, COMPUTE_DSCALE: tl.constexpr,
    LABEL_BY_COL: tl.constexpr,  # the transposed call (dY): the original row is the column
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G_SCALE: tl.constexpr,
):
    """One tile of ``G`` (``_logit_grad``, as ``_info_nce_bwd_kernel``) from a chunk of logits
    computed by a GEMM: the chunked backward's only Triton work. Label entries take the forward's
    own logit value (see "Chunked backward")."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < C
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    offs = rows64[:, None] * N + cols64[None, :]
    r = tl.load(R + offs, mask=ok, other=0.0)
    # padded entries: t = -inf, so their softmax terms are exactly 0
    t = tl.where(ok, r * scale2, float("-inf"))
    g_rows = row0 + rows
    is_label = (cols[None, :] == (g_rows + label_offset)[:, None]) & ok
    if LABEL_BY_COL:
        label_t = tl.load(LABEL_T + cols64, mask=col_ok, other=0.0)[None, :]
    else:
        label_t = tl.load(LABEL_T + row0 + rows64, mask=row_ok, other=0.0)[:, None]
    t = tl.where(is_label, label_t, t)
    max_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    inv_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_R:
        max_r = tl.load(MAX_R + row0 + rows64, mask=row_ok, other=0.0)
        inv_r = tl.load(INV_R + row0 + rows64, mask=row_ok, other=0.0)
    max_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    inv_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_C:
        max_c = tl.load(MAX_C + cols64, mask=col_ok, other=0.0)
        inv_c = tl.load(INV_C + cols64, mask=col_ok, other=0.0)
    g = _logit_grad(t, is_label, max_r, inv_r, max_c, inv_c, diag_coef, HAS_R, HAS_C)
    if COMPUTE_DSCALE:
        part = tl.sum(tl.sum(g * r, axis=1), axis=0)
        tl.store(DSCALE_PART + pid_m * tl.num_programs(1) + pid_n, part)
    tl.store(G + offs, (g * G_SCALE).to(G.dtype.element_ty), mask=ok)


@triton.jit
def _merge_partials(MAX, SUM, offs, ok, n_parts, stride):
    """Merge base-2 (max, sum) partials ``[n_parts, stride]`` at ``offs`` (empty partials are
    (-inf, 0)); one partial is returned exactly as stored."""
    hi = tl.load(MAX + offs, mask=ok, other=0.0)
    for p in range(1, n_parts):
        hi = tl.maximum(hi, tl.load(MAX + p * stride + offs, mask=ok, other=0.0))
    total = tl.zeros_like(hi)
    for p in range(0, n_parts):
        part_max = tl.load(MAX + p * stride + offs, mask=ok, other=0.0)
        part_sum = tl.load(SUM + p * stride + offs, mask=ok, other=0.0)
        total += part_sum * tl.exp2(part_max - hi)
    return hi, total


@triton.jit
def _info_nce_finalize_kernel(
    ROW_MAX, ROW_SUM,            # [C, M] row partials
    COL_MAX, COL_SUM,            # [G, N] column partials (COMPUTE_COL)
    DIAG,                        # [M] base-2 label logits
    STATS_R, STATS_C,            # out: [3, M] (max, 1/sum, label logit), [2, N] (max, 1/sum)
    LOSS_PART,                   # out: [n_programs] sum of the base-2 per-row (and column) losses
    M, n_row_parts, n_col_parts,
    COMPUTE_COL: tl.constexpr, BLOCK: tl.constexpr,
):
    """The forward's epilogue in one launch: merge the partials, write the statistics the backward
    reads, and the per-row loss ``(max - label logit) + log2(sum)`` (see "Max and sum are kept
    apart"), summed per program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    diag = tl.load(DIAG + offs, mask=ok, other=0.0)
    r_max, r_sum = _merge_partials(ROW_MAX, ROW_SUM, offs, ok, n_row_parts, M)
    r_sum = tl.where(ok, r_sum, 1.0)
    tl.store(STATS_R + offs, r_max, mask=ok)
    tl.store(STATS_R + M + offs, 1.0 / r_sum, mask=ok)
    tl.store(STATS_R + 2 * M + offs, diag, mask=ok)
    loss = tl.where(ok, (r_max - diag) + tl.log2(r_sum), 0.0)
    if COMPUTE_COL:  # symmetric: N == M, column j's label logit is DIAG[j]
        c_max, c_sum = _merge_partials(COL_MAX, COL_SUM, offs, ok, n_col_parts, M)
        c_sum = tl.where(ok, c_sum, 1.0)
        tl.store(STATS_C + offs, c_max, mask=ok)
        tl.store(STATS_C + M + offs, 1.0 / c_sum, mask=ok)
        loss += tl.where(ok, (c_max - diag) + tl.log2(c_sum), 0.0)
    tl.store(LOSS_PART + tl.program_id(0), tl.sum(loss, axis=0))


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """Widen 16-bit ``tl.dot`` operands under the interpreter (see ``_mm``)."""
    return interpreter_active() and dtype in (torch.bfloat16, torch.float16)


def check_inputs(x: object, y: object, logit_scale: object, *, names=("x", "y"),
                 same_rows: bool = True) -> None:
    """Validate before any launch (spec section 9). Raises TypeError / ValueError naming the
    argument with the expected and received value."""
    nx, ny = names
    for name, t in ((nx, x), (ny, y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected 2 dimensions [B, D], got shape {list(t.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"{ny}: expected dtype {x.dtype} (the dtype of {nx}), got {y.dtype}")
    if y.shape[1] != x.shape[1]:
        raise ValueError(
            f"{ny}: expected feature dimension D = {x.shape[1]} (from {nx}), got shape "
            f"{list(y.shape)}"
        )
    if same_rows and y.shape[0] != x.shape[0]:
        raise ValueError(f"{ny}: expected shape {list(x.shape)} (the shape of {nx}), got "
                         f"{list(y.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1 or y.shape[0] < 1:
        raise ValueError(f"{nx}: expected at least one row and one feature, got shape "
                         f"{list(x.shape)}")
    if y.device != x.device:
        raise ValueError(f"{ny}: expected device {x.device} (the device of {nx}), got {y.device}")
    if isinstance(logit_scale, Tensor):
        if logit_scale.dim() != 0:
            raise ValueError(
                f"logit_scale: expected a 0-d tensor (the exponentiated scale), got shape "
                f"{list(logit_scale.shape)}"
            )
        if not logit_scale.is_floating_point():
            raise TypeError(f"logit_scale: expected a floating dtype, got {logit_scale.dtype}")
        if logit_scale.device != x.device and logit_scale.device.type != "cpu":
            raise ValueError(
                f"logit_scale: expected device {x.device} (the device of {nx}) or a CPU scalar, "
                f"got {logit_scale.device}"
            )
    elif isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise TypeError(
            f"logit_scale: expected a 0-d tensor or a number, got {type(logit_scale).__name__}"
        )


def _fwd_grid(m: int, n: int, bm: int, bn: int, device: torch.device, symmetric: bool):
    """(G row groups, C column splits). G <= #SMs keeps the column partials at O(#SMs * N)."""
    if not sized_for_gpu(device):
        return (1, 1)
    n_row_blocks = triton.cdiv(m, bm)
    n_col_blocks = triton.cdiv(n, bn)
    sms = num_sms(device)
    groups = min(n_row_blocks, sms) if symmetric else n_row_blocks
    return (groups, split_count(groups, n_col_blocks, 2 * sms))


def info_nce_forward(
    x: Tensor, y: Tensor, scale: Tensor, label_offset: int, symmetric: bool,
    allow_tf32: bool = False, *, _config: dict | None = None, _grid: tuple | None = None,
    _method: str | None = None, _rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel on contiguous, validated inputs.

    Args:
        x: ``[M, D]`` rows; y: ``[N, D]`` columns (same dtype/device); scale: 0-d tensor on the
        device (any float dtype). ``symmetric`` needs ``M == N`` and ``label_offset == 0``.
        ``_config`` / ``_grid`` override the tiles / the ``(G, C)`` grid, ``_method``
        :data:`FORWARD_METHOD` and ``_rows`` the chunked forward's rows per chunk (tests, tuning).
    Returns:
        ``(loss, stats_r, stats_c)``: the 0-d fp32 loss; ``stats_r [3, M]`` fp32 with row 0 the
        base-2 row max of ``t = s*log2(e)*R``, row 1 the reciprocal of
        ``sum_j exp2(t_ij - max_i)`` (so ``lse_i = ln2 * (max_i - log2(stats_r[1, i]))``) and
        row 2 the label logit ``t_{i, i + label_offset}``; ``stats_c [2, N]`` max and reciprocal
        sum for columns (``[2, 0]`` when not symmetric).
    """
    method = _method or FORWARD_METHOD
    if method not in ("fused", "chunked"):
        raise ValueError(f"forward method: expected 'chunked' or 'fused', got {method!r}")
    chunked = method == "chunked"
    m, d = x.shape
    n = y.shape[0]
    cfg = dict(info_nce_tiles("stats" if chunked else "fwd", x.dtype, d, allow_tf32, x.device))
    if _config:
        cfg.update(_config)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    rows = (_rows or chunk_rows(m, n, x.dtype)) if chunked else m
    groups, splits = _grid or _fwd_grid(rows, n, bm, bn, x.device, symmetric)
    # every row group owns at least one row block: its first one initialises the group's column
    # partials (col_init), so no group may be left without one
    groups = min(groups, triton.cdiv(rows, bm))
    grid = (groups, splits)
    dev = x.device
    row_max = scratch((splits, m), torch.float32, dev)
    row_sum = scratch((splits, m), torch.float32, dev)
    # column partials of each row group, merged in place by every launch (chunks run in order)
    col_shape = (groups, n) if symmetric else (1, 1)
    col_max = scratch(col_shape, torch.float32, dev)  # initialised by the first launch
    col_sum = scratch(col_shape, torch.float32, dev)  # (col_init)
    diag = scratch((m,), torch.float32, dev)
    launch = dict(
        COMPUTE_COL=symmetric, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        PRECISION=_precision(x.dtype, allow_tf32), UPCAST=_upcast(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not chunked:
        _info_nce_fwd_kernel[grid](
            x, y, scale, row_max, row_sum, col_max, col_sum, diag, x,
            m, n, d, x.stride(0), y.stride(0), 0, label_offset, 0, m, 1,
            SINGLE_K=bk >= d, LOGITS_GIVEN=False, **launch,
        )
    else:
        y_t = y.t()
        with _gemm_precision(dev, allow_tf32):
            for r0 in range(0, m, rows):
                x_c = x[r0:r0 + rows]
                c = x_c.shape[0]
                logits = _gemm_f32(x_c, y_t)
                _info_nce_fwd_kernel[(min(groups, triton.cdiv(c, bm)), splits)](
                    x_c, y, scale, row_max, row_sum, col_max, col_sum, diag, logits,
                    c, n, d, x.stride(0), y.stride(0), n, label_offset + r0, r0, m, int(r0 == 0),
                    SINGLE_K=False, LOGITS_GIVEN=True, **launch,
                )
    # epilogue in one launch (merging partials on the host took ~25 small ops per call)
    stats_r = scratch((3, m), torch.float32, dev)
    stats_c = scratch((2, n if symmetric else 0), torch.float32, dev)
    block = block_for(m, cap=1024)
    parts = scratch((triton.cdiv(m, block),), torch.float32, dev)
    _info_nce_finalize_kernel[(parts.numel(),)](
        row_max, row_sum, col_max, col_sum, diag, stats_r, stats_c if symmetric else stats_r,
        parts, m, splits, groups, COMPUTE_COL=symmetric, BLOCK=block,
        num_warps=num_warps_for(block),
    )
    total = parts[0] if parts.numel() == 1 else parts.sum()
    loss = total * (LN2 / (2 * m) if symmetric else LN2 / m)
    return loss, stats_r, stats_c


def _bwd_launch(
    x: Tensor, y: Tensor, scale: Tensor, grad: Tensor, stats_r: Tensor | None,
    stats_c: Tensor | None, label_offset: int, diag_coef: float, norm: float, compute_dx: bool,
    compute_dscale: bool, allow_tf32: bool, cfg_over: dict | None, splits_over: int | None,
) -> tuple[Tensor | None, Tensor | None]:
    """One backward launch: ``dX = g s G Y`` for ``G`` built from the given statistics (row
    statistics of X's rows, column statistics of Y's rows; None = that term is absent)."""
    m, d = x.shape
    n = y.shape[0]
    cfg = dict(info_nce_tiles("bwd", x.dtype, d, allow_tf32, x.device))
    if cfg_over:
        cfg.update(cfg_over)
    bm, bn, bk, bdo = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["BLOCK_DO"]
    # one Y tile for both products (GPU only: the interpreter's numpy matmul is slow on the
    # transposed view this needs)
    single_k = bk >= d and bdo == bk and not interpreter_active()
    n_row_blocks = triton.cdiv(m, bm)
    n_dchunks = triton.cdiv(d, bdo) if compute_dx else 1
    if splits_over is not None:
        splits = splits_over
    elif not sized_for_gpu(x.device):
        splits = 1
    else:
        splits = split_count(n_row_blocks * n_dchunks, triton.cdiv(n, bn), 2 * num_sms(x.device))
    dev = x.device
    if compute_dx:
        if splits == 1:
            dx = scratch((m, d), x.dtype, dev)
        else:
            dx = scratch((splits, m, d), torch.float32, dev)
    else:
        dx = torch.empty((0,), dtype=torch.float32, device=dev)
    dscale = scratch((splits * n_row_blocks if compute_dscale else 1,), torch.float32, dev)
    dummy = torch.empty((1,), dtype=torch.float32, device=dev)
    max_r, inv_r = (stats_r[0], stats_r[1]) if stats_r is not None else (dummy, dummy)
    max_c, inv_c = (stats_c[0], stats_c[1]) if stats_c is not None else (dummy, dummy)
    g_scale = _FP16_G_SCALE if x.dtype == torch.float16 else 1.0
    grid = (n_row_blocks, n_dchunks, splits)
    _info_nce_bwd_kernel[grid](
        x, y, scale, grad, max_r, inv_r, max_c, inv_c, dx, dscale,
        m, n, d, x.stride(0), y.stride(0), m * d, label_offset, float(diag_coef), float(norm),
        HAS_R=stats_r is not None, HAS_C=stats_c is not None,
        COMPUTE_DX=compute_dx, COMPUTE_DSCALE=compute_dscale, SINGLE_K=single_k,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DO=bdo, G_SCALE=g_scale,
        PRECISION=_precision(x.dtype, allow_tf32), UPCAST=_upcast(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    out_dx = None
    if compute_dx:
        out_dx = dx if splits == 1 else dx.sum(0).to(x.dtype)
    out_ds = dscale.sum() if compute_dscale else None
    return out_dx, out_ds


#: How the backward is computed (see "Chunked backward" above): ``"chunked"`` (GEMMs on cuBLAS over
#: bounded row chunks of the logits + the Triton ``G`` kernel) or ``"fused"`` (the all-Triton
#: tile kernel). Read at every backward call, so benchmarks can compare the two; the environment
#: variable ``CDDS_FAST_INFO_NCE_BACKWARD`` sets the initial value.
BACKWARD_METHOD = os.environ.get("CDDS_FAST_INFO_NCE_BACKWARD", "chunked")
#: How the forward is computed: ``"fused"`` (the tile kernel above: logits by ``tl.dot``, O(B)
#: memory) or ``"chunked"`` (logits of :func:`chunk_rows` rows at a time by a cuBLAS GEMM, the
#: same kernel reading them: one chunk of extra memory; IEEE fp32 runs on cuBLAS instead of
#: Triton's FMA dot). Env ``CDDS_FAST_INFO_NCE_FORWARD`` sets the initial value.
FORWARD_METHOD = os.environ.get("CDDS_FAST_INFO_NCE_FORWARD", "fused")


@contextlib.contextmanager
def methods(forward: str | None = None, backward: str | None = None) -> Iterator[None]:
    """Run the enclosed forward *and* backward passes with these methods (None: unchanged);
    restores :data:`FORWARD_METHOD` / :data:`BACKWARD_METHOD` after (benchmarks, tools)."""
    global FORWARD_METHOD, BACKWARD_METHOD
    saved = FORWARD_METHOD, BACKWARD_METHOD
    FORWARD_METHOD, BACKWARD_METHOD = forward or FORWARD_METHOD, backward or BACKWARD_METHOD
    try:
        yield
    finally:
        FORWARD_METHOD, BACKWARD_METHOD = saved
#: Bytes of one chunk's fp32 logits plus its ``G`` (the chunked backward's only extra memory),
#: unless that is fewer than :data:`MIN_CHUNK_ROWS` rows. 24 MiB keeps fp32 B = 16384 within the
#: issue's 0.1 GB of extra memory (gradients included); 192 rows keep each chunk's GEMMs large
#: enough that the GPU, not the launches (~5 per chunk), sets the pace at B = 65536.
CHUNK_BYTES = 24 * 2**20
MIN_CHUNK_ROWS = 192


def _cublas_tf32(want: bool) -> Callable[[], None] | None:
    """Make fp32 cuBLAS matmuls use TF32 iff ``want``; returns the undo, or None if no change.

    Uses whichever of PyTorch's two flag APIs the program already uses (mixing them raises), and
    touches nothing when the setting is already the wanted one."""
    m = torch.backends.cuda.matmul
    try:
        legacy = bool(m.allow_tf32)  # raises once the new API has been used
    except RuntimeError:
        current = m.fp32_precision
        if (current == "tf32") == want:
            return None
        m.fp32_precision = "tf32" if want else "ieee"
        return lambda: setattr(m, "fp32_precision", current)
    if legacy == want:
        return None
    m.allow_tf32 = want
    return lambda: setattr(m, "allow_tf32", legacy)


@contextlib.contextmanager
def _gemm_precision(device: torch.device, allow_tf32: bool) -> Iterator[None]:
    """Around a chunked pass's GEMMs, set once and restored after: autocast off (a backward
    called inside an autocast region must not turn them into 16-bit GEMMs) and, on CUDA, fp32
    GEMMs in IEEE fp32 unless ``allow_tf32``."""
    with torch.autocast(device_type=device.type, enabled=False):
        undo = _cublas_tf32(allow_tf32) if device.type == "cuda" else None
        try:
            yield
        finally:
            if undo is not None:
                undo()


def _gemm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with an fp32 result and fp32 accumulation, whatever the (common) input dtype
    (inside :func:`_gemm_precision`).

    CUDA 16-bit inputs use cuBLAS's fp32-output GEMM (``out_dtype``). Elsewhere (the CPU
    interpreter runs) operands are widened to fp32: products of 16-bit values are exact in fp32,
    so the result is the same function."""
    if a.device.type != "cuda" or a.dtype == torch.float32:
        return a.float() @ b.float()
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except TypeError:  # torch < 2.8 has no fp32-output GEMM for 16-bit inputs
        return a.float() @ b.float()


def chunk_rows(m: int, n: int, dtype: torch.dtype, budget: int | None = None) -> int:
    """Rows per chunk of the chunked backward: the fp32 logits ``[c, n]`` and ``G`` ``[c, n]``
    fit ``budget`` bytes (:data:`CHUNK_BYTES`), in multiples of 64 rows, at least
    :data:`MIN_CHUNK_ROWS`, at most ``m``."""
    per_row = n * (4 + torch.finfo(dtype).bits // 8)
    rows = max(MIN_CHUNK_ROWS, (int(budget or CHUNK_BYTES) // per_row) // 64 * 64)
    return min(m, rows)


def _bwd_chunked(
    x: Tensor, y: Tensor, scale: Tensor, grad_norm: Tensor, stats_r: Tensor | None,
    stats_c: Tensor | None, label_offset: int, diag_coef: float, compute_dx: bool,
    compute_dscale: bool, allow_tf32: bool, label_t: Tensor, label_by_col: bool,
    rows_per_chunk: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`_bwd_launch`'s result (``dX = g s G Y`` and ``dL/ds``) computed chunk by chunk:
    for ``c`` rows at a time, ``R = X_c Y^T`` (GEMM, fp32), ``G_c`` from ``R`` (Triton), and
    ``dX_c = G_c Y`` (GEMM). Extra memory: one ``[c, N]`` fp32 + one ``[c, N]`` operand buffer.
    ``grad_norm`` is the upstream gradient times the loss's ``1/(2M)`` or ``1/M`` (0-d)."""
    m, d = x.shape
    n = y.shape[0]
    rows = rows_per_chunk or chunk_rows(m, n, x.dtype)
    dev = x.device
    g_scale = _FP16_G_SCALE if x.dtype == torch.float16 else 1.0
    bm, bn, warps = logit_tiles(rows, n, dev)
    grid_n = triton.cdiv(n, bn)
    # one dL/ds partial per program of every chunk, all written: no zero fill
    n_parts = sum(triton.cdiv(min(rows, m - r0), bm) for r0 in range(0, m, rows)) * grid_n
    dscale = scratch((n_parts if compute_dscale else 1,), torch.float32, dev)
    dx = scratch((m, d), x.dtype, dev) if compute_dx else None
    dummy = torch.empty((1,), dtype=torch.float32, device=dev)
    max_r, inv_r = (stats_r[0], stats_r[1]) if stats_r is not None else (dummy, dummy)
    max_c, inv_c = (stats_c[0], stats_c[1]) if stats_c is not None else (dummy, dummy)
    # dX = g s norm G Y; G was stored times g_scale. grad * norm is a 0-d device tensor.
    coef = grad_norm * (scale.to(torch.float32) / g_scale) if compute_dx else None
    y_t = y.t()
    part = 0
    with _gemm_precision(dev, allow_tf32):
        for r0 in range(0, m, rows):
            x_c = x[r0:r0 + rows]
            c = x_c.shape[0]
            logits = _gemm_f32(x_c, y_t)
            g = scratch((c, n), x.dtype, dev)
            grid = (triton.cdiv(c, bm), grid_n)
            _info_nce_grad_logits_kernel[grid](
                logits, g, scale, max_r, inv_r, max_c, inv_c, label_t,
                dscale[part:] if compute_dscale else dscale,
                c, n, r0, label_offset, float(diag_coef),
                HAS_R=stats_r is not None, HAS_C=stats_c is not None,
                COMPUTE_DSCALE=compute_dscale, LABEL_BY_COL=label_by_col, BLOCK_M=bm, BLOCK_N=bn,
                G_SCALE=g_scale,
                num_warps=warps,
            )
            part += grid[0] * grid[1] if compute_dscale else 0
            if compute_dx:
                # scale, round to the input dtype and store into dX in one element-wise launch
                torch.mul(_gemm_f32(g, y), coef, out=dx[r0:r0 + c])
    out_ds = dscale.sum() * grad_norm if compute_dscale else None
    return dx, out_ds


def info_nce_backward(
    grad: Tensor, x: Tensor, y: Tensor, scale: Tensor, stats_r: Tensor, stats_c: Tensor,
    label_offset: int, symmetric: bool, allow_tf32: bool, need_dx: bool, need_dy: bool,
    need_dscale: bool, *, _config: dict | None = None, _splits: int | None = None,
    _method: str | None = None, _rows: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`info_nce_forward`'s loss: ``(dx, dy, dscale)`` (None where not needed).

    ``dx``/``dy`` in the input dtype, ``dscale`` a 0-d fp32 tensor (the caller casts it).
    ``_method`` overrides :data:`BACKWARD_METHOD`; ``_rows`` the chunked backward's rows per
    chunk; ``_config`` / ``_splits`` the fused backward's tiles / column splits (tests, tuning)."""
    m = x.shape[0]
    grad = grad.detach().to(torch.float32).reshape(())
    dx = dy = dscale = None
    if symmetric:
        norm, diag_coef = 1.0 / (2 * m), 2.0
        sr_x, sc_x = stats_r, stats_c      # dX: rows of S
        sr_y, sc_y = stats_c, stats_r      # dY: rows of S^T
        off_y = 0
    else:
        norm, diag_coef = 1.0 / m, 1.0
        sr_x, sc_x = stats_r, None         # dX: row softmax of S
        sr_y, sc_y = None, stats_r         # dY: column softmax of S^T (== row softmax of S)
        off_y = -label_offset
    method = _method or BACKWARD_METHOD
    if method == "chunked":
        grad_norm = grad * norm

        def launch(a, b, sr, sc, off, need_da, need_ds, transposed):
            return _bwd_chunked(a, b, scale, grad_norm, sr, sc, off, diag_coef, need_da,
                                need_ds, allow_tf32, stats_r[2], transposed, _rows)
    elif method == "fused":
        def launch(a, b, sr, sc, off, need_da, need_ds, transposed):
            return _bwd_launch(a, b, scale, grad, sr, sc, off, diag_coef, norm, need_da,
                               need_ds, allow_tf32, _config, _splits)
    else:
        raise ValueError(f"backward method: expected 'chunked' or 'fused', got {method!r}")
    if need_dx or need_dscale:
        dx, dscale = launch(x, y, sr_x, sc_x, label_offset, need_dx, need_dscale, False)
    if need_dy:
        dy, _ = launch(y, x, sr_y, sc_y, off_y, True, False, True)
    return dx, dy, dscale


# ------------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile-friendly) and the autograd glue
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("cdds_fast::info_nce_fwd", mutates_args=())
def _info_nce_fwd_op(
    x: Tensor, y: Tensor, scale: Tensor, label_offset: int, symmetric: bool, allow_tf32: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return info_nce_forward(x, y, scale, label_offset, symmetric, allow_tf32)


@_info_nce_fwd_op.register_fake
def _(x, y, scale, label_offset, symmetric, allow_tf32):
    loss = x.new_empty((), dtype=torch.float32)
    stats_r = x.new_empty((3, x.shape[0]), dtype=torch.float32)
    stats_c = x.new_empty((2, y.shape[0] if symmetric else 0), dtype=torch.float32)
    return loss, stats_r, stats_c


@torch.library.custom_op("cdds_fast::info_nce_bwd", mutates_args=())
def _info_nce_bwd_op(
    grad: Tensor, x: Tensor, y: Tensor, scale: Tensor, stats_r: Tensor, stats_c: Tensor,
    label_offset: int, symmetric: bool, allow_tf32: bool,
    need_dx: bool, need_dy: bool, need_dscale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dy, ds = info_nce_backward(grad, x, y, scale, stats_r, stats_c, label_offset, symmetric,
                                   allow_tf32, need_dx, need_dy, need_dscale)
    # custom ops return tensors only: empty placeholders for gradients nobody asked for
    empty = x.new_empty((0,))
    return (
        dx if dx is not None else empty.clone(),
        dy if dy is not None else empty.clone(),
        ds.to(scale.dtype) if ds is not None else scale.new_empty((0,)),
    )


@_info_nce_bwd_op.register_fake
def _(grad, x, y, scale, stats_r, stats_c, label_offset, symmetric, allow_tf32,
      need_dx, need_dy, need_dscale):
    return (
        x.new_empty(x.shape if need_dx else (0,)),
        y.new_empty(y.shape if need_dy else (0,)),
        scale.new_empty(() if need_dscale else (0,)),
    )


def _setup_context(ctx, inputs, output):
    x, y, scale, label_offset, symmetric, allow_tf32 = inputs
    _, stats_r, stats_c = output
    ctx.save_for_backward(x, y, scale, stats_r, stats_c)
    ctx.label_offset, ctx.symmetric, ctx.allow_tf32 = label_offset, symmetric, allow_tf32
    ctx.mark_non_differentiable(stats_r, stats_c)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics


def _backward(ctx, grad_loss, _grad_stats_r, _grad_stats_c):
    if grad_loss is None:
        return None, None, None, None, None, None
    x, y, scale, stats_r, stats_c = ctx.saved_tensors
    need_dx, need_dy, need_ds = ctx.needs_input_grad[:3]
    dx, dy, ds = _info_nce_bwd_op(grad_loss, x, y, scale, stats_r, stats_c, ctx.label_offset,
                                  ctx.symmetric, ctx.allow_tf32, need_dx, need_dy, need_ds)
    return (dx if need_dx else None, dy if need_dy else None, ds if need_ds else None,
            None, None, None)


_info_nce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class InfoNCEFunction(torch.autograd.Function):
    """Eager ``torch.autograd.Function`` over the same launchers (Liger-style entry point).

    ``InfoNCEFunction.apply(x, y, scale, label_offset, symmetric, allow_tf32)`` with prepared
    inputs (see :func:`prepare`); :func:`info_nce_triton` uses the custom op instead, which also
    traces under ``torch.compile``."""

    @staticmethod
    def forward(ctx, x, y, scale, label_offset, symmetric, allow_tf32):
        loss, stats_r, stats_c = info_nce_forward(x, y, scale, label_offset, symmetric, allow_tf32)
        ctx.save_for_backward(x, y, scale, stats_r, stats_c)
        ctx.label_offset, ctx.symmetric, ctx.allow_tf32 = label_offset, symmetric, allow_tf32
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, y, scale, stats_r, stats_c = ctx.saved_tensors
        need_dx, need_dy, need_ds = ctx.needs_input_grad[:3]
        dx, dy, ds = info_nce_backward(grad_loss, x, y, scale, stats_r, stats_c, ctx.label_offset,
                                       ctx.symmetric, ctx.allow_tf32, need_dx, need_dy, need_ds)
        return dx, dy, (ds.to(scale.dtype) if ds is not None else None), None, None, None


def prepare(x: Tensor, y: Tensor, logit_scale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous features (once) and the scale as a 0-d tensor on the features' device."""
    if isinstance(logit_scale, Tensor):
        scale = logit_scale if logit_scale.device == x.device else logit_scale.to(x.device)
    else:
        scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=x.device)
    return x.contiguous(), y.contiguous(), scale


def info_nce_triton(
    x: Tensor, y: Tensor, logit_scale: Tensor | float, *, label_offset: int = 0,
    symmetric: bool = True, allow_tf32: bool = False,
) -> Tensor:
    """Fused InfoNCE: symmetric ``(CE(s X Y^T) + CE(s Y X^T)) / 2`` (``symmetric=True``) or the
    row cross-entropy ``CE(s X Y^T, arange(M) + label_offset)`` (``symmetric=False``).

    Args:
        x: ``[M, D]``, y: ``[N, D]`` float32/bfloat16/float16, same dtype and device.
        logit_scale: the exponentiated scale, 0-d tensor (gets a gradient) or a number.
        label_offset: column of row 0's positive (rectangular case only).
        allow_tf32: fp32 inputs may use TF32 tensor cores (off by default: IEEE fp32 products).
    Returns:
        0-d float32 loss. Gradients flow to ``x``, ``y`` and a tensor ``logit_scale``.
    """
    check_inputs(x, y, logit_scale, same_rows=symmetric)
    m, n = x.shape[0], y.shape[0]
    if symmetric and label_offset != 0:
        raise ValueError(f"label_offset: expected 0 for the symmetric loss, got {label_offset}")
    if not symmetric and not (0 <= label_offset and label_offset + m <= n):
        raise ValueError(
            f"label_offset: expected 0 <= label_offset <= N - M = {n - m} (labels index the "
            f"{n} columns), got {label_offset}"
        )
    x, y, scale = prepare(x, y, logit_scale)
    return _info_nce_fwd_op(x, y, scale, int(label_offset), bool(symmetric), bool(allow_tf32))[0]


__all__ = [
    "InfoNCEFunction",
    "check_inputs",
    "info_nce_backward",
    "info_nce_forward",
    "info_nce_triton",
    "prepare",
]
