"""sm_90's float32 rounding for kernels run by the Triton interpreter (CPU CI has no GPU).

The interpreter evaluates a kernel with numpy: ``tl.exp2``, ``tl.exp``, ``/`` and ``tl.sqrt``
correctly rounded (or within numpy's half ulp), and ``tl.fma`` as a product and a sum rounded
twice. Compiled for sm_90 the same code runs approximations instead (the PTX of the committed
kernels, ``benchmarks/kernel_resources.py``): ``ex2.approx.f32`` for ``tl.exp2``,
``ex2.approx(x * log2 e)`` for ``tl.exp``, ``div.full.f32`` for ``/`` (up to 2 ulp),
``sqrt.approx.f32`` for ``tl.sqrt``; and ``fma.rn.f32`` rounds once. A kernel whose agreement with
the reference leans on IEEE results (``n / n == 1`` at ``D = 1``, ...) passes the interpreter and
fails on the device, which this project sees about one session in ten. While installed
(``tests/conftest.py`` installs it whenever kernels run through the interpreter), the interpreter
rounds like the device:

* an approximation returns the correctly rounded value moved by up to :data:`APPROX_ULPS` ulp,
  the move a deterministic function of the operands' bits: equal inputs give equal bits in every
  kernel, as on the device, so logits recomputed by the backward stay bit-identical to the
  forward's (the tie tests rely on it);
* results the hardware gets exactly stay exact: ``2^n`` for integer ``n``, a quotient by a power of
  two; ``tl.exp2`` (``ex2.approx.ftz``) flushes results below the smallest normal to 0, ``tl.exp``
  (``ex2.approx``) keeps them;
* ``tl.fma`` rounds once; the IEEE forms (``tl.math.div_rn``, ``tl.sqrt_rn``) stay exact;
* ``tl.dot(..., input_precision="tf32")`` of float32 operands multiplies them as the tensor cores
  read them, with the 13 low mantissa bits dropped (TF32 keeps 10);
* ``x.to(tl.bfloat16)`` of float32 rounds to nearest even (``cvt.rn.bf16.f32``), where the
  interpreter truncates (float16 it already rounds).

It models the size of the device's errors, not NVIDIA's functions bit for bit, and not the
compiler's contraction of other ``a * b + c`` into fmas.
"""

from __future__ import annotations

import numpy as np

#: Largest move, in ulp, of each approximated op (CUDA's documented bounds for the intrinsics
#: behind them: ``exp2f`` and ``__fdividef``-style division 2 ulp; the square root's approximation
#: ~1 ulp). ``exp`` adds the rounding of ``x * log2 e``, as on the device.
APPROX_ULPS = {"exp2": 2, "div": 2, "sqrt": 1}
_HASH = np.uint64(0x9E3779B1)
_MIX = np.uint32(0x85EBCA77)
_SMALLEST_NORMAL = np.float32(2.0**-126)
_LOG2E = np.float32(1.4426950408889634)


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _moved(exact: np.ndarray, key: np.ndarray, ulps: int) -> np.ndarray:
    """``exact`` (float32) moved by ``-ulps .. ulps`` ulp, chosen by a hash of ``key``; zeros,
    infinities and NaN unchanged, and no move crosses into another binade's special values."""
    key = np.broadcast_to(key, exact.shape).astype(np.uint64)
    move = ((key * _HASH) & np.uint64(0xFFFFFFFF)) >> np.uint64(20)
    move = (move % np.uint64(2 * ulps + 1)).astype(np.int64) - ulps
    movable = np.isfinite(exact) & (exact != 0)
    bits = exact.view(np.int32).astype(np.int64)
    out = np.where(movable, bits + move, bits).astype(np.int32).view(np.float32)
    return np.where(movable & np.isfinite(out) & (np.sign(out) == np.sign(exact)), out, exact)


