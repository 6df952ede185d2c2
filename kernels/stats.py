"""Column statistics kernel (docs/method.md section 2): masked mean and std of every column of
``X^s``.

``mu[b, d] = sum_n m[b,n] x[b,n,d] / count[b]``,
``s[b, d] = sqrt(sum_n m[b,n] (x[b,n,d] - mu[b,d])^2 / count[b] + 1e-5)``,
``count[b] = sum_n m[b,n]``
(images: no mask, ``count = N``). Outputs are float32 ``[B, D]`` whatever the input dtype.

Forward: one program per ``(b, block of columns)`` loops over the tokens twice in fp32: the mean,
then the sums of deviations and squared deviations from it (corrected two-pass: the reference's
two-pass plus a correction of the mean's rounding error, so constant columns give deviations of
exactly 0). The second pass re-reads the program's ``N x BLOCK_D`` slab, still in L1/L2. Masked
tokens are never loaded.
Backward: ``grad_x = m / count * (g_mu + g_s * zeta)``, ``zeta = ((x - mu) - mu_res) / s`` with
``mu_res`` the part of the exact mean that fp32 ``mu`` cannot hold (saved by the forward, so the
deviations are as accurate as autograd through the reference's two-pass); one elementwise pass,
written in ``x``'s dtype (zeros at masked tokens).

Roofline per call, ``X^s`` of ``B*N*D`` elements of ``e`` bytes (``e = 2`` for bf16):
- forward: ``B*N*D*e`` bytes from HBM (+ the same again from L2) and ``12*B*D`` written; about
  ``5*B*N*D`` FLOPs, no transcendentals besides ``B*D`` square roots.
- backward: ``2*B*N*D*e`` bytes (read ``x``, write ``grad_x``) + ``20*B*D``; ``5*B*N*D`` FLOPs.
At ``(B, P, L, D) = (256, 50, 77, 512)`` bf16, image + text together: ``B*(P+L)*D = 16.6 M``
elements, forward 33 MB (~11 us at 3 TB/s), backward 67 MB (~22 us). Pure bandwidth.

The op is registered as ``cdds_fast::column_stats`` (+ ``cdds_fast::column_stats_backward``) with
``torch.library.custom_op`` so ``torch.compile`` treats it as one opaque, differentiable node. The
CDDS loss computes the same statistics inside its token pass (``kernels/constraints.py``, with this
file's ``finish_column_stats`` and ``stats_grad``); :func:`column_stats` is the standalone op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cdds_fast.contract import KERNEL_DTYPES
from cdds_fast.kernels.launch import sized_for_gpu, tile_warps, token_tile
from cdds_fast.kernels.tokens import mask_arg, valid_tokens

STD_EPS = 1e-5  # inside the square root, as cdds_fast.reference.stats

# Columns per program on a GPU: a warp reads 64 contiguous bf16/fp32 values per token row
# (128-256 B), and B * D / 64 programs fill the device at realistic shapes.
_GPU_COLS_PER_PROGRAM = 64


@triton.jit
def finish_column_stats(mean1, sum_dev, sum_dev2, count):
    """End of the corrected two-pass (Chan, Golub & LeVeque 1983) for one block of columns:
    ``mean1`` is the first pass's mean, ``sum_dev`` / ``sum_dev2`` the second pass's sums of the
    deviations ``x - mean1`` and of their squares over ``count`` tokens. The first mean's own
    rounding error (``shift``) is measured and removed, so a constant column gets a variance of
    exactly 0 (the plain two-pass leaves ~ulp(mean) / s).

    Returns ``(mu, mu_res, shift, var)``: the fp32 mean, what it could not hold (Fast2Sum,
    ``|mean1| >= |shift|``: the deviations ``(x - mu) - mu_res`` are as accurate as autograd
    through the reference's two-pass), ``shift = mu + mu_res - mean1`` (so ``x - mean1 - shift``
    is the exact deviation) and the population variance; ``s = tl.sqrt_rn(var + EPS)`` is the
    caller's (correctly rounded, as the reference's ``torch.sqrt``)."""
    shift = sum_dev / count
    mu = mean1 + shift
    mu_res = shift - (mu - mean1)
    return mu, mu_res, shift, tl.maximum(sum_dev2 / count - shift * shift, 0.0)


@triton.jit
def stats_grad(x, mu, mu_res, s, g_mu, g_s, inv_count):
    """Gradient of ``(mu, s)`` w.r.t. one valid token's value ``x`` (broadcast operands):
    ``(g_mu + g_s zeta) / count`` with ``zeta = ((x - mu) - mu_res) / s``."""
    zeta = ((x - mu) - mu_res) / s
    return (g_mu + g_s * zeta) * inv_count


@triton.jit
def _stats_fwd_kernel(
    X,
    M,
    MU,
    S,
    MU_RES,
    COUNT,
    N,
    D,
    EPS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    x_row0 = X + pid_b * N * D
    # pass 1: masked sum and token count
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        valid = valid_tokens(M, pid_b, rows, N, N, HAS_MASK)
        ld = valid[:, None] & col_ok[None, :]
        x = tl.load(x_row0 + rows[:, None].to(tl.int64) * D + cols[None, :], mask=ld, other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
        cnt += valid.to(tl.float32)
    count = tl.sum(cnt, axis=0)
    mu = acc / count
    # pass 2: sums of deviations and squared deviations from that mean (finish_column_stats)
    acc1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        valid = valid_tokens(M, pid_b, rows, N, N, HAS_MASK)
        ld = valid[:, None] & col_ok[None, :]
        x = tl.load(x_row0 + rows[:, None].to(tl.int64) * D + cols[None, :], mask=ld, other=0.0)
        dev = tl.where(ld, x.to(tl.float32) - mu[None, :], 0.0)
        acc1 += tl.sum(dev, axis=0)
        acc2 += tl.sum(dev * dev, axis=0)
    mu_new, mu_res, _, var = finish_column_stats(mu, acc1, acc2, count)
    s = tl.sqrt_rn(var + EPS)
    out = pid_b * D + cols
    tl.store(MU + out, mu_new, mask=col_ok)
    tl.store(S + out, s, mask=col_ok)
    tl.store(MU_RES + out, mu_res, mask=col_ok)
    if tl.program_id(1) == 0:
        tl.store(COUNT + pid_b, count)


@triton.jit
def _stats_bwd_kernel(
    X,
    M,
    COUNT,
    MU,
    MU_RES,
    S,
    GMU,
    GS,
    GX,
    N,
    D,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    valid = valid_tokens(M, pid_b, rows, N, N, HAS_MASK)
    stat = pid_b * D + cols
    mu = tl.load(MU + stat, mask=col_ok, other=0.0)
    mu_res = tl.load(MU_RES + stat, mask=col_ok, other=0.0)
    s = tl.load(S + stat, mask=col_ok, other=1.0)
    g_mu = tl.load(GMU + stat, mask=col_ok, other=0.0)
    g_s = tl.load(GS + stat, mask=col_ok, other=0.0)
    inv_count = 1.0 / tl.load(COUNT + pid_b)
    offs = pid_b * N * D + rows[:, None].to(tl.int64) * D + cols[None, :]
    ld = valid[:, None] & col_ok[None, :]
    x = tl.load(X + offs, mask=ld, other=0.0).to(tl.float32)
    g = tl.where(
        ld,
        stats_grad(
            x, mu[None, :], mu_res[None, :], s[None, :], g_mu[None, :], g_s[None, :], inv_count
        ),
        0.0,
    )
    tl.store(GX + offs, g.to(GX.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def _check(x: Tensor, mask: Tensor | None) -> None:
    """:func:`column_stats`'s inputs, before any launch (the launchers below take them as
    checked)."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x: expected a [B, N, D] tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x: expected dtype float32, bfloat16 or float16, got {x.dtype}")
    if min(x.shape) < 1:
        raise ValueError(f"x: expected B, N, D >= 1, got shape {list(x.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if list(mask.shape) != list(x.shape[:2]):
            raise ValueError(
                f"mask: expected shape [B, N] = {list(x.shape[:2])}, got {list(mask.shape)}"
            )
        if mask.device != x.device:
            raise ValueError(f"mask: expected device {x.device} (of x), got {mask.device}")


def _fwd_blocks(n: int, d: int, device: torch.device) -> tuple[int, int]:
    block_n, block_d = token_tile(n, d, device)
    if sized_for_gpu(device):
        block_d = min(block_d, _GPU_COLS_PER_PROGRAM)
        block_n, _ = token_tile(n, block_d, device, col_cap=block_d)
    return block_n, block_d


def stats_forward(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernel on ``x`` ``[B, N, D]``; returns fp32 ``(mu, s, mu_res, count)``:
    ``mu_res`` ``[B, D]`` is the part of the exact mean that fp32 ``mu`` cannot hold and ``count``
    ``[B]`` the valid tokens per pair (both for the backward)."""
    x = x.contiguous()
    batch, n, d = x.shape
    mu = torch.empty((batch, d), dtype=torch.float32, device=x.device)
    s = torch.empty_like(mu)
    mu_res = torch.empty_like(mu)
    count = torch.empty((batch,), dtype=torch.float32, device=x.device)
    block_n, block_d = _fwd_blocks(n, d, x.device)
    grid = (batch, triton.cdiv(d, block_d))
    _stats_fwd_kernel[grid](
        x,
        mask_arg(mask, x),
        mu,
        s,
        mu_res,
        count,
        n,
        d,
        EPS=STD_EPS,
        HAS_MASK=mask is not None,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=tile_warps(block_n * block_d),
    )
    return mu, s, mu_res, count


def stats_backward(
    x: Tensor,
    mask: Tensor | None,
    mu: Tensor,
    mu_res: Tensor,
    s: Tensor,
    count: Tensor,
    grad_mu: Tensor,
    grad_s: Tensor,
) -> Tensor:
    """Launch the backward kernel; returns ``grad_x`` in ``x``'s dtype. The statistics are the
    forward's (``[B, D]``, ``count`` ``[B]``), the gradients those of ``mu`` and ``s``."""
    x = x.contiguous()
    batch, n, d = x.shape
    f32 = torch.float32
    mu, s, mu_res = mu.to(f32).contiguous(), s.to(f32).contiguous(), mu_res.to(f32).contiguous()
    grad_mu, grad_s = grad_mu.to(f32).contiguous(), grad_s.to(f32).contiguous()
    count = count.to(f32).contiguous()
    grad_x = torch.empty_like(x)
    block_n, block_d = token_tile(n, d, x.device)
    grid = (batch, triton.cdiv(n, block_n), triton.cdiv(d, block_d))
    _stats_bwd_kernel[grid](
        x,
        mask_arg(mask, x),
        count,
        mu,
        mu_res,
        s,
        grad_mu,
        grad_s,
        grad_x,
        n,
        d,
        HAS_MASK=mask is not None,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=tile_warps(block_n * block_d),
    )
    return grad_x


# ------------------------------------------------------------------------------------------------
# torch.library registration + autograd
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("cdds_fast::column_stats", mutates_args=())
def _column_stats_op(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return stats_forward(x, mask)


@_column_stats_op.register_fake
def _(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, _, d = x.shape
    f32 = torch.float32
    return (*(x.new_empty(batch, d, dtype=f32) for _ in range(3)), x.new_empty(batch, dtype=f32))


@torch.library.custom_op("cdds_fast::column_stats_backward", mutates_args=())
def _column_stats_backward_op(
    x: Tensor,
    mask: Tensor | None,
    mu: Tensor,
    mu_res: Tensor,
    s: Tensor,
    count: Tensor,
    grad_mu: Tensor,
    grad_s: Tensor,
) -> Tensor:
    return stats_backward(x, mask, mu, mu_res, s, count, grad_mu, grad_s)


@_column_stats_backward_op.register_fake
def _(x, mask, mu, mu_res, s, count, grad_mu, grad_s):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, mask = inputs
    mu, s, mu_res, count = output
    ctx.save_for_backward(x, mask, mu, mu_res, s, count)
    # mu_res and count are saved state, not results: no gradient, and no zero-filled gradient
    # tensors for them (or for an unused mu / s) at every backward
    ctx.mark_non_differentiable(mu_res, count)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_mu, grad_s, *_unused):
    x, mask, mu, mu_res, s, count = ctx.saved_tensors
    if grad_mu is None:
        grad_mu = torch.zeros_like(mu)
    if grad_s is None:
        grad_s = torch.zeros_like(s)
    return _column_stats_backward_op(x, mask, mu, mu_res, s, count, grad_mu, grad_s), None


_column_stats_op.register_autograd(_backward, setup_context=_setup_context)


def column_stats(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Masked column mean and std (docs/method.md section 2), differentiable, on the Triton
    kernels (the loss computes them inside its token pass; this op is for the statistics
    alone).

    Args:
        x: ``[B, N, D]`` float32/bfloat16/float16 semantic components (any strides).
        mask: ``[B, N]`` bool, True = valid token, at least one per row; None = all valid.
    Returns:
        ``(mu, s)``, each ``[B, D]`` float32, ``s = sqrt(population var + 1e-5)``.
    """
    _check(x, mask)
    mu, s, *_ = _column_stats_op(x.contiguous(), None if mask is None else mask.contiguous())
    return mu, s
