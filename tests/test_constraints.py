"""Fused constraint losses (kernels/constraints.py) against cdds_fast.reference.constraints.

``constraint_losses`` returns ``(L_f, L_x, L_m)`` of one modality; the reference is
``reconstruction_loss(X, X^s, X^m)``, ``reconstruction_loss(X, x_semantic(X^s, mu, s, c, a), X^m)``
and ``modality_kl(X^m)``. Every output and all nine gradients (X, X^s, X^m, w_s, w_m, mu, s, c, a)
are compared, with random upstream gradients of the three losses. Inputs are fresh random tensors;
test ids name shape, dtype and path.
"""

from __future__ import annotations

import pytest
import torch

from cdds_fast.kernels.constraints import constraint_losses, constraints_forward
from cdds_fast.reference import column_stats, modality_kl, reconstruction_loss, x_semantic
from tests._inputs import assert_close, make_mask, subnormal_ulp

# Gradient tolerances, (dtype, atol, rtol, reason); atol is relative to max|expected|. The three
# losses are float32 for every input dtype and always use the float32 row: both sides compute in
# fp32 from the same input values, so they differ by summation order only.
TOLS = [
    (torch.float32, 1e-5, 1e-5,
     "fp32 math on both sides; summation order of the token/feature reductions differs "
     "(~1e-7 relative observed; the w/mu/s/c/a gradients sum B*N products, hence 1e-5)"),
    (torch.bfloat16, 1e-2, 1e-2,
     "gradients are fp32 on both sides, then rounded to bf16 (2^-8 = 3.9e-3 relative). They are "
     "compared with float64 (see check): atol (x max|f64|) bounds what the fp32 reference's own "
     "error does not explain, i.e. ~2.5 bf16 ulps at the largest entries"),
    (torch.float16, 2e-3, 2e-3,
     "as bf16 with fp16's 2^-11 = 4.9e-4 relative rounding (~4 ulps at the largest entries); "
     "gradients below fp16's smallest normal (6e-5) are subnormals, exact only to 2^-24 "
     "absolute, which floors atol (subnormal_ulp)"),
]
TOL = {dt: (atol, rtol) for dt, atol, rtol, _ in TOLS}
F32 = TOL[torch.float32]
# Reductions and low-precision gradients (see check): at most FACTOR times the fp32 reference's
# error vs float64, taken as the worst over N_ORDERS token orders, + atol. Over 50 random cases
# (the test shapes, fp32 and bf16) the kernel's error stayed below 0.3x that bound.
FACTOR = 10.0
N_ORDERS = 3
NAMES = ("tokens", "semantic", "modality", "w_s", "w_m", "mu", "s", "c", "a")


def make_inputs(batch, n, d, dtype, *, device, mask=None, dtypes=None, scale=1.0, m_scale=1.0):
    """Leaves ``(X, X^s, X^m, w_s, w_m, mu, s, c, a)``; ``dtypes`` overrides X/X^s/X^m dtypes."""
    dt_x, dt_s, dt_m = dtypes or (dtype, dtype, dtype)
    x = scale * torch.randn(batch, n, d, device=device)
    xs = 0.7 * x + 0.5 * scale * torch.randn_like(x)
    xm = m_scale * (0.3 * x / scale + 0.5 * torch.randn_like(x))
    w_s = 1.0 + 0.1 * torch.randn(d, device=device)
    w_m = 1.0 + 0.1 * torch.randn(d, device=device)
    c = 0.3 * scale * torch.randn(batch, d, device=device)
    a = scale * (0.5 + torch.rand(batch, d, device=device))
    fp16_max = 6.0e4  # keep fp16 inputs finite (max 65504)
    x, xs, xm = (t.clamp(-fp16_max, fp16_max) if dt == torch.float16 else t
                 for t, dt in ((x, dt_x), (xs, dt_s), (xm, dt_m)))
    x, xs, xm = x.to(dt_x), xs.to(dt_s), xm.to(dt_m)
    mu, s = column_stats(xs, mask)
    tensors = (x, xs, xm, w_s, w_m, mu, s, c + mu, a)
    return tuple(t.detach().requires_grad_() for t in tensors)


