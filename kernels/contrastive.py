r"""Symmetric InfoNCE (open_clip ``ClipLoss`` math) in O(B) memory, at GEMM speed.

What is computed (``docs/method.md`` section 5)
===============================================
Rows ``X [M, D]``, columns ``Y [N, D]``, scale ``s`` (CLIP's *exponentiated* ``logit_scale``),
logits ``S = s X Y^T`` (never stored whole), label of row ``i`` is column ``i + o``.

* **symmetric** (``M == N``, ``o == 0``; one process, or ``local_loss=False``)::

      L = ( CE(S, arange) + CE(S^T, arange) ) / 2
        = 1/(2M) * sum_i [ (lse_r[i] - S_ii) + (lse_c[i] - S_ii) ]

* **rectangular** (one direction of ``local_loss=True``: local rows against all gathered
  columns, ``o = B * rank``): ``L = CE(S, arange(M) + o) = 1/M * sum_i (lse_r[i] - S_{i,i+o})``.

Every launcher takes ``P`` independent problems of one shape at once (``X [P, M, D]``,
``Y [P, N, D]``, one loss per problem): the CDDS loss's three small InfoNCE terms run in one
launch each way.

The gradient w.r.t. the logits is one matrix (``P^r``/``P^c`` the row/column softmax)::

      G = P^r + P^c - 2 I        (symmetric; times 1/(2M))
      G = P^r - [j == i + o]     (rectangular; times 1/M)
      dX = g s norm G Y,   dY = g s norm G^T X,   dL/ds = g norm sum_ij G_ij <x_i, y_j>

with ``g`` the upstream gradient. Statistics are base 2 (``t = R s log2(e)``, ``exp2``) and
saved per row as ``(max, 1/sum, label logit)``; max and sum are kept apart, so the loss of row
``i`` is ``(max_i - t_label) + log2(sum_i)``, whose first term is exact and 0 when the label wins
(a near-zero loss at ``s = 100`` is not swamped by the rounding of a ~144-sized LSE). Label
entries of ``G`` use the saved label logits, so ``P_ii - 1`` is consistent with the statistics
whatever order a recompute sums in: ``B = 1`` gives exactly 0 (loss and gradients).

Two paths, one rule
===================
:func:`cdds_fast.kernels.launch.info_nce_plan` picks the path from ``(dtype, M, N, D)`` (the
reasons are in ``launch.FUSED_MAX_FLOP``'s comment) and sizes its tiles and blocks.

**fused** (small problems): all-Triton tiles, the logits never leave registers.
``_info_nce_fwd_kernel``: one program per (row block, direction, problem) sweeps all columns
with ``tl.dot`` and an online log-sum-exp; direction 1 is ``S^T`` (the column statistics), so
no cross-program merge exists and the forward is the kernel plus one sum of the per-program loss
partials. ``_info_nce_bwd_kernel``: one program per (row block, output feature chunk, direction,
problem) recomputes its logits, forms ``G`` and accumulates ``G Y`` (direction 0: ``dX``) or
``G^T X`` (direction 1: ``dY``) in fp32 registers; the ``dL/ds`` partials come from direction 0.
The price of no merge is one more logit recompute per direction (``12 M N D`` FLOP fwd + bwd
instead of ``8``), nothing at the sizes this path takes.

**blocked** (large problems): the GEMMs run on cuBLAS (``torch.mm``/``addmm``), the Triton
kernels are element-wise epilogues over bounded blocks of fp32 logits.

* forward, per chunk of ``fwd_rows`` rows: ``R = X_c Y^T`` (GEMM, fp32 output), then
  ``_info_nce_block_fwd_kernel`` reads ``R`` once: complete row statistics of the chunk, the
  label logits, and column partials merged into ``[groups, N]`` buffers; after the last chunk
  ``_info_nce_finalize_kernel`` merges the partials into the statistics and the loss.
* backward, per ``[bwd_rows, bwd_cols]`` block (``I`` rows, ``J`` columns): ``R = X_I Y_J^T``
  (GEMM), ``_info_nce_block_bwd_kernel`` turns it into ``G`` (in the feature dtype; in place for
  fp32) and the ``dL/ds`` partials, then ``dX_I += G Y_J`` and ``dY_J += G^T X_I`` (GEMMs into
  fp32 accumulators): ONE recompute serves both gradients. ``dX_I`` is scaled and rounded to the
  feature dtype once its row of blocks is done, ``dY`` after the last block.

The logits are stored in fp32 rather than the feature dtype: a bf16 logit of size ~0.5 carries
an error up to ``2^-9 s`` = 0.2 at ``s = 100``, i.e. ~20 % in ``exp(S)``, which the tolerance
of the parity tests (``tests/test_contrastive.py``) does not allow. ``G`` is rounded to the
feature dtype for its GEMMs (as FlashAttention rounds ``P``), pre-multiplied by ``2**14`` for
fp16 so small probabilities stay normal.

Precision: fp32 features use IEEE products everywhere (``tl.dot(input_precision="ieee")``,
cuBLAS with TF32 off) unless ``allow_tf32``; 16-bit features have exact products accumulated in
fp32. Statistics, sums and accumulators are fp32. With ``allow_tf32`` the all-Triton tiles'
``tl.dot`` drops each operand's 13 low mantissa bits (Triton does not round them to TF32 as cuBLAS
does), which shrinks the logits by ~2^-10 on average: ~1e-3 relative on the loss and its
gradients (tests/test_contrastive.py ``TF32_TOL``).

Cost model (H200; a model, not a measurement)
=============================================
Symmetric, one problem, ``B = M = N``, ``e`` bytes per feature element, default budget
(192 MiB). FLOPs: blocked ``2 B^2 D`` forward + ``6 B^2 D`` backward; fused ``4 B^2 D + 8 B^2 D``.
Bytes (blocked): forward ``8 B^2`` (the GEMM writes fp32 logits, the epilogue reads them) plus
``Y`` re-read once per chunk; backward ``4 B^2`` (GEMM) + ``(4 + e) B^2`` (``G`` kernel) + ``2 e
B^2`` (two GEMMs reading ``G``; ``e = 4`` for fp32) plus the operands re-read once per block
and the fp32 accumulators re-read and re-written once per block row (``dX``) / column (``dY``).
Time: each kernel at the larger of its FLOPs at peak (989 TFLOP/s bf16/fp16, 494 TF32, 67 IEEE
fp32) and its bytes at 4.11 TB/s (an assumed copy bandwidth, 86 % of the 4.8 TB/s HBM peak;
``benchmarks/report.py`` measures the real one), summed over kernels (they run one after
another), plus 4 us per launch. :func:`cost_model` computes it; the table is :func:`cost_table`
(D = 512; a test keeps the two equal). Launches are forward + backward; scratch is the logit
buffers of the forward / backward. The bf16 forward GEMM at B = 65536 writes 17 GB of fp32 logits
in about the time its FLOPs take, so the path is as much bandwidth- as compute-bound; IEEE fp32 is
CUDA-core bound.

=====  =====  =======  ======  ======  ========  =========  ===========
B      dtype  path     TFLOP   GB      model ms  launches   scratch MiB
=====  =====  =======  ======  ======  ========  =========  ===========
4096   bf16   blocked  0.0687  0.428   0.164     4 + 9      64 / 96
16384  bf16   blocked  1.1     6.64    2.01      14 + 43    192 / 190
65536  bf16   blocked  17.6    110     32.6      174 + 592  192 / 190
4096   fp32   blocked  0.0687  0.554   1.13      4 + 9      64 / 64
16384  fp32   blocked  1.1     8.67    17.4      14 + 43    192 / 189
65536  fp32   blocked  17.6    143     277       174 + 414  192 / 189
4096   tf32   blocked  0.0687  0.554   0.24      4 + 9      64 / 64
16384  tf32   blocked  1.1     8.67    3.24      14 + 43    192 / 189
65536  tf32   blocked  17.6    143     50.5      174 + 414  192 / 189
=====  =====  =======  ======  ======  ========  =========  ===========

Launches per call (``P`` problems; ``f = ceil(M / fwd_rows)`` chunks, ``b_i = ceil(M /
bwd_rows)``, ``b_j = ceil(N / bwd_cols)``; brackets are 1 if that gradient is wanted):
fused forward ``2``, backward ``1 + [dL/ds]``; blocked forward ``P (2 f + 1) + 1``, backward
``P (b_i b_j (2 + [dX] + [dY]) + [dX] b_i + [dY]) + 2 + [dL/ds]`` (:func:`launch_counts`; the
CDDS loss's three terms at B = 256 take the fused path: 2 + 2).
Peak extra memory of the blocked path beyond its inputs: forward one ``[fwd_rows, N]`` fp32
chunk plus ``O((groups + splits) B)`` partials; backward one block (``bwd_rows bwd_cols (4 + e)``
bytes, ``4`` for fp32: ``G`` overwrites the logits) plus, for 16-bit features, the fp32
accumulators ``4 bwd_rows D`` (``dX``) and ``4 N D`` (``dY``), plus the gradients themselves
(:func:`scratch_bytes`). At B = 65536, D = 512, bf16: 190 + 11 + 128 MiB + 128 MiB of gradients
= ~460 MiB, against 32.9 GB for ``ClipLoss``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from cdds_fast.kernels import launch
from cdds_fast.kernels.launch import (
    INFO_NCE_SCRATCH_BYTES,
    InfoNCEPlan,
    block_for,
    interpreter_active,
    num_sms,
    num_warps_for,
    sized_for_gpu,
    split_count,
)

LN2 = 0.6931471805599453
_FP16_G_SCALE = 16384.0  # 2**14: |G| <= 2, so |G * 2**14| <= 32768 < 65504 (fp16 max)


# ------------------------------------------------------------------------------------------------
# Shared tile helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. ``UPCAST`` (CPU interpreter only): the interpreter
    multiplies bfloat16 blocks as raw integer bits and float16 blocks with numpy's slow non-BLAS
    fp16 matmul, so there 16-bit operands are widened to fp32 first; products of 16-bit values
    are exact in fp32, so the result matches the GPU's fp32-accumulated dot."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _tile_logits(
    A,
    B,
    a_single,
    rows64,
    cols64,
    row_ok,
    col_ok,
    offs_k,
    D,
    SINGLE_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``R = A[rows] @ B[cols]^T`` in fp32 for row-major ``[*, D]`` operands; padded rows,
    columns and features load as 0. ``B`` is loaded as a ``[BLOCK_K, BLOCK_N]`` (transposed)
    block, as in Triton's matmul tutorial for a column-major right operand."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SINGLE_K:
        # the whole feature dimension is one block: A's block was loaded once by the caller
        b_t = tl.load(
            B + cols64[None, :] * D + offs_k[:, None],
            mask=col_ok[None, :] & (offs_k[:, None] < D),
            other=0.0,
        )
        acc = _mm(a_single, b_t, acc, PRECISION, UPCAST)
    else:
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < D
            a = tl.load(
                A + rows64[:, None] * D + kk[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            b_t = tl.load(
                B + cols64[None, :] * D + kk[:, None],
                mask=col_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            acc = _mm(a, b_t, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _softmax_term(t, label_t, is_label, row_max, row_inv, AXIS: tl.constexpr):
    """One softmax of ``G`` on a tile of base-2 logits ``t``: ``exp2(t - max) / sum`` with the
    statistics broadcast along rows (``AXIS == 0``: one value per tile row) or columns
    (``AXIS == 1``), label entries taking the saved label logit ``label_t`` (same broadcast).
    Padded entries must be ``-inf`` (their term is then exactly 0)."""
    if AXIS == 0:
        tt = tl.where(is_label, label_t[:, None], t)
        out = tl.exp2(tt - row_max[:, None]) * row_inv[:, None]
    else:
        tt = tl.where(is_label, label_t[None, :], t)
        out = tl.exp2(tt - row_max[None, :]) * row_inv[None, :]
    return out


@triton.jit
def _column_term(STATS, cols64, col_ok, n_cols, t, is_label):
    """The softmax term of ``G`` whose statistics (``[3, n_cols]``: max, 1 / sum, label logit)
    belong to the tile's columns."""
    col_max = tl.load(STATS + cols64, mask=col_ok, other=0.0)
    col_inv = tl.load(STATS + n_cols + cols64, mask=col_ok, other=0.0)
    col_lab = tl.load(STATS + 2 * n_cols + cols64, mask=col_ok, other=0.0)
    return _softmax_term(t, col_lab, is_label, col_max, col_inv, 1)


