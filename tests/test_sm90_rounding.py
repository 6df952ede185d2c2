"""The interpreter's sm_90 rounding (tests/sm90_rounding.py), installed by tests/conftest.py for
every kernel test on CPU: on, within its bounds, deterministic, exact where the device is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from tests.conftest import HAS_CUDA
from tests.sm90_rounding import APPROX_ULPS

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="the device rounds natively")


@triton.jit
def _ops_kernel(X, Y, Z, OUT, N: tl.constexpr):
    o = tl.arange(0, N)
    x = tl.load(X + o)
    y = tl.load(Y + o)
    z = tl.load(Z + o)
    tl.store(OUT + o, tl.exp2(x))
    tl.store(OUT + N + o, x / y)
    tl.store(OUT + 2 * N + o, tl.sqrt(tl.abs(x)))
    tl.store(OUT + 3 * N + o, tl.fma(x, y, z))
    tl.store(OUT + 4 * N + o, tl.math.div_rn(x, y))
    tl.store(OUT + 5 * N + o, tl.exp(x))


def run(x, y, z):
    out = torch.empty(6, x.numel())
    _ops_kernel[(1,)](x, y, z, out, N=x.numel())
    return out


def ulps(got, want):
    """Distance in float32 ulps (same-sign finite values)."""
    g = got.numpy().view(np.int32).astype(np.int64)
    w = want.numpy().astype(np.float32).view(np.int32).astype(np.int64)
    return np.abs(g - w)


def test_approximations_move_within_their_bounds_and_deterministically():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1024, generator=gen) * 20 - 10
    y = torch.rand(1024, generator=gen) * 7 + 0.5
    z = torch.zeros(1024)
    out = run(x, y, z)
    exact = (torch.exp2(x.double()), x.double() / y.double(), x.double().abs().sqrt())
    for got, want, name in zip(out[:3], exact, ("exp2", "div", "sqrt"), strict=True):
        dist = ulps(got, want)
        # within the bound (+ the half ulp of the correctly rounded value it starts from) ...
        assert dist.max() <= APPROX_ULPS[name] + 1, name
        # ... and actually moved: the emulation is on
        assert (dist >= 1).mean() > 0.3, name
    assert torch.equal(run(x, y, z), out)  # same inputs, same bits
    # the IEEE division stays correctly rounded
    assert torch.equal(out[4], (x.double() / y.double()).float())
    # exp: the device's ex2.approx(x * log2 e), whose error grows with |x|
    assert ulps(out[5], torch.exp(x.double())).max() <= 2 + 1 + 10 * 1.2


def test_exact_where_the_device_is_exact():
    x = torch.tensor([0.0, 1.0, -3.0, 7.0, 5.0, 6.0, -200.0, 3.0])
    y = torch.tensor([1.0, 2.0, 0.25, 4.0, 5.0, 6.0, 0.5, 3.0])
    out = run(x, y, torch.zeros(8))
    # 2^n for integer n (2^-200 flushes to 0, as ex2.approx.ftz does)
    assert torch.equal(out[0], torch.exp2(x).where(x > -126, torch.zeros(())))
    # quotients by powers of two; n / n for other n is only within 2 ulp of 1 on the device, and
    # here: kernels that need it exact use tl.math.div_rn
    assert torch.equal(out[1][[0, 1, 2, 3, 6]], (x / y)[[0, 1, 2, 3, 6]])
    assert torch.equal(out[5][0], torch.tensor(1.0))  # exp(0)


def test_fma_rounds_once():
    # (1 + 2^-12)^2 - (1 + 2^-11) = 2^-24 exactly; rounding the product first loses it (a tie
    # to even at 1 + 2^-11)
    a = torch.tensor([1 + 2.0**-12])
    out = run(a, a, torch.tensor([-(1 + 2.0**-11)]))
    assert out[3].item() == 2.0**-24
    assert (a * a - (1 + 2.0**-11)).item() == 0.0


def test_subnormal_results_as_the_device():
    # tl.exp2 is ex2.approx.ftz (2^-130.5 flushes to 0); tl.exp is ex2.approx (e^-100 ~ 3.7e-44
    # stays a subnormal)
    x = torch.tensor([-130.5, -100.0])
    out = run(x, torch.ones(2), torch.zeros(2))
    assert out[0][0].item() == 0.0
    assert 0.0 < out[5][1].item() < 2.0**-126


@triton.jit
def _dot_kernel(A, B, OUT, TF32: tl.constexpr, N: tl.constexpr):
    r = tl.arange(0, N)
    offs = r[:, None] * N + r[None, :]
    a = tl.load(A + offs)
    b = tl.load(B + offs)
    if TF32:
        out = tl.dot(a, b, input_precision="tf32")
    else:
        out = tl.dot(a, b, input_precision="ieee")
    tl.store(OUT + offs, out)


def test_tf32_dot_drops_the_low_mantissa_bits():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 16, 16, generator=gen)
    out = torch.empty(2, 16, 16)
    _dot_kernel[(1,)](a, b, out[0], TF32=True, N=16)
    _dot_kernel[(1,)](a, b, out[1], TF32=False, N=16)

    def tf32(x):
        return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)

    torch.testing.assert_close(out[0], tf32(a) @ tf32(b), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1], a @ b, rtol=1e-6, atol=1e-6)
    assert (out[0] - a @ b).abs().max() > 1e-4  # TF32's error, far above fp32's


@triton.jit
def _bf16_kernel(X, Y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(Y + o, tl.load(X + o).to(tl.bfloat16))
    tl.store(Y + N, tl.load(X + 1).to(tl.bfloat16))  # a scalar too


def test_bf16_rounds_to_nearest_even():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2)) * 3
    y = torch.empty(4097, dtype=torch.bfloat16)
    _bf16_kernel[(1,)](x, y, N=4096)
    assert torch.equal(y[:-1], x.bfloat16())
    assert torch.equal(y[-1], x[1].bfloat16())