def _exp2(x: np.ndarray, ftz: bool) -> np.ndarray:
    exact = np.exp2(x)
    out = _moved(exact, _bits(x), APPROX_ULPS["exp2"])
    out = np.where(x == np.floor(x), exact, out)  # 2^n is exact on the device too
    if ftz:
        out = np.where(out < _SMALLEST_NORMAL, np.float32(0), out)
    return out.astype(np.float32)


def _tf32(x: np.ndarray) -> np.ndarray:
    """float32 values as a TF32 tensor-core operand: 10 mantissa bits, the rest dropped."""
    return (_bits(x) & np.uint32(0xFFFFE000)).view(np.float32)


def install() -> None:
    """Make the Triton interpreter round float32 like sm_90 (module docstring) for the rest of
    the process. Raises if this Triton's interpreter lacks an op the emulation replaces, so a
    version that renames one cannot silently turn the emulation off."""
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    names = (
        "create_exp2",
        "create_exp",
        "create_fdiv",
        "create_sqrt",
        "create_fma",
        "create_dot",
        "cast_impl",
    )
    missing = [n for n in names if not hasattr(builder, n)]
    if missing:
        raise RuntimeError(f"sm90_rounding: the Triton interpreter has no {missing}")
    handle = interpreter.TensorHandle
    exact = {n: getattr(builder, n) for n in names}

    def create_exp2(self, arg):
        if arg.data.dtype != np.float32:
            return exact["create_exp2"](self, arg)
        return handle(_exp2(arg.data, ftz=True), arg.dtype.scalar)  # ex2.approx.ftz.f32

    def create_exp(self, arg):
        if arg.data.dtype != np.float32:
            return exact["create_exp"](self, arg)
        scaled = (arg.data * _LOG2E).astype(np.float32)
        return handle(_exp2(scaled, ftz=False), arg.dtype.scalar)  # ex2.approx.f32

    def create_fdiv(self, lhs, rhs):
        out = exact["create_fdiv"](self, lhs, rhs)
        if out.data.dtype != np.float32:
            return out
        den = np.broadcast_to(_bits(rhs.data), out.data.shape)
        by_power_of_two = (den & np.uint32(0x7FFFFF)) == 0
        key = _bits(lhs.data) ^ (den * _MIX)
        moved = _moved(np.asarray(out.data, dtype=np.float32), key, APPROX_ULPS["div"])
        return handle(np.where(by_power_of_two, out.data, moved), out.dtype)

    def create_sqrt(self, arg):
        out = exact["create_sqrt"](self, arg)
        if out.data.dtype != np.float32:
            return out
        moved = _moved(np.asarray(out.data, dtype=np.float32), _bits(arg.data), APPROX_ULPS["sqrt"])
        return handle(moved, out.dtype)

    def create_fma(self, x, y, z):
        if z.data.dtype != np.float32:
            return exact["create_fma"](self, x, y, z)
        # float32 products are exact in float64 (24 + 24 bits): the sum's float64 rounding can
        # only matter at an exact float32 tie
        wide = x.data.astype(np.float64) * y.data.astype(np.float64) + z.data.astype(np.float64)
        return handle(wide.astype(np.float32), z.dtype.scalar)

    tf32 = interpreter._ir.INPUT_PRECISION.TF32

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == tf32 and a.data.dtype == np.float32 == b.data.dtype:
            a = handle(_tf32(a.data), a.dtype)
            b = handle(_tf32(b.data), b.dtype)
        return exact["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return exact["cast_impl"](self, src, dst_type)
        rounded = torch.tensor(np.asarray(src.data, dtype=np.float32)).to(torch.bfloat16)
        rounded = rounded.view(torch.int16).numpy().view(np.uint16)  # the interpreter's storage
        return handle(rounded, dst_type.scalar)

    fns = (create_exp2, create_exp, create_fdiv, create_sqrt, create_fma, create_dot, cast_impl)
    for name, fn in zip(names, fns, strict=True):
        setattr(builder, name, fn)
