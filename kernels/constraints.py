"""Fused decoupling-constraint losses of one modality (spec section 6): ``L_f``, ``L_x``, ``L_m``.

Inputs (one modality): tokens ``X``, semantic ``X^s``, modality ``X^m`` ``[B, N, D]`` (each in its
own dtype: fp32/bf16/fp16), ``w_s, w_m [D]``, the column statistics ``mu, s [B, D]`` of ``X^s`` and
the sampling coefficients ``c, a [B, D]`` (fp32), mask ``[B, N]`` bool or None. With
``Ntok = sum m`` (valid tokens of the local batch):

- ``r_f = w_s X^s + w_m X^m - X`` and ``L_f = sum_valid r_f^2 / (D Ntok)``;
- ``X^x = c + a (X^s - mu) / s`` is formed on the fly (never written),
  ``r_x = w_s X^x + w_m X^m - X``, ``L_x = sum_valid r_x^2 / (D Ntok)``;
- ``q_n = softmax(X^m_n)``, ``qbar = sum_valid q_n / Ntok``; ``mean_n KL(q_n || qbar)`` equals
  ``sum_valid sum_d q log q / Ntok - sum_d qbar log qbar`` (qbar is the mean of the q_n), so ONE
  pass over ``X^m`` gives the negentropy sum and per-pair ``qbar`` partial sums. ``L_m`` is fused
  into the same pass as ``L_f``/``L_x``: that pass reads ``X^m`` anyway.

Forward: ``_constraints_fwd_kernel``, program = (pair ``b``, chunk of tokens), owns whole token
rows (a row's softmax needs all of ``D``): ``D <= ROW_BLOCK_CAP`` (4096) is one block
(``[BLOCK_N, next_pow2(D)]`` tiles, the row's log-sum-exp computed in-tile); wider rows are
looped in ``D`` chunks after ``_row_lse_kernel`` computed the per-token log-sum-exp (one extra
read of ``X^m``). Besides the loss sums and the valid-token count it accumulates, per
``(b, column)``, everything the backward's small gradients need, so the backward never reduces
over tokens: ``sum m r_x``, ``sum m r_x zeta`` (-> grads of ``c, a, mu, s``), ``sum m r_f X^s``,
``sum m r_f X^m``, ``sum m r_x X^x``, ``sum m r_x X^m`` (-> grads of ``w_s, w_m``) and
``sum m q`` (-> ``qbar``), as ``[7, B, chunks, D]`` partials (no atomics; ``chunks`` is 1-2 at
realistic batch sizes). ``_constraints_finalize_kernel`` (one program) reduces them to the three
losses, ``log qbar`` and ``Ntok``. The per-token ``lse`` is saved for the backward.

Backward: ``_constraints_bwd_kernel``, program = (pair ``b``, token tile), one elementwise pass
that recomputes ``q = exp(X^m - lse)``; a first loop over the row forms the softmax backward's
``KL_n = sum_d q (log q - log qbar)``, the second writes ``grad X``, ``grad X^s``, ``grad X^m`` in
each input's dtype (zeros at masked tokens). The programs of token tile 0 also turn the forward's
per-(b, column) sums into the gradients of ``c, a, mu, s`` and per-pair partial gradients of
``w_s, w_m`` (the autograd wrapper sums them over pairs: one small torch op).

Roofline per modality, ``E = B*N*D`` elements, ``e`` bytes per element (2 for bf16):
- forward: reads ``3*E*e`` bytes from HBM (masked tokens are not read), writes
  ``28*B*chunks*D + 4*B*N``; about ``30*E`` FLOPs and ``E`` exps.
- backward: reads ``3*E*e`` (``X^m`` twice, the second time from L1/L2), writes ``3*E*e``;
  about ``35*E`` FLOPs and ``2*E`` exps.
At ``(B, P, L, D) = (256, 50, 77, 512)`` bf16, both modalities (``E = 16.6 M``): forward 100 MB
(~33 us at 3 TB/s), backward 200 MB (~67 us); arithmetic intensity ~5-10 FLOP/B: bandwidth bound.
Peak extra memory: the gradients themselves (``3*E*e``) plus ``~28*B*chunks*D`` bytes of partials
(7 MB at the shape above).

Registered as ``cdds_fast::constraint_losses`` (+ ``cdds_fast::constraint_losses_backward``) with
``torch.library.custom_op``, so ``torch.compile`` sees one opaque differentiable node.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from cdds_fast.kernels.launch import (
    HEAVY_TILE_ELEMS_GPU,
    ROW_BLOCK_CAP,
    interpreter_active,
    scratch,
    scratch_like,
    split_tokens,
    tile_elems,
    tile_warps,
    token_tile,
)
from cdds_fast.kernels.tokens import valid_tokens

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Index of each per-(b, column) forward sum in the ``colsum`` output.
_R_X, _R_X_ZETA, _RF_XS, _RF_XM, _RX_XX, _RX_XM, _Q = range(7)
_N_COLSUMS = 7


@triton.jit
def _column_params(WS, WM, MU, S, C, A, pid_b, cols, col_ok, D):
    """The fp32 per-column vectors of one ``BLOCK_D`` block: weights ``w_s, w_m`` (shared) and the
    pair's ``mu, s, c, a`` (padded columns: neutral values, ``s = 1``)."""
    stat = pid_b * D + cols
    ws = tl.load(WS + cols, mask=col_ok, other=0.0).to(tl.float32)
    wm = tl.load(WM + cols, mask=col_ok, other=0.0).to(tl.float32)
    mu = tl.load(MU + stat, mask=col_ok, other=0.0)
    s = tl.load(S + stat, mask=col_ok, other=1.0)
    c = tl.load(C + stat, mask=col_ok, other=0.0)
    a = tl.load(A + stat, mask=col_ok, other=0.0)
    return ws, wm, mu, s, c, a