def reference(x, xs, xm, w_s, w_m, mu, s, c, a, mask):
    x_x = x_semantic(xs, mu, s, c, a)
    return torch.stack((
        reconstruction_loss(x, xs, xm, w_s, w_m, mask),
        reconstruction_loss(x, x_x, xm, w_s, w_m, mask),
        modality_kl(xm, mask),
    ))


def run(leaves, mask, **kw):
    """(losses, grads) of the kernel and of the reference, and the random upstream gradient."""
    g = torch.randn(3, device=leaves[0].device)
    out = constraint_losses(*leaves, mask, **kw)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    ref = reference(*leaves, mask)
    ref_grads = torch.autograd.grad((ref * g).sum(), leaves)
    return out, grads, ref, ref_grads, g


def reference_grads(leaves, mask, g_up, *, cast=None, permute=False):
    """Gradients of the reference, optionally in float64 or with every pair's tokens in a random
    order (the losses are invariant to it; only the rounding of the reductions changes)."""
    perm = torch.randperm(leaves[0].shape[1], device=leaves[0].device) if permute else None
    ls = [t.detach().to(cast or t.dtype) for t in leaves]
    if perm is not None:
        ls[:3] = [t[:, perm] for t in ls[:3]]
        mask = None if mask is None else mask[:, perm]
    ls = [t.requires_grad_() for t in ls]
    ref = reference(*ls, mask)
    grads = list(torch.autograd.grad((ref * g_up.to(ref.dtype)).sum(), ls))
    if perm is not None:
        inv = torch.argsort(perm)
        grads[:3] = [g[:, inv] for g in grads[:3]]
    return grads