# ------------------------------------------------------------------------------------------------
# The fused (all-Triton) path
# ------------------------------------------------------------------------------------------------


@triton.jit
def _info_nce_fwd_kernel(
    X,
    Y,
    SCALE,  # X [P, M, D], Y [P, N, D] (same dtype); SCALE 0-d
    STATS_R,
    STATS_C,  # out [P, 3, M], [P, 3, N]: base-2 max, 1 / sum, label logit
    LOSS_PART,  # out [P, n_dirs, n_row_blocks]: loss_coef * sum of row losses
    M,
    N,
    D,
    label_offset,
    loss_coef,  # ln 2 / (2M) symmetric, ln 2 / M rectangular
    SINGLE_K: tl.constexpr,  # BLOCK_K >= D: the row block is loaded once
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    direction = tl.program_id(1)  # 0: rows of S; 1 (symmetric only, M == N): rows of S^T
    p = tl.program_id(2).to(tl.int64)
    if direction == 0:
        A = X + p * M * D
        B = Y + p * N * D
        STATS = STATS_R + p * 3 * M
    else:
        A = Y + p * N * D
        B = X + p * M * D
        STATS = STATS_C + p * 3 * N
    offset = label_offset  # 0 whenever direction 1 exists
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634

    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    a_single = tl.zeros((BLOCK_M, BLOCK_K), dtype=A.dtype.element_ty)
    if SINGLE_K:
        a_single = tl.load(
            A + rows64[:, None] * D + offs_k[None, :],
            mask=row_ok[:, None] & (offs_k[None, :] < D),
            other=0.0,
        )
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lab = tl.zeros((BLOCK_M,), dtype=tl.float32)
    labels = rows + offset
    lab_lo = pid_m * BLOCK_M + offset
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + offs_n
        col_ok = cols < N
        r = _tile_logits(
            A,
            B,
            a_single,
            rows64,
            cols.to(tl.int64),
            row_ok,
            col_ok,
            offs_k,
            D,
            SINGLE_K,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            PRECISION,
            UPCAST,
        )
        t = tl.where(col_ok[None, :], r * scale2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
        m_i = m_new
        # the label logit, taken from the very tile the LSE saw (only tiles holding labels)
        if (c0 < lab_lo + BLOCK_M) & (c0 + BLOCK_N > lab_lo):
            lab += tl.sum(tl.where(cols[None, :] == labels[:, None], t, 0.0), axis=1)
    tl.store(STATS + rows64, m_i, mask=row_ok)
    tl.store(STATS + M + rows64, 1.0 / l_i, mask=row_ok)
    tl.store(STATS + 2 * M + rows64, lab, mask=row_ok)
    row_loss = tl.where(row_ok, (m_i - lab) + tl.log2(l_i), 0.0)
    part = (p * tl.num_programs(1) + direction) * tl.num_programs(0) + pid_m
    tl.store(LOSS_PART + part, tl.sum(row_loss, axis=0) * loss_coef)


@triton.jit
def _info_nce_bwd_kernel(
    X,
    Y,
    SCALE,
    GRAD,  # GRAD [P] fp32: upstream gradient of each problem's loss
    STATS_R,
    STATS_C,  # [P, 3, M], [P, 3, N] from the forward
    DX,
    DY,  # out [P, M, D], [P, N, D] in the feature dtype
    DSCALE_PART,  # out [P, n_row_blocks]: grad * norm * sum_ij G_ij R_ij
    M,
    N,
    D,
    label_offset,
    norm,  # 1/(2M) symmetric, 1/M rectangular
    diag_coef,  # weight of the label indicator in G: 2 symmetric, 1 otherwise
    first_dir,
    n_dirs,  # directions in the grid: 0 = dX, 1 = dY
    SYMMETRIC: tl.constexpr,
    COMPUTE_DSCALE: tl.constexpr,
    SINGLE_K: tl.constexpr,  # BLOCK_K == BLOCK_DO >= D: one tile of B serves both products
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,  # output feature chunk (grid axis 1)
    G_SCALE: tl.constexpr,  # 2**14 for fp16 (keeps G normal), 1 otherwise
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_z = tl.program_id(2)
    p = (pid_z // n_dirs).to(tl.int64)
    direction = first_dir + pid_z % n_dirs
    # Direction 0 (dX = G Y): rows of X, columns Y, own statistics = the row softmax, other =
    # the column softmax (symmetric). Direction 1 (dY = G^T X): rows of Y, columns X, own = the
    # column softmax (symmetric only), other = the row softmax indexed by column.
    if direction == 0:
        A = X + p * M * D
        B = Y + p * N * D
        OUT = DX + p * M * D
        OWN = STATS_R + p * 3 * M
        OTHER = STATS_C + p * 3 * N
    else:
        A = Y + p * N * D
        B = X + p * M * D
        OUT = DY + p * N * D
        OWN = STATS_C + p * 3 * N
        OTHER = STATS_R + p * 3 * M
    # (values that differ by direction are formed arithmetically, not per branch: Triton may
    # specialise an integer argument to a constant, and branches must agree on types)
    n_rows = tl.where(direction == 0, M, N)
    n_cols = tl.where(direction == 0, N, M)
    shift = label_offset * (1 - 2 * direction)  # label column = row + shift
    if pid_m * BLOCK_M >= n_rows:
        return
    scale = tl.load(SCALE).to(tl.float32)
    scale2 = scale * 1.4426950408889634
    g_up = tl.load(GRAD + p)

    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    labels = rows + shift
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    # rows with own statistics (all, except direction 1 of the rectangular loss): a bound, not
    # `row_ok & flag` (a block-and-scalar mask that triton 3.9's interpreter rejects)
    if SYMMETRIC:
        own_ok = row_ok
    else:
        own_ok = rows < n_rows * (direction == 0).to(tl.int32)
    own_max = tl.load(OWN + rows64, mask=own_ok, other=0.0)
    own_inv = tl.load(OWN + n_rows + rows64, mask=own_ok, other=0.0)
    own_lab = tl.load(OWN + 2 * n_rows + rows64, mask=own_ok, other=0.0)
    a_single = tl.zeros((BLOCK_M, BLOCK_K), dtype=A.dtype.element_ty)
    if SINGLE_K:
        a_single = tl.load(
            A + rows64[:, None] * D + offs_k[None, :],
            mask=row_ok[:, None] & (offs_k[None, :] < D),
            other=0.0,
        )

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + offs_n
        col_ok = cols < n_cols
        cols64 = cols.to(tl.int64)
        b_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=B.dtype.element_ty)
        if SINGLE_K:
            b_tile = tl.load(
                B + cols64[:, None] * D + offs_k[None, :],
                mask=col_ok[:, None] & (offs_k[None, :] < D),
                other=0.0,
            )
            r = _mm(
                a_single,
                tl.trans(b_tile),
                tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                PRECISION,
                UPCAST,
            )
        else:
            r = _tile_logits(
                A,
                B,
                a_single,
                rows64,
                cols64,
                row_ok,
                col_ok,
                offs_k,
                D,
                False,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                PRECISION,
                UPCAST,
            )
        ok = row_ok[:, None] & col_ok[None, :]
        t = tl.where(ok, r * scale2, float("-inf"))
        is_label = (cols[None, :] == labels[:, None]) & ok
        g = tl.where(is_label, -diag_coef, 0.0)
        # symmetric: both softmax terms, decided at compile time (a runtime branch here costs
        # the fp32 kernel its registers); rectangular: the row softmax of S in direction 0, read
        # as rows (dX) or as columns (dY)
        if SYMMETRIC:
            g += _softmax_term(t, own_lab, is_label, own_max, own_inv, 0)
            g += _column_term(OTHER, cols64, col_ok, n_cols, t, is_label)
        elif direction == 0:
            g += _softmax_term(t, own_lab, is_label, own_max, own_inv, 0)
        else:
            g += _column_term(OTHER, cols64, col_ok, n_cols, t, is_label)
        if COMPUTE_DSCALE:
            ds += tl.sum(g * r, axis=1)
        if SINGLE_K:
            b_do = b_tile
        else:
            b_do = tl.load(
                B + cols64[:, None] * D + offs_do[None, :],
                mask=col_ok[:, None] & do_ok[None, :],
                other=0.0,
            )
        if B.dtype.element_ty == tl.float32:
            acc = _mm(g, b_do, acc, PRECISION, UPCAST)
        else:
            acc = _mm((g * G_SCALE).to(B.dtype.element_ty), b_do, acc, PRECISION, UPCAST)

    out = acc * (g_up * scale * (norm / G_SCALE))
    tl.store(
        OUT + rows64[:, None] * D + offs_do[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & do_ok[None, :],
    )
    if COMPUTE_DSCALE:
        if (direction == 0) & (pid_d == 0):
            tl.store(
                DSCALE_PART + p * tl.cdiv(M, BLOCK_M) + pid_m, tl.sum(ds, axis=0) * norm * g_up
            )


# ------------------------------------------------------------------------------------------------
# The blocked path: element-wise epilogues of cuBLAS GEMMs
# ------------------------------------------------------------------------------------------------


@triton.jit
def _info_nce_block_fwd_kernel(
    R,  # [c, N] fp32: logits <x_i, y_j> of rows row0 .. row0 + c
    SCALE,
    ROW_MAX,
    ROW_SUM,  # [splits, M] fp32: row partials, written at row0 + row
    COL_MAX,
    COL_SUM,  # [groups, N] fp32: column partials of each row group (merged)
    DIAG,  # [M] fp32: base-2 label logits, written at row0 + row
    c,
    N,
    M,
    row0,
    label0,  # label0 = row0 + label offset: label column of local row 0
    col_init,  # 1 in a problem's first chunk: the partials hold garbage and
    # each group's first row block writes instead of merging
    COMPUTE_COL: tl.constexpr,  # symmetric: column statistics too
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program ``(g, s)`` walks row blocks ``g, g + G, ...`` of the chunk and the column blocks
    of split ``s``: online row statistics (complete per split), the label logit, and column
    partials merged into row group ``g``'s slice (no other program touches it: no atomics)."""
    pid_g = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_groups = tl.num_programs(0)
    n_splits = tl.num_programs(1)
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_col_blocks, n_splits)
    cb_lo = pid_s * per_split
    cb_hi = tl.minimum(cb_lo + per_split, n_col_blocks)
    col_lo = cb_lo * BLOCK_N
    col_hi = tl.minimum(cb_hi * BLOCK_N, N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    col_max_row = COL_MAX + pid_g.to(tl.int64) * N
    col_sum_row = COL_SUM + pid_g.to(tl.int64) * N
    row_max_row = ROW_MAX + pid_s.to(tl.int64) * M + row0
    row_sum_row = ROW_SUM + pid_s.to(tl.int64) * M + row0
    for rb in range(pid_g, tl.cdiv(c, BLOCK_M), n_groups):
        rows = rb * BLOCK_M + offs_m
        row_ok = rows < c
        rows64 = rows.to(tl.int64)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        d_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        labels = rows + label0
        lab_lo = rb * BLOCK_M + label0
        for cb in range(cb_lo, cb_hi):
            cols = cb * BLOCK_N + offs_n
            col_ok = cols < N
            cols64 = cols.to(tl.int64)
            r = tl.load(
                R + rows64[:, None] * N + cols64[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            t = r * scale2
            t_r = tl.where(col_ok[None, :], t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t_r, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t_r - m_new[:, None]), axis=1)
            m_i = m_new
            if (cb * BLOCK_N < lab_lo + BLOCK_M) & (cb * BLOCK_N + BLOCK_N > lab_lo):
                d_i += tl.sum(tl.where(cols[None, :] == labels[:, None], t, 0.0), axis=1)
            if COMPUTE_COL:
                t_c = tl.where(row_ok[:, None], t, float("-inf"))
                c_max = tl.max(t_c, axis=0)
                c_sum = tl.sum(tl.exp2(t_c - c_max[None, :]), axis=0)
                # a group's first row block of a problem writes instead of merging (as a bound:
                # `col_ok & ~fresh` is a block-and-scalar mask triton 3.9's interpreter rejects)
                fresh = (rb == pid_g) & (col_init != 0)
                merge_ok = cols < N * (1 - fresh.to(tl.int32))
                old_max = tl.load(col_max_row + cols64, mask=merge_ok, other=float("-inf"))
                old_sum = tl.load(col_sum_row + cols64, mask=merge_ok, other=0.0)
                new_max = tl.maximum(old_max, c_max)
                new_sum = old_sum * tl.exp2(old_max - new_max) + c_sum * tl.exp2(c_max - new_max)
                tl.store(col_max_row + cols64, new_max, mask=col_ok)
                tl.store(col_sum_row + cols64, new_sum, mask=col_ok)
        # an empty split stores max = -inf, sum = 0: neutral when the partials are merged
        tl.store(row_max_row + rows64, m_i, mask=row_ok)
        tl.store(row_sum_row + rows64, l_i, mask=row_ok)
        tl.store(DIAG + row0 + rows64, d_i, mask=row_ok & (labels >= col_lo) & (labels < col_hi))


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
    ROW_MAX,
    ROW_SUM,  # [splits, M] row partials
    COL_MAX,
    COL_SUM,  # [groups, N] column partials (COMPUTE_COL)
    DIAG,  # [M] base-2 label logits
    STATS_R,
    STATS_C,  # out: [3, M], [3, N]: max, 1 / sum, label logit
    LOSS_PART,  # out: [n_programs] loss_coef * sum of the per-row losses
    M,
    n_row_parts,
    n_col_parts,
    loss_coef,
    COMPUTE_COL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The blocked forward's epilogue in one launch: merge the partials, write the statistics
    the backward reads and the per-program loss sums."""
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
        tl.store(STATS_C + 2 * M + offs, diag, mask=ok)
        loss += tl.where(ok, (c_max - diag) + tl.log2(c_sum), 0.0)
    tl.store(LOSS_PART + tl.program_id(0), tl.sum(loss, axis=0) * loss_coef)


@triton.jit
def _info_nce_block_bwd_kernel(
    R,  # [r, w] fp32: logits <x_i, y_j> of the block
    G,  # out [r, w]: G * G_SCALE in the feature dtype (may alias R)
    SCALE,
    GRAD,  # GRAD: this problem's upstream gradient
    STATS_R,
    STATS_C,  # this problem's [3, M], [3, N]
    DSCALE_PART,  # out [n_programs]: grad * norm * sum G_ij R_ij of this tile
    r,
    w,
    M,
    N,
    row0,
    col0,
    label_offset,
    norm,
    HAS_C: tl.constexpr,
    COMPUTE_DSCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    G_SCALE: tl.constexpr,
):
    """One tile of ``G`` from a block of logits computed by a GEMM (see "blocked")."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < r
    col_ok = cols < w
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * w + cols.to(tl.int64)[None, :]
    logit = tl.load(R + offs, mask=ok, other=0.0)
    t = tl.where(ok, logit * scale2, float("-inf"))
    g_rows = (row0 + rows).to(tl.int64)
    g_cols = (col0 + cols).to(tl.int64)
    is_label = (g_cols[None, :] == (g_rows + label_offset)[:, None]) & ok
    max_r = tl.load(STATS_R + g_rows, mask=row_ok, other=0.0)
    inv_r = tl.load(STATS_R + M + g_rows, mask=row_ok, other=0.0)
    lab_r = tl.load(STATS_R + 2 * M + g_rows, mask=row_ok, other=0.0)
    g = _softmax_term(t, lab_r, is_label, max_r, inv_r, 0)
    if HAS_C:
        max_c = tl.load(STATS_C + g_cols, mask=col_ok, other=0.0)
        inv_c = tl.load(STATS_C + N + g_cols, mask=col_ok, other=0.0)
        lab_c = tl.load(STATS_C + 2 * N + g_cols, mask=col_ok, other=0.0)
        g += _softmax_term(t, lab_c, is_label, max_c, inv_c, 1)
        g -= tl.where(is_label, 2.0, 0.0)
    else:
        g -= tl.where(is_label, 1.0, 0.0)
    if COMPUTE_DSCALE:
        part = tl.sum(tl.sum(g * logit, axis=1), axis=0) * norm * tl.load(GRAD)
        tl.store(DSCALE_PART + pid_m * tl.num_programs(1) + pid_n, part)
    tl.store(G + offs, (g * G_SCALE).to(G.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """Widen 16-bit ``tl.dot`` operands under the interpreter (see ``_mm``)."""
    return interpreter_active() and dtype in (torch.bfloat16, torch.float16)


def _norm(m: int, symmetric: bool) -> float:
    return 1.0 / (2 * m) if symmetric else 1.0 / m


def _g_scale(dtype: torch.dtype) -> float:
    return _FP16_G_SCALE if dtype == torch.float16 else 1.0


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
    """Around a blocked pass's GEMMs, set once and restored after: autocast off (a backward
    called inside an autocast region must not turn them into 16-bit GEMMs) and, on CUDA, fp32
    GEMMs in IEEE fp32 unless ``allow_tf32``. (``meta`` planning runs have no autocast.)"""
    no_autocast = (
        contextlib.nullcontext()
        if device.type == "meta"
        else torch.autocast(device_type=device.type, enabled=False)
    )
    with no_autocast:
        undo = _cublas_tf32(allow_tf32) if device.type == "cuda" else None
        try:
            yield
        finally:
            if undo is not None:
                undo()


def _native_f32_out(a: Tensor) -> bool:
    """cuBLAS has fp32-output GEMMs for 16-bit operands (``out_dtype``); elsewhere (CPU, where the
    interpreter runs the kernels) the operands are widened to fp32 instead: products of 16-bit
    values are exact in fp32, so both compute the same function. ``meta`` tensors take the CUDA
    branch, so a planning run on them issues exactly the GEMMs a GPU would."""
    return a.dtype != torch.float32 and a.device.type in ("cuda", "meta")


def _mm_f32(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a @ b`` in fp32 (accumulation and result), whatever the common operand dtype."""
    if _native_f32_out(a):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a.float(), b.float(), out=out)


def _addmm_f32(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """``acc = a @ b`` (``first``: ``acc`` is not read, so its garbage never propagates) or
    ``acc += a @ b``, in fp32."""
    beta = 0.0 if first else 1.0
    if _native_f32_out(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=beta, out=acc)
    else:
        torch.addmm(acc, a.float(), b.float(), beta=beta, out=acc)


def _fused_forward(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    symmetric: bool,
    label_offset: int,
    allow_tf32: bool,
    plan: InfoNCEPlan,
) -> tuple[Tensor, Tensor, Tensor]:
    n_prob, m, d = x.shape
    n = y.shape[1]
    t = dict(plan.tiles)
    bm, bn, bk = t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"]
    n_dirs = 2 if symmetric else 1
    n_rb = triton.cdiv(m, bm)
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    stats_r = torch.empty((n_prob, 3, m), **f32)
    stats_c = torch.empty((n_prob, 3, n if symmetric else 0), **f32)
    parts = torch.empty((n_prob, n_dirs * n_rb), **f32)
    _info_nce_fwd_kernel[(n_rb, n_dirs, n_prob)](
        x,
        y,
        scale,
        stats_r,
        stats_c if symmetric else stats_r,
        parts,
        m,
        n,
        d,
        label_offset,
        LN2 * _norm(m, symmetric),
        SINGLE_K=bk >= d,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        PRECISION=_precision(x.dtype, allow_tf32),
        UPCAST=_upcast(x.dtype),
        num_warps=t["num_warps"],
        num_stages=t["num_stages"],
    )
    return parts.sum(1), stats_r, stats_c


def _fused_backward(
    grad,
    x,
    y,
    scale,
    stats_r,
    stats_c,
    symmetric,
    label_offset,
    allow_tf32,
    need_dx,
    need_dy,
    need_dscale,
    plan,
):
    n_prob, m, d = x.shape
    n = y.shape[1]
    t = dict(plan.tiles)
    bm, bn, bk, bdo = t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"], t["BLOCK_DO"]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    # dL/ds comes from direction 0, which then also writes dX (dropped if nobody asked)
    run_dx = need_dx or need_dscale
    first_dir = 0 if run_dx else 1
    n_dirs = int(run_dx) + int(need_dy)
    dx = torch.empty((n_prob, m, d), dtype=x.dtype, device=dev) if run_dx else x.new_empty((0,))
    dy = torch.empty((n_prob, n, d), dtype=y.dtype, device=dev) if need_dy else y.new_empty((0,))
    n_rb = triton.cdiv(max(m, n) if need_dy else m, bm)
    dscale = torch.empty((n_prob, triton.cdiv(m, bm)), **f32) if need_dscale else grad
    _info_nce_bwd_kernel[(n_rb, triton.cdiv(d, bdo), n_prob * n_dirs)](
        x,
        y,
        scale,
        grad,
        stats_r,
        stats_c if symmetric else stats_r,
        dx,
        dy,
        dscale,
        m,
        n,
        d,
        label_offset,
        _norm(m, symmetric),
        2.0 if symmetric else 1.0,
        first_dir,
        n_dirs,
        SYMMETRIC=symmetric,
        COMPUTE_DSCALE=need_dscale,
        SINGLE_K=bk >= d and bdo >= d and not interpreter_active(),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_DO=bdo,
        G_SCALE=_g_scale(x.dtype),
        PRECISION=_precision(x.dtype, allow_tf32),
        UPCAST=_upcast(x.dtype),
        num_warps=t["num_warps"],
        num_stages=t["num_stages"],
    )
    return (dx if need_dx else None, dy if need_dy else None, dscale.sum() if need_dscale else None)


def _fwd_grid(rows: int, n: int, bm: int, bn: int, device: torch.device) -> tuple[int, int]:
    """``(groups, splits)`` of the blocked forward's epilogue: few row groups (each merges its
    column partials into a ``[groups, N]`` slice once per row block it owns, so fewer groups
    mean less partial traffic) and column splits to fill the device."""
    if not sized_for_gpu(device):
        return 1, 1
    groups = min(8, triton.cdiv(rows, bm))
    return groups, split_count(groups, triton.cdiv(n, bn), 2 * num_sms(device))


def _blocked_forward(x, y, scale, symmetric, label_offset, allow_tf32, plan):
    n_prob, m, _ = x.shape
    n = y.shape[1]
    t = dict(plan.tiles)
    bm, bn = t["BLOCK_M"], t["BLOCK_N"]
    rows = plan.fwd_rows
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    groups, splits = _fwd_grid(rows, n, bm, bn, dev)
    fin_block = block_for(m, cap=1024)
    n_fin = triton.cdiv(m, fin_block)
    logits = torch.empty((rows * n,), **f32)
    row_max = torch.empty((splits, m), **f32)
    row_sum = torch.empty((splits, m), **f32)
    col_shape = (groups, n) if symmetric else (1, 1)
    col_max = torch.empty(col_shape, **f32)  # initialised by a problem's first chunk
    col_sum = torch.empty(col_shape, **f32)
    diag = torch.empty((m,), **f32)
    stats_r = torch.empty((n_prob, 3, m), **f32)
    stats_c = torch.empty((n_prob, 3, n if symmetric else 0), **f32)
    parts = torch.empty((n_prob, n_fin), **f32)
    with _gemm_precision(dev, allow_tf32):
        for p in range(n_prob):
            y_t = y[p].t()
            for r0 in range(0, m, rows):
                c = min(rows, m - r0)
                chunk = logits[: c * n].view(c, n)
                _mm_f32(x[p, r0 : r0 + c], y_t, chunk)
                _info_nce_block_fwd_kernel[(min(groups, triton.cdiv(c, bm)), splits)](
                    chunk,
                    scale,
                    row_max,
                    row_sum,
                    col_max,
                    col_sum,
                    diag,
                    c,
                    n,
                    m,
                    r0,
                    r0 + label_offset,
                    int(r0 == 0),
                    COMPUTE_COL=symmetric,
                    BLOCK_M=bm,
                    BLOCK_N=bn,
                    num_warps=t["num_warps"],
                )
            _info_nce_finalize_kernel[(n_fin,)](
                row_max,
                row_sum,
                col_max,
                col_sum,
                diag,
                stats_r[p],
                stats_c[p] if symmetric else stats_r[p],
                parts[p],
                m,
                splits,
                groups,
                LN2 * _norm(m, symmetric),
                COMPUTE_COL=symmetric,
                BLOCK=fin_block,
                num_warps=num_warps_for(fin_block),
            )
    return parts.sum(1), stats_r, stats_c


def _blocked_backward(
    grad,
    x,
    y,
    scale,
    stats_r,
    stats_c,
    symmetric,
    label_offset,
    allow_tf32,
    need_dx,
    need_dy,
    need_dscale,
    plan,
):
    n_prob, m, d = x.shape
    n = y.shape[1]
    t = dict(plan.tiles)
    bm, bn = t["BLOCK_M"], t["BLOCK_N"]
    dev, dtype = x.device, x.dtype
    f32 = dict(dtype=torch.float32, device=dev)
    row_blocks = [(i0, min(plan.bwd_rows, m - i0)) for i0 in range(0, m, plan.bwd_rows)]
    col_blocks = [(j0, min(plan.bwd_cols, n - j0)) for j0 in range(0, n, plan.bwd_cols)]
    # one dL/ds partial per program of every block, packed: all written, no zero fill
    tiles = sum(triton.cdiv(r, bm) for _, r in row_blocks) * sum(
        triton.cdiv(w, bn) for _, w in col_blocks
    )
    logits = torch.empty((plan.bwd_rows * plan.bwd_cols,), **f32)
    fp32 = dtype == torch.float32
    g_buf = logits if fp32 else torch.empty(logits.shape, dtype=dtype, device=dev)
    dx = torch.empty((n_prob, m, d), dtype=dtype, device=dev) if need_dx else None
    dy = torch.empty((n_prob, n, d), dtype=dtype, device=dev) if need_dy else None
    # fp32 features accumulate straight into their gradients; 16-bit ones into fp32 buffers
    dx_acc = torch.empty((plan.bwd_rows, d), **f32) if need_dx and not fp32 else None
    dy_acc = torch.empty((n, d), **f32) if need_dy and not fp32 else None
    dscale = torch.empty((n_prob * tiles,), **f32) if need_dscale else grad
    # dX = g s norm G Y with G stored times g_scale: one [P] coefficient, on the device
    coef = grad * (scale.float() * (_norm(m, symmetric) / _g_scale(dtype)))
    part = 0
    with _gemm_precision(dev, allow_tf32):
        for p in range(n_prob):
            for i0, r in row_blocks:
                x_i = x[p, i0 : i0 + r]
                acc_x = (
                    dx[p, i0 : i0 + r] if fp32 and need_dx else (dx_acc[:r] if need_dx else None)
                )
                for j0, w in col_blocks:
                    y_j = y[p, j0 : j0 + w]
                    block = logits[: r * w].view(r, w)
                    g = g_buf[: r * w].view(r, w)
                    _mm_f32(x_i, y_j.t(), block)
                    grid = (triton.cdiv(r, bm), triton.cdiv(w, bn))
                    _info_nce_block_bwd_kernel[grid](
                        block,
                        g,
                        scale,
                        grad[p:],
                        stats_r[p],
                        stats_c[p] if symmetric else stats_r[p],
                        dscale[part:],
                        r,
                        w,
                        m,
                        n,
                        i0,
                        j0,
                        label_offset,
                        _norm(m, symmetric),
                        HAS_C=symmetric,
                        COMPUTE_DSCALE=need_dscale,
                        BLOCK_M=bm,
                        BLOCK_N=bn,
                        G_SCALE=_g_scale(dtype),
                        num_warps=t["num_warps"],
                    )
                    part += grid[0] * grid[1] if need_dscale else 0
                    if need_dx:
                        _addmm_f32(acc_x, g, y_j, first=j0 == 0)
                    if need_dy:
                        acc_y = dy[p, j0 : j0 + w] if fp32 else dy_acc[j0 : j0 + w]
                        _addmm_f32(acc_y, g.t(), x_i, first=i0 == 0)
                if need_dx:  # the row block's dX is complete: scale (and round) it once
                    torch.mul(acc_x, coef[p], out=dx[p, i0 : i0 + r])
            if need_dy:
                torch.mul(dy[p] if fp32 else dy_acc, coef[p], out=dy[p])
    return dx, dy, dscale.sum() if need_dscale else None


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def _forward(x, y, scale, *, symmetric, label_offset, allow_tf32, plan):
    run = _fused_forward if plan.path == "fused" else _blocked_forward
    return run(x, y, scale, symmetric, label_offset, allow_tf32, plan)


def _backward(
    grad,
    x,
    y,
    scale,
    stats_r,
    stats_c,
    *,
    symmetric,
    label_offset,
    allow_tf32,
    need_dx,
    need_dy,
    need_dscale,
    plan,
):
    run = _fused_backward if plan.path == "fused" else _blocked_backward
    return run(
        grad,
        x,
        y,
        scale,
        stats_r,
        stats_c,
        symmetric,
        label_offset,
        allow_tf32,
        need_dx,
        need_dy,
        need_dscale,
        plan,
    )


def _plan(x: Tensor, y: Tensor, allow_tf32: bool, max_scratch_bytes: int) -> InfoNCEPlan:
    _, m, d = x.shape
    return launch.info_nce_plan(
        x.dtype, m, y.shape[1], d, x.device, allow_tf32=allow_tf32, budget=max_scratch_bytes
    )


def nce_forward(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    *,
    symmetric: bool = True,
    label_offset: int = 0,
    allow_tf32: bool = False,
    max_scratch_bytes: int = INFO_NCE_SCRATCH_BYTES,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of ``P`` InfoNCE problems on the path :func:`launch.info_nce_plan` picks.

    Args:
        x: ``[P, M, D]``, y: ``[P, N, D]``: contiguous, same dtype (fp32/bf16/fp16) and device;
            ``M == N`` if ``symmetric``, else ``0 <= label_offset <= N - M``.
        scale: 0-d tensor on the device, the exponentiated logit scale.
    Returns:
        ``(loss [P] fp32, stats_r [P, 3, M], stats_c [P, 3, N] ([P, 3, 0] if rectangular))``:
        statistics in base 2: max of ``t = s log2(e) <x_i, y_j>``, ``1 / sum exp2(t - max)``
        and the label logit, per row (``stats_r``) and per column (``stats_c``).
    """
    return _forward(
        x,
        y,
        scale,
        symmetric=symmetric,
        label_offset=label_offset,
        allow_tf32=allow_tf32,
        plan=_plan(x, y, allow_tf32, max_scratch_bytes),
    )


def nce_backward(
    grad: Tensor,
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    stats_r: Tensor,
    stats_c: Tensor,
    *,
    symmetric: bool = True,
    label_offset: int = 0,
    allow_tf32: bool = False,
    need_dx: bool = True,
    need_dy: bool = True,
    need_dscale: bool = True,
    max_scratch_bytes: int = INFO_NCE_SCRATCH_BYTES,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``sum_p grad[p] * loss[p]`` (``grad``: ``[P]`` fp32) for :func:`nce_forward`'s
    problems: ``(dx [P, M, D], dy [P, N, D])`` in the feature dtype and ``dscale`` 0-d fp32;
    None where not needed."""
    # autograd may hand over an expanded gradient; the kernels read a dense fp32 [P] vector
    grad = grad.to(torch.float32).contiguous()
    return _backward(
        grad,
        x,
        y,
        scale,
        stats_r,
        stats_c,
        symmetric=symmetric,
        label_offset=label_offset,
        allow_tf32=allow_tf32,
        need_dx=need_dx,
        need_dy=need_dy,
        need_dscale=need_dscale,
        plan=_plan(x, y, allow_tf32, max_scratch_bytes),
    )


# ------------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile-friendly) and the autograd glue
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("cdds_fast::info_nce_fwd", mutates_args=())
def _info_nce_fwd_op(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    label_offset: int,
    symmetric: bool,
    allow_tf32: bool,
    max_scratch_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return nce_forward(
        x,
        y,
        scale,
        symmetric=symmetric,
        label_offset=label_offset,
        allow_tf32=allow_tf32,
        max_scratch_bytes=max_scratch_bytes,
    )


@_info_nce_fwd_op.register_fake
def _(x, y, scale, label_offset, symmetric, allow_tf32, max_scratch_bytes):
    n_prob, m, _ = x.shape
    return (
        x.new_empty((n_prob,), dtype=torch.float32),
        x.new_empty((n_prob, 3, m), dtype=torch.float32),
        x.new_empty((n_prob, 3, y.shape[1] if symmetric else 0), dtype=torch.float32),
    )


@torch.library.custom_op("cdds_fast::info_nce_bwd", mutates_args=())
def _info_nce_bwd_op(
    grad: Tensor,
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    stats_r: Tensor,
    stats_c: Tensor,
    label_offset: int,
    symmetric: bool,
    allow_tf32: bool,
    max_scratch_bytes: int,
    need_dx: bool,
    need_dy: bool,
    need_dscale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dy, ds = nce_backward(
        grad,
        x,
        y,
        scale,
        stats_r,
        stats_c,
        symmetric=symmetric,
        label_offset=label_offset,
        allow_tf32=allow_tf32,
        need_dx=need_dx,
        need_dy=need_dy,
        need_dscale=need_dscale,
        max_scratch_bytes=max_scratch_bytes,
    )
    # custom ops return tensors only: empty placeholders for gradients nobody asked for
    return (
        dx if dx is not None else x.new_empty((0,)),
        dy if dy is not None else y.new_empty((0,)),
        ds.to(scale.dtype) if ds is not None else scale.new_empty((0,)),
    )


@_info_nce_bwd_op.register_fake
def _(
    grad,
    x,
    y,
    scale,
    stats_r,
    stats_c,
    label_offset,
    symmetric,
    allow_tf32,
    max_scratch_bytes,
    need_dx,
    need_dy,
    need_dscale,
):
    return (
        x.new_empty(x.shape if need_dx else (0,)),
        y.new_empty(y.shape if need_dy else (0,)),
        scale.new_empty(() if need_dscale else (0,)),
    )


def _setup_context(ctx, inputs, output):
    x, y, scale, label_offset, symmetric, allow_tf32, max_scratch_bytes = inputs
    _, stats_r, stats_c = output
    ctx.save_for_backward(x, y, scale, stats_r, stats_c)
    ctx.settings = (label_offset, symmetric, allow_tf32, max_scratch_bytes)
    ctx.mark_non_differentiable(stats_r, stats_c)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics


def _autograd_backward(ctx, grad_loss, _grad_stats_r, _grad_stats_c):
    if grad_loss is None:
        return (None,) * 7
    x, y, scale, stats_r, stats_c = ctx.saved_tensors
    need_dx, need_dy, need_ds = ctx.needs_input_grad[:3]
    dx, dy, ds = _info_nce_bwd_op(
        grad_loss, x, y, scale, stats_r, stats_c, *ctx.settings, need_dx, need_dy, need_ds
    )
    return (
        dx if need_dx else None,
        dy if need_dy else None,
        ds if need_ds else None,
        None,
        None,
        None,
        None,
    )


_info_nce_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _prepare(x: Tensor, y: Tensor, logit_scale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous features (once) and the scale as a 0-d tensor on the features' device (a number
    by a fill on the device: a host-to-device copy would wait for the device on every call)."""
    if isinstance(logit_scale, Tensor):
        scale = logit_scale if logit_scale.device == x.device else logit_scale.to(x.device)
    else:
        scale = torch.full((), float(logit_scale), dtype=torch.float32, device=x.device)
    return x.contiguous(), y.contiguous(), scale


def info_nce_triton(
    x: Tensor,
    y: Tensor,
    logit_scale: Tensor | float,
    *,
    label_offset: int = 0,
    symmetric: bool = True,
    allow_tf32: bool = False,
    max_scratch_bytes: int = INFO_NCE_SCRATCH_BYTES,
) -> Tensor:
    """Symmetric ``(CE(s X Y^T) + CE(s Y X^T)) / 2`` (``symmetric=True``) or the row
    cross-entropy ``CE(s X Y^T, arange(M) + label_offset)`` (``symmetric=False``).

    Args:
        x: ``[M, D]``, y: ``[N, D]`` float32/bfloat16/float16, same dtype and device.
        logit_scale: the exponentiated scale, 0-d tensor (gets a gradient) or a number.
        label_offset: column of row 0's positive (rectangular case only).
        allow_tf32: fp32 inputs may use TF32 tensor cores (off by default: IEEE fp32 products).
        max_scratch_bytes: bound on the blocked path's logit blocks (see the module docstring).
    Returns:
        0-d float32 loss. Gradients flow to ``x``, ``y`` and a tensor ``logit_scale``.

    Checks nothing: its callers, the public entries of :mod:`cdds_fast.contrastive`, have checked
    every argument once (shapes, dtypes, devices, the scale, the scratch budget; ``label_offset``
    is ``B * rank`` for a checked ``rank``).
    """
    x, y, scale = _prepare(x, y, logit_scale)
    loss = _info_nce_fwd_op(
        x[None],
        y[None],
        scale,
        int(label_offset),
        bool(symmetric),
        bool(allow_tf32),
        int(max_scratch_bytes),
    )[0]
    return loss[0]


# ------------------------------------------------------------------------------------------------
# Cost model (the docstring's table; benchmarks/bench_contrastive.py reports against it)
# ------------------------------------------------------------------------------------------------

#: What the model assumes of an H200: dense peak FLOP/s per operand precision, a copy bandwidth
#: (86 % of the 4.8 TB/s HBM peak) and a launch overhead.
H200_FLOPS = {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}
H200_BYTES_PER_S = 4.11e12
LAUNCH_S = 4e-6


def launch_counts(
    plan: InfoNCEPlan,
    n_prob: int,
    m: int,
    n: int,
    *,
    need_dx: bool = True,
    need_dy: bool = True,
    need_dscale: bool = True,
) -> tuple[int, int]:
    """Device launches (Triton + aten) of one forward and one backward call (module docstring)."""
    if plan.path == "fused":
        return 2, 1 + int(need_dscale)
    f = math.ceil(m / plan.fwd_rows)
    b_i, b_j = math.ceil(m / plan.bwd_rows), math.ceil(n / plan.bwd_cols)
    fwd = n_prob * (2 * f + 1) + 1
    per_problem = b_i * b_j * (2 + int(need_dx) + int(need_dy)) + int(need_dx) * b_i + int(need_dy)
    return fwd, n_prob * per_problem + 2 + int(need_dscale)


def scratch_bytes(plan: InfoNCEPlan, m: int, n: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes of the blocked path's logit scratch, forward and backward (0 for the fused path)."""
    if plan.path == "fused":
        return 0, 0
    e = torch.finfo(dtype).bits // 8
    per = 4 if dtype == torch.float32 else 4 + e
    return 4 * plan.fwd_rows * n, per * plan.bwd_rows * plan.bwd_cols


def cost_model(
    b: int,
    d: int,
    dtype: torch.dtype,
    *,
    allow_tf32: bool = False,
    budget: int = INFO_NCE_SCRATCH_BYTES,
) -> dict:
    """The module docstring's model of one symmetric forward + backward at ``B = M = N`` on an
    H200 (the path and blocks planned for the reference GPU): FLOPs, HBM bytes, ms, launches,
    scratch."""
    plan = launch.info_nce_plan(
        dtype, b, b, d, torch.device("meta"), allow_tf32=allow_tf32, budget=budget
    )
    e = torch.finfo(dtype).bits // 8
    prec = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, "tf32" if allow_tf32 else "fp32"
    )
    peak = H200_FLOPS[prec]
    gemm = 2.0 * b * b * d
    launches = launch_counts(plan, 1, b, b)

    def kernel_s(flop: float, nbytes: float) -> float:
        return max(flop / peak, nbytes / H200_BYTES_PER_S)

    if plan.path == "fused":
        flop = 6 * gemm
        nbytes = 4.0 * b * d * e * math.ceil(b / 64)  # operand re-reads, mostly from L2
        seconds = kernel_s(flop, nbytes)
    else:
        f = math.ceil(b / plan.fwd_rows)
        r, w = plan.bwd_rows, plan.bwd_cols
        n_blocks = math.ceil(b / r) * math.ceil(b / w)
        g_e = 4 if dtype == torch.float32 else e
        fwd_gemm_bytes = 4.0 * b * b + f * b * d * e + b * d * e
        fwd_epi_bytes = 4.0 * b * b
        bwd_gemm_bytes = 4.0 * b * b + n_blocks * (r + w) * d * e
        g_bytes = (4.0 + g_e) * b * b
        acc_bytes = 8.0 * d * (math.ceil(b / w) * b + math.ceil(b / r) * b)
        dx_bytes = g_e * b * b + n_blocks * w * d * e + acc_bytes / 2
        dy_bytes = g_e * b * b + n_blocks * r * d * e + acc_bytes / 2
        flop = 4 * gemm
        nbytes = fwd_gemm_bytes + fwd_epi_bytes + bwd_gemm_bytes + g_bytes + dx_bytes + dy_bytes
        seconds = (
            kernel_s(gemm, fwd_gemm_bytes)
            + kernel_s(0, fwd_epi_bytes)
            + kernel_s(gemm, bwd_gemm_bytes)
            + kernel_s(0, g_bytes)
            + kernel_s(gemm, dx_bytes)
            + kernel_s(gemm, dy_bytes)
        )
    seconds += LAUNCH_S * sum(launches)
    fwd_scratch, bwd_scratch = scratch_bytes(plan, b, b, d, dtype)
    return dict(
        plan=plan,
        flop=flop,
        bytes=nbytes,
        ms=seconds * 1e3,
        launches=launches,
        scratch_mib=(fwd_scratch / 2**20, bwd_scratch / 2**20),
    )


def cost_table(d: int = 512) -> str:
    """The module docstring's table: :func:`cost_model` at B = 4096 / 16384 / 65536."""
    rule = "=====  =====  =======  ======  ======  ========  =========  ==========="
    lines = [rule, "B      dtype  path     TFLOP   GB      model ms  launches   scratch MiB", rule]
    for name, dtype, tf32 in (
        ("bf16", torch.bfloat16, False),
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
    ):
        for b in (4096, 16384, 65536):
            c = cost_model(b, d, dtype, allow_tf32=tf32)
            fwd_l, bwd_l = c["launches"]
            fwd_s, bwd_s = c["scratch_mib"]
            lines.append(
                f"{b:<5}  {name:<5}  {c['plan'].path:<7}  {c['flop'] / 1e12:<6.3g}  "
                f"{c['bytes'] / 1e9:<6.3g}  {c['ms']:<8.3g}  "
                f"{f'{fwd_l} + {bwd_l}':<9}  {fwd_s:.0f} / {bwd_s:.0f}"
            )
    return "\n".join([*lines, rule])


__all__ = [
    "cost_model",
    "cost_table",
    "info_nce_triton",
    "launch_counts",
    "nce_backward",
    "nce_forward",
    "scratch_bytes",
]
