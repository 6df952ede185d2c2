"""l2_normalize (kernels/normalize.py) against F.normalize: values and gradients.

On CPU the kernels run through the Triton interpreter (tests/conftest.py); fresh random inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cdds_fast.kernels.normalize import l2_normalize

# (dtype, atol, rtol, reason): outputs and gradients are rounded once to the input dtype after
# fp32 arithmetic; F.normalize divides where the kernel multiplies by the reciprocal (1 ulp).
TOLERANCES = [
    (torch.float32, 1e-6, 1e-5, "fp32 arithmetic; reciprocal-multiply vs division: ~1 ulp"),
    (torch.bfloat16, 1e-2, 1e-2, "result rounded to bf16 (2^-9 relative)"),
    (torch.float16, 1e-3, 1e-3, "result rounded to fp16 (2^-11 relative)"),
]
TOL = {dt: (atol, rtol) for dt, atol, rtol, _ in TOLERANCES}
DTYPES = [dt for dt, *_ in TOLERANCES]


def _compare(x0: torch.Tensor, grad: torch.Tensor) -> None:
    x = x0.clone().requires_grad_(True)
    y = l2_normalize(x)
    y.backward(grad)
    ref_x = x0.double().requires_grad_(True)
    ref = F.normalize(ref_x, dim=-1)
    ref.backward(grad.double())
    atol, rtol = TOL[x0.dtype]
    assert y.dtype == x0.dtype and y.shape == x0.shape and x.grad.dtype == x0.dtype
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    # grad_x = (g - y <g, y>) / |x| is a difference of terms of size |g| / |x| that cancel
    # (exactly, for D = 1): rounding is relative to them, per row, not to the result
    terms = grad.double().abs().amax(-1, keepdim=True) / (
        x0.double().norm(dim=-1, keepdim=True).clamp_min(1e-12))
    err = (x.grad.double() - ref_x.grad).abs()
    bound = atol * terms + rtol * ref_x.grad.abs()
    assert bool((err <= bound).all()), f"grad x: max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(4, 256, 512), (3, 37), (1, 1), (2, 5, 4100)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_f_normalize(shape, dtype):
    """Realistic (the stacked [4, B, D] pooled features), odd D, one element, and D above the
    block cap (the row looped in chunks)."""
    x = torch.randn(shape).to(dtype)
    _compare(x, torch.randn(shape).to(dtype))


def test_zero_and_tiny_rows_follow_the_eps_clamp():
    """A row with norm below eps is divided by eps and its gradient is g / eps (the clamp makes
    the denominator a constant), as F.normalize."""
    x = torch.randn(4, 9)
    x[1] = 0.0
    x[2] = 1e-14
    _compare(x, torch.randn(4, 9))


def test_non_contiguous_input():
    base = torch.randn(8, 33)
    x = base[::2, 1:]  # strided rows, offset columns
    assert not x.is_contiguous()
    _compare(x, torch.randn(x.shape))


@pytest.mark.parametrize("bad,exc,match", [
    (torch.ones(3, 4, dtype=torch.float64), TypeError, "x: expected dtype float32"),
    (torch.ones(3, 0), ValueError, r"x: expected shape \[..., D\] with D >= 1"),
    ([1.0, 2.0], TypeError, "x: expected a torch.Tensor"),
])
def test_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        l2_normalize(bad)


def test_custom_op_opcheck():
    torch.library.opcheck(torch.ops.cdds_fast.l2_normalize, (torch.randn(3, 7),))