def check(leaves, mask, **kw):
    """Losses and the elementwise gradients (X, X^s, X^m) of fp32 inputs elementwise against the
    fp32 reference. Against float64 instead -- the kernel's error within FACTOR times the worst
    fp32 reference error over N_ORDERS token orders, + atol -- go:
    (1) the reductions (w_s, w_m, mu, s, c, a): sums of B*N terms that may cancel, so their
        rounding error scales with sum |terms|, not with the result;
    (2) gradients of bf16/fp16 leaves: the reference reads X^m in three places (L_f, L_x, L_m) and
        autograd rounds each path's gradient to bf16 before summing them, so where the paths
        cancel the reference is off by ulps of the partial gradients; the kernel rounds once.
    """
    out, grads, ref, ref_grads, g_up = run(leaves, mask, **kw)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert_close(out, ref, F32, "losses (L_f, L_x, L_m)")
    anchored = None
    for i, (name, leaf, g, g_r) in enumerate(zip(NAMES, leaves, grads, ref_grads)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        if leaf.dtype == torch.float32 and i < 3:
            assert_close(g, g_r, F32, f"grad {name}")
            continue
        if anchored is None:
            g64s = reference_grads(leaves, mask, g_up, cast=torch.float64)
            g32s = [ref_grads] + [reference_grads(leaves, mask, g_up, permute=True)
                                  for _ in range(N_ORDERS - 1)]
            anchored = True
        g64 = g64s[i]
        err = (g.double() - g64).abs().max()
        err_ref = max((r[i].double() - g64).abs().max() for r in g32s)
        atol = TOL[leaf.dtype][0]
        bound = FACTOR * err_ref + atol * g64.abs().max() + subnormal_ulp(g.dtype)
        assert err <= bound, f"grad {name}: |kernel - f64| {err:.3e} > {bound:.3e} ({err_ref:.3e})"
    if mask is not None:
        for name, g in zip(NAMES[:3], grads[:3]):
            assert bool((g[~mask] == 0).all()), f"grad {name}: masked tokens must get 0"
    return out, grads


SHAPES = [
    pytest.param(4, 77, 512, True, 4096, id="realistic-text"),
    pytest.param(4, 50, 512, False, 4096, id="realistic-image"),
    pytest.param(1, 1, 1, False, 4096, id="B1-N1-D1"),
    pytest.param(3, 5, 37, True, 4096, id="D37-mask"),
    pytest.param(2, 9, 1, True, 4096, id="D1-mask"),
    pytest.param(1, 1, 37, True, 4096, id="N1"),
    # D wider than one block: per-token log-sum-exp kernel + D-chunk loops
    pytest.param(3, 6, 37, True, 16, id="D37-chunked-mask"),
    pytest.param(2, 33, 70, False, 32, id="D70-chunked"),
    pytest.param(2, 4, 1, False, 1, id="D1-chunk1"),
]


@pytest.mark.parametrize("dtype", [row[0] for row in TOLS], ids=str)
@pytest.mark.parametrize("batch,n,d,masked,cap", SHAPES)
def test_matches_reference(batch, n, d, masked, cap, dtype, device):
    mask = make_mask(batch, n, device=device) if masked else None
    leaves = make_inputs(batch, n, d, dtype, device=device, mask=mask)
    check(leaves, mask, block_d_cap=cap)


def test_mixed_input_dtypes(device):
    """Each tensor is loaded in its own dtype; each gradient comes back in its input's dtype."""
    mask = make_mask(3, 11, device=device)
    leaves = make_inputs(3, 11, 40, None, device=device, mask=mask,
                         dtypes=(torch.bfloat16, torch.float16, torch.float32))
    w_s, w_m = leaves[3], leaves[4]
    leaves = (*leaves[:3], w_s.detach().to(torch.bfloat16).requires_grad_(),
              w_m.detach().to(torch.float16).requires_grad_(), *leaves[5:])
    check(leaves, mask)


@pytest.mark.parametrize("cap", [4096, 16], ids=["one-block", "chunked"])
def test_one_valid_token_and_mostly_masked(cap, device):
    batch, n, d = 3, 77, 37
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask[0, 0] = True
    mask[1, 40] = True
    mask[2, :3] = True
    leaves = make_inputs(batch, n, d, torch.float32, device=device, mask=mask)
    check(leaves, mask, block_d_cap=cap)


def test_non_contiguous_inputs(device):
    batch, n, d = 2, 13, 24
    mask = make_mask(batch, n, device=device)
    leaves = make_inputs(batch, n, d, torch.float32, device=device, mask=mask)
    # the same values behind transposed storage ([B, D, N] memory) and a strided w
    views = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
             for t in leaves[:3]]
    w_s = torch.stack((leaves[3].detach(), leaves[3].detach()), 1)[:, 0].requires_grad_()
    assert not views[0].is_contiguous() and not w_s.is_contiguous()
    new = (*views, w_s, *leaves[4:])
    out, grads = check(new, mask)
    out_c, *_ = run(leaves, mask)
    torch.testing.assert_close(out, out_c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_magnitudes(dtype, device):
    """Tokens and semantic components ~1e4 (fp16: ~6e4, near its 65504 max): the losses are ~1e8
    to ~4e9, squares accumulate in fp32, everything stays finite and matches."""
    batch, n, d = 2, 19, 64
    # at least half the tokens valid: the fp16 gradients ~ 2 r / (D Ntok) then stay far below
    # 65504 (with a handful of tokens they could overflow fp16 legitimately, on both sides)
    mask = make_mask(batch, n, min_valid=n // 2, device=device)
    scale = 1e4 if dtype == torch.float32 else 2.0e4
    leaves = make_inputs(batch, n, d, dtype, device=device, mask=mask, scale=scale)
    if dtype == torch.float16:
        assert float(leaves[0].detach().abs().max()) > 3e4
    out, grads = check(leaves, mask)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy log(0), 0 * inf
@pytest.mark.parametrize("cap", [4096, 16], ids=["one-block", "chunked"])
def test_saturated_softmax_matches_reference_nan(cap, device):
    """X^m ~ 1e4: every softmax is one-hot, so some qbar_d underflows to exactly 0 and the
    reference's log(qbar) makes L_m NaN (and its X^m gradient NaN). The kernel reproduces that:
    L_m = sum q log q / Ntok - sum qbar log qbar is NaN for the same reason; L_f, L_x stay finite
    and match. Documented difference: the kernel's X^m gradient is NaN at the valid tokens and 0
    at masked ones, where the reference is NaN everywhere."""
    batch, n, d = 2, 9, 37
    mask = make_mask(batch, n, device=device)
    leaves = make_inputs(batch, n, d, torch.float32, device=device, mask=mask, m_scale=1e4)
    out, grads, ref, ref_grads, _ = run(leaves, mask, block_d_cap=cap)
    assert torch.isnan(ref[2]) and torch.isnan(out[2])
    assert_close(out[:2], ref[:2], F32, "L_f, L_x")
    assert torch.isnan(grads[2][mask]).all() and (grads[2][~mask] == 0).all()
    for name, g, g_r in zip(NAMES, grads, ref_grads):
        if name != "modality":
            assert_close(g, g_r, F32, f"grad {name}")


def test_uniform_softmax_and_constant_columns(device):
    """Constant X^m rows (q uniform: L_m = 0, no gradient) and constant X^s columns (s = 3e-3)."""
    batch, n, d = 2, 7, 19
    mask = make_mask(batch, n, device=device)
    x = torch.randn(batch, n, d, device=device)
    xs = torch.randn(batch, 1, d, device=device).expand(batch, n, d).contiguous()
    xm = torch.randn(batch, n, 1, device=device).expand(batch, n, d).contiguous()
    mu, s = column_stats(xs, mask)
    w_s, w_m = torch.ones(d, device=device), torch.ones(d, device=device)
    c, a = torch.randn_like(mu), torch.rand_like(s) + 0.5
    leaves = tuple(t.detach().requires_grad_() for t in (x, xs, xm, w_s, w_m, mu, s, c, a))
    out, grads = check(leaves, mask)
    assert abs(float(out[2].detach())) < 1e-6


def test_bad_input_raises_before_launch(device):
    leaves = [t.detach() for t in make_inputs(2, 3, 4, torch.float32, device=device)]
    x, xs, xm, w_s, w_m, mu, s, c, a = leaves
    with pytest.raises(TypeError, match="modality: expected dtype"):
        constraints_forward(x, xs, xm.double(), None, w_s, w_m, mu, s, c, a)
    with pytest.raises(ValueError, match=r"semantic: expected shape \[2, 3, 4\]"):
        constraint_losses(x, xs[:, :2], xm, w_s, w_m, mu, s, c, a)
    with pytest.raises(ValueError, match=r"w_m: expected shape \[D\] = \[4\], got \[5\]"):
        constraint_losses(x, xs, xm, w_s, torch.ones(5, device=device), mu, s, c, a)
    with pytest.raises(TypeError, match="c: expected dtype float32"):
        constraint_losses(x, xs, xm, w_s, w_m, mu, s, c.half(), a)
    with pytest.raises(ValueError, match=r"mask: expected shape \[B, N\] = \[2, 3\]"):
        constraint_losses(x, xs, xm, w_s, w_m, mu, s, c, a, torch.ones(3, 2, dtype=torch.bool))


def test_opcheck(device):
    """torch.library registration: schema, fake tensor, autograd registration, AOT dispatch."""
    mask = make_mask(2, 5, device=device)
    leaves = make_inputs(2, 5, 7, torch.float32, device=device, mask=mask)
    op = torch.ops.cdds_fast.constraint_losses.default
    torch.library.opcheck(op, (*leaves[:3], mask, *leaves[3:], 4096))
    torch.library.opcheck(op, (*leaves[:3], None, *leaves[3:], 4))