@triton.jit
def _residuals(x, xs, xm, ws, wm, mu, s, c, a):
    """On a ``[tokens, columns]`` tile (column vectors as loaded by ``_column_params``): the
    standard score ``zeta``, ``X^x = c + a zeta`` and the residuals ``r_f = w_s X^s + w_m X^m - X``,
    ``r_x = w_s X^x + w_m X^m - X``; the forward and the backward share it, so both see the same
    values."""
    zeta = (xs - mu[None, :]) / s[None, :]
    x_x = c[None, :] + a[None, :] * zeta
    r_f = ws[None, :] * xs + wm[None, :] * xm - x
    r_x = ws[None, :] * x_x + wm[None, :] * xm - x
    return zeta, x_x, r_f, r_x


@triton.jit
def _row_lse_kernel(
    XM, M, LSE,
    N, D,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per-token log-sum-exp of ``X^m`` rows wider than one block (online max / sum)."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = valid_tokens(M, pid_b, rows, N, N, HAS_MASK)
    row_base = pid_b * N * D + rows[:, None].to(tl.int64) * D
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ld = valid[:, None] & (cols < D)[None, :]
        xm = tl.load(XM + row_base + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(xm, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(xm - safe_max[:, None]),
                                                                 axis=1)
        run_max = new_max
    lse = tl.where(valid, run_max + tl.log(tl.where(valid, run_sum, 1.0)), 0.0)
    tl.store(LSE + pid_b * N + rows, lse, mask=rows < N)


@triton.jit
def _constraints_fwd_kernel(
    X, XS, XM, M, WS, WM, MU, S, C, A, LSE, COLSUM, TOKSUM,
    B, N, D, TOKENS_PER_PROGRAM, N_CHUNKS,
    HAS_MASK: tl.constexpr,
    LSE_GIVEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_start = chunk * TOKENS_PER_PROGRAM
    n_end = tl.minimum(n_start + TOKENS_PER_PROGRAM, N)
    x_base = pid_b * N * D
    sum_rf2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_rx2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_qlogq = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_valid = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        valid = valid_tokens(M, pid_b, rows, n_end, N, HAS_MASK)
        n_valid += valid.to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        ws, wm, mu, s, c, a = _column_params(WS, WM, MU, S, C, A, pid_b, cols, col_ok, D)
        acc_rx = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_rx_zeta = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_rf_xs = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_rf_xm = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_rx_xx = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_rx_xm = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_q = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(n_start, n_end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < n_end
            valid = valid_tokens(M, pid_b, rows, n_end, N, HAS_MASK)
            ld = valid[:, None] & col_ok[None, :]
            offs = x_base + rows[:, None].to(tl.int64) * D + cols[None, :]
            x = tl.load(X + offs, mask=ld, other=0.0).to(tl.float32)
            xs = tl.load(XS + offs, mask=ld, other=0.0).to(tl.float32)
            xm = tl.load(XM + offs, mask=ld, other=0.0).to(tl.float32)
            if LSE_GIVEN:
                lse = tl.load(LSE + pid_b * N + rows, mask=row_ok, other=0.0)
            else:  # the whole row is in this block
                row_max = tl.max(tl.where(ld, xm, float("-inf")), axis=1)
                row_max = tl.where(valid, row_max, 0.0)
                e = tl.where(ld, tl.exp(xm - row_max[:, None]), 0.0)
                lse = row_max + tl.log(tl.where(valid, tl.sum(e, axis=1), 1.0))
                tl.store(LSE + pid_b * N + rows, lse, mask=row_ok)
            log_q = xm - lse[:, None]
            q = tl.where(ld, tl.exp(log_q), 0.0)
            zeta, x_x, r_f, r_x = _residuals(x, xs, xm, ws, wm, mu, s, c, a)
            r_f = tl.where(ld, r_f, 0.0)
            r_x = tl.where(ld, r_x, 0.0)
            sum_rf2 += tl.sum(r_f * r_f, axis=1)
            sum_rx2 += tl.sum(r_x * r_x, axis=1)
            sum_qlogq += tl.sum(tl.where(ld, q * log_q, 0.0), axis=1)
            acc_rx += tl.sum(r_x, axis=0)
            acc_rx_zeta += tl.sum(r_x * zeta, axis=0)
            acc_rf_xs += tl.sum(r_f * xs, axis=0)
            acc_rf_xm += tl.sum(r_f * xm, axis=0)
            acc_rx_xx += tl.sum(r_x * x_x, axis=0)
            acc_rx_xm += tl.sum(r_x * xm, axis=0)
            acc_q += tl.sum(q, axis=0)
        # COLSUM is [7, B, N_CHUNKS, D]
        plane = B * N_CHUNKS * D
        out = COLSUM + (pid_b * N_CHUNKS + chunk) * D + cols
        tl.store(out + 0 * plane, acc_rx, mask=col_ok)
        tl.store(out + 1 * plane, acc_rx_zeta, mask=col_ok)
        tl.store(out + 2 * plane, acc_rf_xs, mask=col_ok)
        tl.store(out + 3 * plane, acc_rf_xm, mask=col_ok)
        tl.store(out + 4 * plane, acc_rx_xx, mask=col_ok)
        tl.store(out + 5 * plane, acc_rx_xm, mask=col_ok)
        tl.store(out + 6 * plane, acc_q, mask=col_ok)
    # TOKSUM is [4, B, N_CHUNKS]: sum r_f^2, sum r_x^2, sum q log q, valid tokens
    tok = TOKSUM + pid_b * N_CHUNKS + chunk
    tl.store(tok, tl.sum(sum_rf2, axis=0))
    tl.store(tok + B * N_CHUNKS, tl.sum(sum_rx2, axis=0))
    tl.store(tok + 2 * B * N_CHUNKS, tl.sum(sum_qlogq, axis=0))
    tl.store(tok + 3 * B * N_CHUNKS, tl.sum(n_valid, axis=0))


@triton.jit
def _constraints_finalize_kernel(
    COLSUM_Q, TOKSUM, LOSSES, LOG_QBAR, NTOK,
    R, D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: the three losses, log(qbar) and the token count from the partial sums.

    ``COLSUM_Q`` is the ``sum m q`` plane ``[R = B * chunks, D]``; ``TOKSUM`` ``[4, R]``.
    """
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_R], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = r < R
        acc_f += tl.load(TOKSUM + r, mask=ok, other=0.0)
        acc_x += tl.load(TOKSUM + R + r, mask=ok, other=0.0)
        acc_q += tl.load(TOKSUM + 2 * R + r, mask=ok, other=0.0)
        acc += tl.load(TOKSUM + 3 * R + r, mask=ok, other=0.0)
    n_tok = tl.sum(acc, axis=0)
    qbar_logq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        q = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            ld = (r < R)[:, None] & col_ok[None, :]
            q += tl.sum(tl.load(COLSUM_Q + r[:, None].to(tl.int64) * D + cols[None, :], mask=ld,
                                other=0.0), axis=0)
        q_bar = q / n_tok
        log_qbar = tl.log(tl.where(col_ok, q_bar, 1.0))
        tl.store(LOG_QBAR + cols, log_qbar, mask=col_ok)
        # qbar_d == 0 gives 0 * -inf = NaN, exactly where the reference's log(qbar) does
        qbar_logq += tl.where(col_ok, q_bar * log_qbar, 0.0)
    inv = 1.0 / (n_tok * D)
    tl.store(LOSSES, tl.sum(acc_f, axis=0) * inv)
    tl.store(LOSSES + 1, tl.sum(acc_x, axis=0) * inv)
    # mean_n KL(q_n || qbar) = sum q log q / Ntok - sum_d qbar log qbar
    tl.store(LOSSES + 2, tl.sum(acc_q, axis=0) / n_tok - tl.sum(qbar_logq, axis=0))
    tl.store(NTOK, n_tok)


@triton.jit
def _constraints_bwd_kernel(
    X, XS, XM, M, WS, WM, MU, S, C, A, LSE, LOG_QBAR, NTOK, G_LOSSES, COLSUM,
    GX, GXS, GXM, GMU, GS, GC, GA, GW_PART,
    B, N, D, N_CHUNKS,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    valid = valid_tokens(M, pid_b, rows, N, N, HAS_MASK)
    # d L / d X = k_f r_f + k_x r_x (+ softmax part with k_m), upstream G = d L / d (L_f, L_x, L_m)
    inv_tok = 1.0 / tl.load(NTOK)
    k_f = 2.0 * tl.load(G_LOSSES) * inv_tok / D
    k_x = 2.0 * tl.load(G_LOSSES + 1) * inv_tok / D
    k_m = tl.load(G_LOSSES + 2) * inv_tok
    if pid_n == 0:
        # the small gradients of pair b from the forward's per-(b, column) sums:
        # c, a, mu, s exactly; w_s, w_m as per-b partials (summed over b by the caller)
        plane = B * N_CHUNKS * D
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            r_x = tl.zeros([BLOCK_D], dtype=tl.float32)
            r_x_zeta = tl.zeros([BLOCK_D], dtype=tl.float32)
            rf_xs = tl.zeros([BLOCK_D], dtype=tl.float32)
            rf_xm = tl.zeros([BLOCK_D], dtype=tl.float32)
            rx_xx = tl.zeros([BLOCK_D], dtype=tl.float32)
            rx_xm = tl.zeros([BLOCK_D], dtype=tl.float32)
            for ch in range(0, N_CHUNKS):
                src = COLSUM + (pid_b * N_CHUNKS + ch) * D + cols
                r_x += tl.load(src, mask=col_ok, other=0.0)
                r_x_zeta += tl.load(src + plane, mask=col_ok, other=0.0)
                rf_xs += tl.load(src + 2 * plane, mask=col_ok, other=0.0)
                rf_xm += tl.load(src + 3 * plane, mask=col_ok, other=0.0)
                rx_xx += tl.load(src + 4 * plane, mask=col_ok, other=0.0)
                rx_xm += tl.load(src + 5 * plane, mask=col_ok, other=0.0)
            stat = pid_b * D + cols
            ws = tl.load(WS + cols, mask=col_ok, other=0.0).to(tl.float32)
            a_over_s = tl.load(A + stat, mask=col_ok, other=0.0) / tl.load(S + stat, mask=col_ok,
                                                                               other=1.0)
            g_c = k_x * ws * r_x
            g_a = k_x * ws * r_x_zeta
            tl.store(GC + stat, g_c, mask=col_ok)
            tl.store(GA + stat, g_a, mask=col_ok)
            tl.store(GMU + stat, -a_over_s * g_c, mask=col_ok)
            tl.store(GS + stat, -a_over_s * g_a, mask=col_ok)
            tl.store(GW_PART + stat, k_f * rf_xs + k_x * rx_xx, mask=col_ok)
            tl.store(GW_PART + B * D + stat, k_f * rf_xm + k_x * rx_xm, mask=col_ok)
    lse = tl.load(LSE + pid_b * N + rows, mask=valid, other=0.0)
    row_base = pid_b * N * D + rows[:, None].to(tl.int64) * D
    # loop 1: KL_n = sum_d q (log q - log qbar), the softmax backward's row term
    kl = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ld = valid[:, None] & (cols < D)[None, :]
        xm = tl.load(XM + row_base + cols[None, :], mask=ld, other=0.0).to(tl.float32)
        log_qbar = tl.load(LOG_QBAR + cols, mask=cols < D, other=0.0)
        log_q = xm - lse[:, None]
        kl += tl.sum(tl.where(ld, tl.exp(log_q) * (log_q - log_qbar[None, :]), 0.0), axis=1)
    # loop 2: the elementwise gradients
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        ws, wm, mu, s, c, a = _column_params(WS, WM, MU, S, C, A, pid_b, cols, col_ok, D)
        log_qbar = tl.load(LOG_QBAR + cols, mask=col_ok, other=0.0)
        ld = valid[:, None] & col_ok[None, :]
        offs = row_base + cols[None, :]
        x = tl.load(X + offs, mask=ld, other=0.0).to(tl.float32)
        xs = tl.load(XS + offs, mask=ld, other=0.0).to(tl.float32)
        xm = tl.load(XM + offs, mask=ld, other=0.0).to(tl.float32)
        _, _, r_f, r_x = _residuals(x, xs, xm, ws, wm, mu, s, c, a)
        t_f = k_f * r_f
        t_x = k_x * r_x
        t = t_f + t_x
        log_q = xm - lse[:, None]
        g_q = k_m * tl.exp(log_q) * (log_q - log_qbar[None, :] - kl[:, None])
        g_x = tl.where(ld, -t, 0.0)
        g_xs = tl.where(ld, ws[None, :] * (t_f + (a / s)[None, :] * t_x), 0.0)
        g_xm = tl.where(ld, wm[None, :] * t + g_q, 0.0)
        st = row_ok[:, None] & col_ok[None, :]
        tl.store(GX + offs, g_x.to(GX.dtype.element_ty), mask=st)
        tl.store(GXS + offs, g_xs.to(GXS.dtype.element_ty), mask=st)
        tl.store(GXM + offs, g_xm.to(GXM.dtype.element_ty), mask=st)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def _check(
    x: Tensor, xs: Tensor, xm: Tensor, mask: Optional[Tensor], w_s: Tensor, w_m: Tensor,
    mu: Tensor, s: Tensor, c: Tensor, a: Tensor,
) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or min(x.shape) < 1:
        raise ValueError(f"tokens: expected a [B, N, D] tensor with B, N, D >= 1, got "
                         f"{list(getattr(x, 'shape', [])) or type(x).__name__}")
    batch, n, d = x.shape
    for name, t in (("tokens", x), ("semantic", xs), ("modality", xm)):
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")
        if t.shape != x.shape:
            raise ValueError(
                f"{name}: expected shape {list(x.shape)} (of tokens), got {list(t.shape)}"
            )
    for name, t in (("w_s", w_s), ("w_m", w_m)):
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")
        if list(t.shape) != [d]:
            raise ValueError(f"{name}: expected shape [D] = [{d}], got {list(t.shape)}")
    for name, t in (("mu", mu), ("s", s), ("c", c), ("a", a)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype float32, got {t.dtype}")
        if list(t.shape) != [batch, d]:
            raise ValueError(f"{name}: expected shape [B, D] = {[batch, d]}, got {list(t.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if list(mask.shape) != [batch, n]:
            raise ValueError(f"mask: expected shape [B, N] = {[batch, n]}, got {list(mask.shape)}")
    for name, t in (("semantic", xs), ("modality", xm), ("mask", mask), ("w_s", w_s),
                    ("w_m", w_m), ("mu", mu), ("s", s), ("c", c), ("a", a)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (of tokens), got {t.device}")


def _mask_arg(mask: Optional[Tensor], x: Tensor) -> Tensor:
    return x if mask is None else mask.contiguous().view(torch.uint8)


def _fwd_tile(n: int, d: int, block_d_cap: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_D, num_warps)`` of the forward and its row-LSE pass; the fake
    implementation uses it too (the partials' shape depends on ``BLOCK_N``)."""
    if interpreter_active():
        block_n, block_d = token_tile(n, d, col_cap=block_d_cap)
        return block_n, block_d, tile_warps(block_n * block_d)
    block_n, block_d = token_tile(n, d, col_cap=block_d_cap, elems=HEAVY_TILE_ELEMS_GPU)
    return block_n, block_d, tile_warps(block_n * block_d, elems_per_thread=4)


def constraints_forward(
    x: Tensor, xs: Tensor, xm: Tensor, mask: Optional[Tensor], w_s: Tensor, w_m: Tensor,
    mu: Tensor, s: Tensor, c: Tensor, a: Tensor, *, block_d_cap: int = ROW_BLOCK_CAP,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward pass of one modality.

    Returns:
        ``losses`` fp32 ``[3]`` = ``(L_f, L_x, L_m)`` of this modality; for the backward:
        ``lse`` fp32 ``[B, N]`` (per-token log-sum-exp of ``X^m``), ``colsum`` fp32
        ``[7, B, chunks, D]`` (the per-(b, column) sums of the module docstring, in the order
        ``_R_X .. _Q``, per token chunk), ``log_qbar`` fp32 ``[D]`` and ``n_tok`` fp32 ``[1]``
        (valid tokens). ``block_d_cap`` (tests) forces the chunked-row path for small ``D``.
    """
    _check(x, xs, xm, mask, w_s, w_m, mu, s, c, a)
    x, xs, xm = x.contiguous(), xs.contiguous(), xm.contiguous()
    w_s, w_m = w_s.contiguous(), w_m.contiguous()
    mu, s, c, a = mu.contiguous(), s.contiguous(), c.contiguous(), a.contiguous()
    batch, n, d = x.shape
    dev = x.device
    m_arg = _mask_arg(mask, x)
    block_n, block_d, warps = _fwd_tile(n, d, block_d_cap)
    lse = scratch((batch, n), torch.float32, dev)
    lse_given = block_d < d
    if lse_given:
        _row_lse_kernel[(batch, triton.cdiv(n, block_n))](
            xm, m_arg, lse, n, d, HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=warps,
        )
    per_prog, n_chunks = split_tokens(n, block_n, batch, dev)
    colsum = scratch((_N_COLSUMS, batch, n_chunks, d), torch.float32, dev)
    toksum = scratch((4, batch, n_chunks), torch.float32, dev)
    _constraints_fwd_kernel[(batch, n_chunks)](
        x, xs, xm, m_arg, w_s, w_m, mu, s, c, a, lse, colsum, toksum,
        batch, n, d, per_prog, n_chunks,
        HAS_MASK=mask is not None, LSE_GIVEN=lse_given, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps,
    )
    losses = scratch((3,), torch.float32, dev)
    log_qbar = scratch((d,), torch.float32, dev)
    n_tok = scratch((1,), torch.float32, dev)
    rows = batch * n_chunks
    block_r, block_dq = token_tile(rows, d, col_cap=min(block_d_cap, 1024))
    _constraints_finalize_kernel[(1,)](
        colsum[_Q], toksum, losses, log_qbar, n_tok, rows, d,
        BLOCK_R=block_r, BLOCK_D=block_dq, num_warps=tile_warps(block_r * block_dq),
    )
    return losses, lse, colsum, log_qbar, n_tok


def constraints_backward(
    x: Tensor, xs: Tensor, xm: Tensor, mask: Optional[Tensor], w_s: Tensor, w_m: Tensor,
    mu: Tensor, s: Tensor, c: Tensor, a: Tensor, lse: Tensor, colsum: Tensor, log_qbar: Tensor,
    n_tok: Tensor, g_losses: Tensor, *, block_d_cap: int = ROW_BLOCK_CAP,
) -> tuple[Tensor, ...]:
    """Launch the backward: one elementwise pass plus the small gradients.

    ``lse, colsum, log_qbar, n_tok`` are the forward's extra outputs; ``g_losses`` fp32 ``[3]`` the
    upstream gradients of ``(L_f, L_x, L_m)``.

    Returns:
        ``(grad X, grad X^s, grad X^m)`` in each input's dtype, ``(grad mu, grad s, grad c,
        grad a)`` fp32 ``[B, D]`` and ``grad_w_part`` fp32 ``[2, B, D]``: per-pair partial
        gradients of ``w_s`` and ``w_m`` (sum over dim 1).
    """
    _check(x, xs, xm, mask, w_s, w_m, mu, s, c, a)
    batch, n, d = x.shape
    n_chunks = colsum.shape[2] if colsum.dim() == 4 else -1
    if (list(lse.shape) != [batch, n] or list(log_qbar.shape) != [d]
            or list(colsum.shape) != [_N_COLSUMS, batch, n_chunks, d]
            or list(g_losses.shape) != [3] or n_tok.numel() != 1):
        raise ValueError(
            f"lse/colsum/log_qbar/n_tok/g_losses: expected shapes {[batch, n]}, "
            f"{[_N_COLSUMS, batch, 'chunks', d]}, {[d]}, [1], [3]; got {list(lse.shape)}, "
            f"{list(colsum.shape)}, {list(log_qbar.shape)}, {list(n_tok.shape)}, "
            f"{list(g_losses.shape)}"
        )
    x, xs, xm = x.contiguous(), xs.contiguous(), xm.contiguous()
    dev = x.device
    gx, gxs, gxm = scratch_like(x), scratch_like(xs), scratch_like(xm)
    g_mu, g_s, g_c, g_a = (scratch((batch, d), torch.float32, dev)
                           for _ in range(4))
    g_w_part = scratch((2, batch, d), torch.float32, dev)
    # The backward loops over D in blocks whatever their width (the forward saved each row's
    # log-sum-exp), so its blocks stay within one tile: a [1, 4096] block (D > 2048) spilled
    # registers for sm_90 (benchmarks/kernel_resources.py).
    block_n, block_d = token_tile(n, d, col_cap=min(block_d_cap, tile_elems()))
    _constraints_bwd_kernel[(batch, triton.cdiv(n, block_n))](
        x, xs, xm, _mask_arg(mask, x), w_s.contiguous(), w_m.contiguous(), mu.contiguous(),
        s.contiguous(), c.contiguous(), a.contiguous(), lse.contiguous(), log_qbar.contiguous(),
        n_tok, g_losses.to(torch.float32).contiguous(), colsum.contiguous(),
        gx, gxs, gxm, g_mu, g_s, g_c, g_a, g_w_part,
        batch, n, d, n_chunks,
        HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=tile_warps(block_n * block_d),
    )
    return gx, gxs, gxm, g_mu, g_s, g_c, g_a, g_w_part


# ------------------------------------------------------------------------------------------------
# torch.library registration + autograd
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("cdds_fast::constraint_losses", mutates_args=())
def _constraint_losses_op(
    x: Tensor, xs: Tensor, xm: Tensor, mask: Optional[Tensor], w_s: Tensor, w_m: Tensor,
    mu: Tensor, s: Tensor, c: Tensor, a: Tensor, block_d_cap: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return constraints_forward(x, xs, xm, mask, w_s, w_m, mu, s, c, a, block_d_cap=block_d_cap)


@_constraint_losses_op.register_fake
def _(x, xs, xm, mask, w_s, w_m, mu, s, c, a, block_d_cap):
    batch, n, d = x.shape
    block_n, _, _ = _fwd_tile(n, d, block_d_cap)
    _, n_chunks = split_tokens(n, block_n, batch, x.device)
    f32 = dict(dtype=torch.float32)
    return (x.new_empty(3, **f32), x.new_empty(batch, n, **f32),
            x.new_empty(_N_COLSUMS, batch, n_chunks, d, **f32), x.new_empty(d, **f32),
            x.new_empty(1, **f32))


@torch.library.custom_op("cdds_fast::constraint_losses_backward", mutates_args=())
def _constraint_losses_backward_op(
    x: Tensor, xs: Tensor, xm: Tensor, mask: Optional[Tensor], w_s: Tensor, w_m: Tensor,
    mu: Tensor, s: Tensor, c: Tensor, a: Tensor, lse: Tensor, colsum: Tensor, log_qbar: Tensor,
    n_tok: Tensor, g_losses: Tensor, block_d_cap: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return constraints_backward(
        x, xs, xm, mask, w_s, w_m, mu, s, c, a, lse, colsum, log_qbar, n_tok, g_losses,
        block_d_cap=block_d_cap,
    )


@_constraint_losses_backward_op.register_fake
def _(x, xs, xm, mask, w_s, w_m, mu, s, c, a, lse, colsum, log_qbar, n_tok, g_losses,
      block_d_cap):
    cf = torch.contiguous_format
    batch, _, d = x.shape
    small = [x.new_empty(batch, d, dtype=torch.float32) for _ in range(4)]
    return (torch.empty_like(x, memory_format=cf), torch.empty_like(xs, memory_format=cf),
            torch.empty_like(xm, memory_format=cf), *small,
            x.new_empty(2, batch, d, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, xs, xm, mask, w_s, w_m, mu, s, c, a, block_d_cap = inputs
    _, lse, colsum, log_qbar, n_tok = output
    ctx.save_for_backward(x, xs, xm, mask, w_s, w_m, mu, s, c, a, lse, colsum, log_qbar, n_tok)
    # saved state, not results: no gradient and no zero-filled gradient tensors at every backward
    ctx.mark_non_differentiable(lse, colsum, log_qbar, n_tok)
    ctx.set_materialize_grads(False)
    ctx.block_d_cap = block_d_cap


def _backward(ctx, g_losses, *_unused):
    x, xs, xm, mask, w_s, w_m, mu, s, c, a, lse, colsum, log_qbar, n_tok = ctx.saved_tensors
    if g_losses is None:
        g_losses = torch.zeros(3, dtype=torch.float32, device=x.device)
    gx, gxs, gxm, g_mu, g_s, g_c, g_a, g_w_part = _constraint_losses_backward_op(
        x, xs, xm, mask, w_s, w_m, mu, s, c, a, lse, colsum, log_qbar, n_tok,
        g_losses.to(torch.float32), ctx.block_d_cap,
    )
    g_w = g_w_part.sum(1)
    return (gx, gxs, gxm, None, g_w[0].to(w_s.dtype), g_w[1].to(w_m.dtype), g_mu, g_s, g_c, g_a,
            None)


_constraint_losses_op.register_autograd(_backward, setup_context=_setup_context)


def constraint_losses(
    tokens: Tensor,
    semantic: Tensor,
    modality: Tensor,
    w_s: Tensor,
    w_m: Tensor,
    mu: Tensor,
    s: Tensor,
    c: Tensor,
    a: Tensor,
    mask: Optional[Tensor] = None,
    *,
    block_d_cap: int = ROW_BLOCK_CAP,
) -> Tensor:
    """``(L_f, L_x, L_m)`` of one modality in one fused pass, differentiable (Triton kernels).

    Equals ``(reconstruction_loss(X, X^s, X^m, w_s, w_m, m), reconstruction_loss(X, X^x, X^m, w_s,
    w_m, m), modality_kl(X^m, m))`` of :mod:`cdds_fast.reference.constraints` with
    ``X^x = c + a (X^s - mu) / s``, which is never materialised.

    Args:
        tokens, semantic, modality: ``[B, N, D]`` ``X``, ``X^s``, ``X^m`` (fp32/bf16/fp16 each,
            any strides).
        w_s, w_m: ``[D]`` reconstruction weights.
        mu, s: ``[B, D]`` fp32 column statistics of ``X^s``; c, a: ``[B, D]`` fp32 sampling
            coefficients. Gradients flow to all four.
        mask: ``[B, N]`` bool (True = valid) or None (all valid).
        block_d_cap: widest row held in one block (tests lower it to exercise the chunked path).
    Returns:
        fp32 ``[3]`` tensor ``(L_f, L_x, L_m)``.
    """
    _check(tokens, semantic, modality, mask, w_s, w_m, mu, s, c, a)
    losses, *_ = _constraint_losses_op(
        tokens.contiguous(), semantic.contiguous(), modality.contiguous(),
        None if mask is None else mask.contiguous(), w_s.contiguous(), w_m.contiguous(),
        mu.contiguous(), s.contiguous(), c.contiguous(), a.contiguous(), int(block_d_cap),
    )
    return losses
