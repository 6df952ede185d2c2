"""Column statistics kernel (kernels/stats.py) against cdds_fast.reference.column_stats.

Inputs are fresh random tensors every run; each test id names shape, dtype and mask so a failure
reproduces by shape. Runs natively on CUDA and through the Triton interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch

from cdds_fast.kernels.stats import column_stats
from cdds_fast.reference import column_stats as ref_column_stats
from tests._inputs import assert_close, make_mask, subnormal_ulp

# Gradient tolerances, (dtype, atol, rtol, reason). atol is relative to max|expected|.
# mu and s are float32 for every input dtype and are always checked with the float32 row: both
# sides compute them in fp32 from the same input values, so they differ by summation order only.
TOLS = [
    (
        torch.float32,
        1e-6,
        1e-5,
        "fp32 math on both sides; only the summation order of the token reductions differs "
        "(~N * 2^-24 relative at worst, ~1e-7 observed)",
    ),
    (
        torch.bfloat16,
        1e-2,
        1e-2,
        "gradient computed in fp32 on both sides, then rounded to bf16 (2^-8 = 3.9e-3 relative): "
        "fp32 values a few ulp apart may round to neighbouring bf16 values (1 bf16 ulp)",
    ),
    (
        torch.float16,
        2e-3,
        2e-3,
        "as bf16 with fp16's 2^-11 = 4.9e-4 relative rounding: 1 fp16 ulp plus fp32 noise; "
        "gradients below fp16's smallest normal (6e-5) are subnormals, exact only to 2^-24 "
        "absolute, which floors atol (subnormal_ulp)",
    ),
]
TOL = {dt: (atol, rtol) for dt, atol, rtol, _ in TOLS}
F32 = TOL[torch.float32]


def run_all(x, mask):
    """(mu, s, grad_x) of the kernel, the fp32 reference and the float64 reference, with the same
    random upstream gradients of mu AND s."""
    g_mu = torch.randn(x.shape[0], x.shape[2], device=x.device)
    g_s = torch.randn_like(g_mu)
    out = []
    for fn, cast in (
        (column_stats, None),
        (ref_column_stats, None),
        (ref_column_stats, torch.float64),
    ):
        xi = x.detach().to(cast or x.dtype).requires_grad_()
        mu, s = fn(xi, mask)
        loss = (mu * g_mu.to(mu.dtype)).sum() + (s * g_s.to(s.dtype)).sum()
        (g,) = torch.autograd.grad(loss, xi)
        out.append((mu, s, g))
    return out


def check(x, mask, dtype, *, conditioned=False):
    """Forward and backward against the reference.

    ``conditioned=True`` is for inputs where ``zeta = (x - mu) / s`` is dominated by the rounding
    error of the mean (zero or tiny variance next to a large mean): the fp32 reference's own
    gradient is then off by up to ~1e-3 relative, so the gradient is checked against float64
    instead: the kernel must be at least as accurate as the fp32 reference (+ the table's atol).
    """
    (mu, s, gx), (mu_r, s_r, gx_r), (mu_64, s_64, gx_64) = run_all(x, mask)
    assert mu.dtype == s.dtype == torch.float32
    assert gx.dtype == x.dtype and gx.shape == x.shape
    if conditioned:
        # also mu and s: with a few valid tokens of spread ~1 next to a mean ~1e4, the reference's
        # variance carries the square of its mean's rounding error (~2.5e-7 / var relative); the
        # kernel's corrected two-pass removes it
        for name, ours, ref, exact, tol in (
            ("mu", mu, mu_r, mu_64, F32),
            ("s", s, s_r, s_64, F32),
            ("grad_x", gx, gx_r, gx_64, TOL[dtype]),
        ):
            err = (ours.double() - exact).abs().max()
            err_ref = (ref.double() - exact).abs().max()
            bound = err_ref + tol[0] * exact.abs().max() + subnormal_ulp(ours.dtype)
            assert err <= bound, f"{name}: |kernel - f64| {float(err):.3e} > {float(bound):.3e}"
    else:
        assert_close(mu, mu_r, F32, "mu")
        assert_close(s, s_r, F32, "s")
        assert_close(gx, gx_r, TOL[dtype], "grad_x")
    if mask is not None:
        assert bool((gx[~mask] == 0).all()), "masked tokens must get zero gradient"
    return mu, s, gx


SHAPES = [
    pytest.param(4, 77, 512, id="realistic-text"),
    pytest.param(4, 50, 512, id="realistic-image"),
    pytest.param(1, 1, 1, id="B1-N1-D1"),
    pytest.param(3, 5, 37, id="D37"),
    pytest.param(2, 9, 1, id="D1"),
    pytest.param(1, 130, 3, id="N130-D3"),
]


@pytest.mark.parametrize("dtype", [row[0] for row in TOLS], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("batch,n,d", SHAPES)
def test_matches_reference(batch, n, d, masked, dtype, device):
    x = (0.5 + 2.0 * torch.randn(batch, n, d, device=device)).to(dtype)
    mask = make_mask(batch, n, device=device) if masked else None
    check(x, mask, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_valid_token_and_mostly_masked(dtype, device):
    batch, n, d = 3, 77, 37
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask[0, 0] = True  # a single valid token: var = 0, s = sqrt(1e-5)
    mask[1, 40] = True  # a single valid token in the middle
    mask[2, :3] = True  # most tokens masked
    x = torch.randn(batch, n, d, device=device).to(dtype)
    mu, s, _ = check(x, mask, dtype)
    torch.testing.assert_close(s[:2], torch.full_like(s[:2], 1e-5**0.5))
    torch.testing.assert_close(mu[0], x[0, 0].float())


def test_non_contiguous_input(device):
    base = torch.randn(3, 37, 21, device=device)  # [B, D, N] storage
    x = base.transpose(1, 2)  # [B, N, D] view with strides (.., 1, N)
    assert not x.is_contiguous()
    mask = make_mask(3, 21, device=device)
    check(x, mask, torch.float32)
    # strided slice along tokens
    y = torch.randn(2, 40, 16, device=device)[:, ::2]
    check(y, None, torch.float32)


@pytest.mark.parametrize("dtype", [row[0] for row in TOLS], ids=str)
def test_constant_columns(dtype, device):
    """Zero variance: s = sqrt(1e-5) and zeta is pure rounding error of the mean over 3e-3. The
    kernel's corrected two-pass makes the deviations exactly 0 (the fp32 reference leaves
    ~ulp(mean)/s), so its gradient is the more accurate one: checked against float64."""
    batch, n, d = 2, 33, 19
    x = (torch.randn(batch, 1, d, device=device) * 3).expand(batch, n, d).to(dtype)
    mask = make_mask(batch, n, device=device)
    _, s, gx = check(x, mask, dtype, conditioned=True)
    torch.testing.assert_close(s, torch.full_like(s, 1e-5**0.5))
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("dtype", [row[0] for row in TOLS], ids=str)
def test_large_magnitudes(dtype, device):
    """Large spread (1e4) and a large offset with a small spread (two-pass keeps the variance)."""
    batch, n, d = 2, 50, 24
    check((1e4 * torch.randn(batch, n, d, device=device)).to(dtype), None, dtype)
    x = (1e4 + torch.randn(batch, n, d, device=device)).to(dtype)
    check(x, make_mask(batch, n, device=device), dtype, conditioned=True)


def test_fp16_near_overflow(device):
    """Values ~6e4 (fp16 max 65504): sums and squares are fp32, so everything stays finite."""
    batch, n, d = 2, 40, 24
    x = (6.0e4 - 5.0e3 * torch.rand(batch, n, d, device=device)).to(torch.float16)
    x[:, :, :3] = -x[:, :, :3]
    mu, s, gx = check(x, make_mask(batch, n, device=device), torch.float16, conditioned=True)
    assert torch.isfinite(mu).all() and torch.isfinite(s).all() and torch.isfinite(gx).all()


def test_only_mu_or_only_s_needed(device):
    """An unused output (None upstream gradient) is treated as zero."""
    x = torch.randn(2, 7, 5, device=device, requires_grad=True)
    mu, _ = column_stats(x)
    (g,) = torch.autograd.grad(mu.sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 1 / 7))
    _, s = column_stats(x)
    (g,) = torch.autograd.grad(s.sum(), x)
    mu_r, s_r = ref_column_stats(x)
    (g_r,) = torch.autograd.grad(s_r.sum(), x)
    torch.testing.assert_close(g, g_r)


def test_bad_input_raises_before_launch(device):
    x = torch.randn(2, 3, 4, device=device)
    with pytest.raises(TypeError, match="x: expected dtype"):
        column_stats(x.to(torch.int32))
    with pytest.raises(TypeError, match="x: expected dtype"):
        column_stats(x.double())
    with pytest.raises(ValueError, match=r"x: expected a \[B, N, D\]"):
        column_stats(x[0])
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
        column_stats(x, torch.ones(2, 3, device=device))
    with pytest.raises(ValueError, match=r"mask: expected shape \[B, N\] = \[2, 3\], got \[2, 4\]"):
        column_stats(x, torch.ones(2, 4, dtype=torch.bool, device=device))


def test_opcheck(device):
    """torch.library registration: schema, fake tensor, autograd registration, AOT dispatch."""
    x = torch.randn(2, 5, 7, device=device, requires_grad=True)
    mask = make_mask(2, 5, device=device)
    torch.library.opcheck(torch.ops.cdds_fast.column_stats.default, (x, mask))
    torch.library.opcheck(torch.ops.cdds_fast.column_stats.default, (x, None))
