r"""Row L2 normalisation (``F.normalize(x, dim=-1)``) of a stack of ``[B, D]`` matrices, one launch.

The fast CDDS path pools four feature matrices (``mu_v``, ``mu_t``, ``c_v``, ``c_t``: spec sections
5-6) with ``F.normalize``; eagerly that is 3 launches per matrix forward and ~10 backward, which at
realistic batch sizes costs more (launch overhead) than the work. ``l2_normalize`` takes ``x`` of
shape ``[..., D]`` (the caller stacks the matrices) and does the forward and the backward in one
launch each.

Math, per row (``eps = 1e-12`` as ``F.normalize``)::

    n = ||x||_2,   q = max(n, eps),   y = x / q
    grad_x = (g - y * <g, y>) / q      if n > eps   (the norm's gradient)
    grad_x = g / q                     otherwise    (clamped: the denominator is a constant)

One program per row, the row looped in ``BLOCK_D`` chunks: forward reads ``x`` twice (sum of
squares, then scale; the second read hits L1/L2), writes ``y`` and ``n`` (fp32); backward reads
``g`` and ``y`` twice and writes ``grad_x``. Bytes: forward ``2 R D e`` from HBM (``R`` rows,
``e`` bytes per element), backward ``3 R D e``; ~3 FLOPs per element. At the CDDS shapes
(4 x 256 rows of 512 fp32) that is 2 / 3 MB: launch-bound by design, one launch instead of 12 / ~40.
Statistics in fp32; ``y`` and ``grad_x`` in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cdds_fast.kernels.launch import block_for, num_warps_for, scratch, scratch_like

EPS = 1e-12
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _l2_normalize_fwd_kernel(X, Y, NORM, D, EPS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * D
    offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = tl.load(X + row + d0 + offs, mask=d0 + offs < D, other=0.0).to(tl.float32)
        acc += x * x
    norm = tl.sqrt(tl.sum(acc, axis=0))
    inv = 1.0 / tl.maximum(norm, EPS)
    for d0 in range(0, D, BLOCK_D):
        ok = d0 + offs < D
        x = tl.load(X + row + d0 + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + row + d0 + offs, (x * inv).to(Y.dtype.element_ty), mask=ok)
    tl.store(NORM + tl.program_id(0), norm)


@triton.jit
def _l2_normalize_bwd_kernel(G, Y, NORM, GX, D, EPS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * D
    offs = tl.arange(0, BLOCK_D)
    norm = tl.load(NORM + tl.program_id(0))
    inv = 1.0 / tl.maximum(norm, EPS)
    # <g, y> only where the norm is not clamped (a clamped denominator is a constant)
    dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if norm > EPS:
        for d0 in range(0, D, BLOCK_D):
            ok = d0 + offs < D
            g = tl.load(G + row + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(Y + row + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            dot += g * y
    gy = tl.sum(dot, axis=0)
    for d0 in range(0, D, BLOCK_D):
        ok = d0 + offs < D
        g = tl.load(G + row + d0 + offs, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(Y + row + d0 + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(GX + row + d0 + offs, ((g - y * gy) * inv).to(GX.dtype.element_ty), mask=ok)


def _launch_args(d: int) -> tuple[int, int]:
    block = block_for(d, cap=2048)
    return block, num_warps_for(block)


def _check(x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"x: expected dtype float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected shape [..., D] with D >= 1, got {list(x.shape)}")


@torch.library.custom_op("cdds_fast::l2_normalize", mutates_args=())
def _l2_normalize_op(x: Tensor) -> tuple[Tensor, Tensor]:
    d = x.shape[-1]
    rows = x.numel() // d
    y = scratch_like(x)
    norm = scratch(x.shape[:-1], torch.float32, x.device)
    if rows:
        block, warps = _launch_args(d)
        _l2_normalize_fwd_kernel[(rows,)](x, y, norm, d, EPS=EPS, BLOCK_D=block, num_warps=warps)
    return y, norm


@_l2_normalize_op.register_fake
def _(x):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("cdds_fast::l2_normalize_backward", mutates_args=())
def _l2_normalize_backward_op(grad: Tensor, y: Tensor, norm: Tensor) -> Tensor:
    d = y.shape[-1]
    rows = y.numel() // d
    grad = grad.contiguous()
    gx = scratch_like(y)
    if rows:
        block, warps = _launch_args(d)
        _l2_normalize_bwd_kernel[(rows,)](grad, y, norm, gx, d, EPS=EPS, BLOCK_D=block,
                                          num_warps=warps)
    return gx


@_l2_normalize_backward_op.register_fake
def _(grad, y, norm):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    y, norm = output
    ctx.mark_non_differentiable(norm)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y, norm)


def _backward(ctx, grad_y, _grad_norm):
    if grad_y is None:
        return None
    y, norm = ctx.saved_tensors
    return _l2_normalize_backward_op(grad_y.to(y.dtype), y, norm)


_l2_normalize_op.register_autograd(_backward, setup_context=_setup_context)


def l2_normalize(x: Tensor) -> Tensor:
    """``F.normalize(x, dim=-1)`` (``eps = 1e-12``) in one launch forward and one backward.

    Args:
        x: ``[..., D]`` float32/bfloat16/float16 on a device Triton runs on (CUDA, or CPU under
            ``TRITON_INTERPRET=1``); any strides (made contiguous once).
    Returns:
        ``[..., D]`` in ``x``'s dtype, every row of L2 norm 1 (or ``x / 1e-12`` for a row whose
        norm is below ``1e-12``, as ``F.normalize``).
    """
    _check(x)
    return _l2_normalize_op(x.contiguous())[0]


__all__ = ["l2_normalize"]
