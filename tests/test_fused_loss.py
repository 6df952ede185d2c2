"""The fused CDDS loss (cdds_fast.fused_loss.cdds_loss_triton) against the reference cdds_loss.

Every output term and EVERY gradient (tokens, semantic, modality of both modalities, alpha_image,
alpha_text, the four w, logit_scale) is compared, for fp32 / bf16 / fp16 inputs, on fresh random
inputs (test ids name shape, dtype and regime).

Two regimes, because the CDDS loss is not uniformly well conditioned:

* **smooth** (``test_matches_reference``): alpha = -30, so ``k = mean + alpha * std`` is far below
  every ``Pr`` and ``relu(Pr - k)`` is active everywhere, and every text row has at least half its
  tokens valid (no near-zero column std). The loss is then smooth and well conditioned; every
  output and gradient is compared elementwise with the table below.
* **conditioned** (``test_matches_reference_conditioned`` and the extreme-value tests): default
  alpha, odd shapes (P = 1, texts of one valid token, most tokens masked, D = 1) and extreme
  values. Three properties of the function (not of an implementation) make an elementwise fp32
  comparison meaningless there: (1) ``W = relu(Pr - k) / sum`` has kinks: a ``Pr`` within rounding
  of its threshold takes the other one-sided derivative, so the alpha / semantic gradients of two
  correct fp32 implementations differ by O(1) at such points -- ``repair_alpha`` moves every
  alpha_i to a value whose thresholds keep a relative margin of 1e-5 from all kinks (as
  tests/test_sampling.py does for the sampling op alone); (2) a column with one valid token has
  ``s = sqrt(1e-5)``, the Gaussian KL scales as ``1 / s^2`` and the loss amplifies rounding of the
  statistics by up to ~1e5; (3) with D = 1, ``normalize`` of a 1-vector has gradient exactly 0,
  which fp32 computes as rounding noise / |mu|. So every tensor is checked against the float64
  reference: the fast path's error must be within ``FACTOR`` times the fp32 reference's own
  error (the worst over ``N_ORDERS`` evaluations with the rounding perturbed, see
  ``run_reference_perturbed``) + atol.

Gradients of bf16/fp16 leaves are checked against float64 that way in both regimes (see
:func:`check`): the fp32 gradients of the two sides differ by reduction order before each is
rounded once to the leaf's dtype.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cdds_fast.contract import LOSS_KEYS, VECTOR_NAMES
from cdds_fast.fused_loss import cdds_loss_triton
from cdds_fast.reference import cdds_loss as reference_cdds_loss
from tests._inputs import (
    TENSOR_NAMES,
    assert_close,
    expect_device_assertion,
    loss_kwargs,
    make_inputs,
    subnormal_ulp,
)
from tests.conftest import DEVICE

# (dtype, atol, rtol, reason); atol is relative to max|expected|. The five loss terms are fp32
# for every input dtype and always use the fp32 row (both sides compute in fp32 from the same
# input values). Gradients of tensors of a given dtype use that dtype's row.
TOLS = [
    (
        torch.float32,
        1e-5,
        1e-4,
        "fp32 math on both sides; the loss chains ~6 reductions (stats -> softmax over D -> W -> "
        "c, a -> InfoNCE / constraint sums) in different orders; alpha and semantic gradients sum "
        "thousands of terms with cancellation (<= ~5e-6 of max observed)",
    ),
    (
        torch.bfloat16,
        1e-2,
        1e-2,
        "gradients are fp32 on both sides, then rounded to bf16 (2^-8 = 3.9e-3 relative). They are "
        "compared with float64 (see check): atol (x max|f64|) bounds what the fp32 reference's own "
        "error does not explain, i.e. ~2.5 bf16 ulps at the largest entries",
    ),
    (
        torch.float16,
        2e-3,
        2e-3,
        "as bf16 with fp16's 2^-11 = 4.9e-4 relative rounding (~4 ulps at the largest entries); "
        "gradients below fp16's smallest normal (6e-5) are subnormals, exact only to 2^-24 "
        "absolute, which floors atol (subnormal_ulp)",
    ),
]
TOL = {dt: (atol, rtol) for dt, atol, rtol, _ in TOLS}
F32 = TOL[torch.float32]
# Gradients that flow back through the related-weights op (kernels/sampling.py) -- alpha_image,
# alpha_text, and the semantic components via d(mu, s) -- inherit its accuracy, specified vs
# float64 as 1e-4 of max|grad| (tests/test_sampling.py: the chain 1/Z, softmax, 1/(D std)
# amplifies rounding). With B = 1 or saturated Pr the alpha gradients are tiny (~1e-6) and both
# sides sit at that noise floor.
SAMPLING_TOL = (1e-4, 1e-4)
THROUGH_SAMPLING = ("alpha_image", "alpha_text", "image_semantic", "text_semantic")
# Conditioned regime: the fast path may be this many times less accurate (vs float64) than the
# fp32 reference itself. Observed ratios are <= ~5 (the two fp32 paths round differently; at a
# kink either one may take the other one-sided derivative).
FACTOR = 10.0
# ... where the fp32 reference's error is the worst over this many evaluations: as is, and with
# the tokens in a random order and the statistics one ulp off (run_reference_perturbed) -- the
# rounding differences another correct implementation has; where the loss is ill conditioned
# they move the reference as far as they move the fast path.
N_ORDERS = 3

#: The 13 leaves of a loss call: six token tensors, six [D] vectors, the scale.
LEAF_NAMES = (*TENSOR_NAMES[:6], *VECTOR_NAMES, "logit_scale")
PARAM_NAMES = LEAF_NAMES[6:12]
ALPHA_NAMES = ("alpha_image", "alpha_text")


def text_mask(batch, length, *, min_valid, device):
    lengths = torch.randint(min_valid, length + 1, (batch,), device=device)
    return torch.arange(length, device=device)[None, :] < lengths[:, None]


def inputs(batch, patches, length, dim, dtype, device, *, mask=None, smooth=False):
    if mask is None:
        mask = text_mask(
            batch, length, min_valid=max(1, length // 2) if smooth else 1, device=device
        )
    tensors, params = make_inputs(
        batch, patches, length, dim, dtype=dtype, device=device, mask=mask
    )
    if smooth:
        with torch.no_grad():
            for key in ("alpha_image", "alpha_text"):
                params[key].copy_(-30.0 + torch.randn_like(params[key]))
    return list(tensors), params


def repair_alpha(tensors, params, *, margin=1e-5, candidates=48, rho=0.01):
    """Move every alpha_i to a value whose thresholds keep a relative margin from all kinks.

    ``W = relu(Pr - k) / sum`` with ``k = min(mean + alpha std, (1 - rho) max)`` has a derivative
    jump where some ``Pr_bij`` crosses ``k_bi`` or where the two arguments of the min tie; two
    correct fp32 implementations (whose statistics differ by ~1e-7) then take different one-sided
    derivatives of the alpha / semantic gradients. For each column ``i`` (alpha is shared by all
    pairs) this picks, among random candidates in [-1, 3], the one maximising
    ``min_b min(min_j |Pr - k|, |t1 - t2|) / max_j Pr`` (float64 statistics of the inputs), and
    asserts the margin is reached -- so no kink lies within rounding of the test inputs.
    """
    from cdds_fast.reference import column_stats
    from cdds_fast.reference.related import related_probabilities

    mask = tensors[6]
    mu_v, s_v = column_stats(tensors[1].detach().double())
    mu_t, s_t = column_stats(tensors[4].detach().double(), mask)
    for key, (ms, ss, md, sd) in (
        ("alpha_image", (mu_v, s_v, mu_t, s_t)),
        ("alpha_text", (mu_t, s_t, mu_v, s_v)),
    ):
        pr = related_probabilities(ms, ss, md, sd)  # [B, D, D]
        mean, mx = pr.mean(-1), pr.amax(-1)
        std = ((pr - mean[..., None]) ** 2).mean(-1).sqrt()
        alpha = params[key]
        cand = -1.0 + 4.0 * torch.rand(
            candidates, alpha.shape[0], dtype=torch.float64, device=alpha.device
        )
        best, best_margin = cand[0], torch.full_like(cand[0], -1.0)
        for c in cand:
            t1, t2 = mean + c * std, (1.0 - rho) * mx
            k = torch.minimum(t1, t2)
            m = torch.minimum((pr - k[..., None]).abs().amin(-1), (t1 - t2).abs()) / mx
            m = m.amin(0)  # worst pair, per column
            better = m > best_margin
            best = torch.where(better, c, best)
            best_margin = torch.where(better, m, best_margin)
        ok = best_margin > margin
        if not bool(ok.all()):  # e.g. D = 1 (std = 0: alpha is irrelevant, the min never ties)
            ok = ok | (std.amax(0) == 0)
        assert bool(ok.all()), (
            f"{key}: no candidate keeps margin {margin} for {int((~ok).sum())} columns"
        )
        with torch.no_grad():
            alpha.copy_(best.to(alpha.dtype))
    return params


def run(fn, tensors, params, *, cast=None, **kw):
    """Loss terms and the gradients of their sum w.r.t. all 13 leaves (fresh leaves per call)."""
    leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in tensors[:6]]
    p = {k: v.detach().to(cast or v.dtype).requires_grad_() for k, v in params.items()}
    out = fn(*leaves, tensors[6], **p, **kw)
    assert list(out) == list(LOSS_KEYS)
    grads = torch.autograd.grad(sum(out.values()), [*leaves, *p.values()])
    return out, dict(zip(LEAF_NAMES, grads, strict=True))


def run_reference_perturbed(tensors, params, **kw):
    """The fp32 reference as another correct fp32 implementation might round it: every pair's
    tokens in a random order (text mask alongside; the loss is invariant to it, only the
    rounding of the token reductions changes) and the column statistics moved by one ulp in a
    random direction (what a differently ordered reduction inside the statistics or the
    related-weights op does). Every gradient is rounded to its leaf's dtype once, as the fast
    path's. Gradients are returned in the original token order."""
    import cdds_fast.reference.loss as reference_loss

    perm_v = torch.randperm(tensors[0].shape[1], device=tensors[0].device)
    perm_t = torch.randperm(tensors[3].shape[1], device=tensors[3].device)
    permuted = [t[:, perm_v] for t in tensors[:3]] + [t[:, perm_t] for t in tensors[3:7]]
    exact_stats = reference_loss.column_stats

    def stats_one_ulp_off(x, mask=None):
        mu, s = exact_stats(x, mask)
        ulp = torch.finfo(mu.dtype).eps
        return tuple(v * (1 + ulp * torch.randint_like(v, 0, 2).mul(2).sub(1)) for v in (mu, s))

    leaves = [t.detach().requires_grad_() for t in permuted[:6]]
    p = {k: v.detach().requires_grad_() for k, v in params.items()}
    reference_loss.column_stats = stats_one_ulp_off
    try:
        out = reference_cdds_loss(*leaves, permuted[6], **p, **kw)
    finally:
        reference_loss.column_stats = exact_stats
    grads = dict(
        zip(LEAF_NAMES, torch.autograd.grad(sum(out.values()), [*leaves, *p.values()]), strict=True)
    )
    inv_v, inv_t = torch.argsort(perm_v), torch.argsort(perm_t)
    for i, name in enumerate(LEAF_NAMES[:6]):
        grads[name] = grads[name][:, inv_v if i < 3 else inv_t]
    return out, grads


def _within_fp32_reference_error(name, fast, r32s, r64, tol, scale=None):
    """max|fast - f64| <= FACTOR * max_k max|fp32 reference_k - f64| + atol * scale, with the
    fp32 reference evaluated ``len(r32s)`` times with its rounding perturbed (its error is itself
    a random variable; the worst of a few evaluations is a stable yardstick); ``scale`` defaults
    to max|f64|."""
    r32 = r32s[0]
    if not (bool(torch.isfinite(r64).all()) and bool(torch.isfinite(r32).all())):
        # the reference itself is non-finite (or overflows the gradient dtype): the fast path
        # must be non-finite at the same places
        torch.testing.assert_close(fast.isfinite(), r32.isfinite(), msg=name)
        return
    assert bool(torch.isfinite(fast).all()), f"{name}: non-finite values"
    err = (fast.double() - r64).abs().max()
    err_ref = max((r.double() - r64).abs().max() for r in r32s)
    scale = r64.abs().max() if scale is None else max(scale, r64.abs().max())
    bound = FACTOR * err_ref + tol[0] * scale + subnormal_ulp(fast.dtype)
    assert err <= bound, f"{name}: |fast - f64| = {err:.3e} > {bound:.3e} (fp32 ref {err_ref:.3e})"


def check(tensors, params, *, conditioned=False, fast=cdds_loss_triton, floors=None, **kw):
    """Compare all five terms and all 13 gradients with the reference (``fast(*tensors,
    **params, **kw)`` against ``reference_cdds_loss`` with the same keywords).

    Smooth regime: fp32 quantities elementwise against the fp32 reference (table tolerance).
    Gradients of bf16/fp16 leaves, and everything in the conditioned regime, against the float64
    reference with the fp32 reference's own error as the yardstick (see module docstring;
    ``N_ORDERS`` perturbed evaluations): both round every gradient to its leaf's dtype once, from
    fp32 values that differ by reduction order, so a 16-bit gradient's error is its rounding
    (``TOLS``) plus what the fp32 reference's own error explains. ``floors`` adds natural scales
    (see below) for terms whose value can vanish while their parts do not.
    """
    out, grads = run(fast, tensors, params, **kw)
    ref, ref_grads = run(reference_cdds_loss, tensors, params, **kw)
    ref64, ref64_grads = run(reference_cdds_loss, tensors, params, cast=torch.float64, **kw)
    refs = [(ref, ref_grads)] + [
        run_reference_perturbed(tensors, params, **kw) for _ in range(N_ORDERS - 1)
    ]
    leaves = dict(zip(LEAF_NAMES, [*tensors[:6], *params.values()], strict=True))
    # The [D] parameter vectors share one scale: a gradient that vanishes mathematically (alpha
    # when every Pr is saturated, e.g. texts of one token) is rounding noise of terms that cancel,
    # and those terms are the size of the other parameters' gradients, not of its own ~0.
    param_scale = max(ref64_grads[n].abs().max() for n in PARAM_NAMES)
    # InfoNCE = logsumexp - logit with logits of size ~logit_scale: fp32 gives the two InfoNCE
    # terms an absolute accuracy ~eps * logit_scale however small their value (a well aligned
    # batch has L_s ~ 1e-5), and d L / d logit_scale is a sum of probability x cosine terms of
    # size <= 1. These are their natural scales when the value itself is smaller.
    floors = {
        "contrastive_loss": float(params["logit_scale"]),
        "semantic_loss": float(params["logit_scale"]),
        "logit_scale": 1.0,
        **(floors or {}),
    }
    for k in LOSS_KEYS:
        assert out[k].dtype == torch.float32 and out[k].dim() == 0, k
        if conditioned:
            _within_fp32_reference_error(
                k, out[k], [r[k] for r, _ in refs], ref64[k], F32, scale=floors.get(k)
            )
        else:
            assert_close(out[k], ref[k], F32, k, scale=floors.get(k))
    for name, leaf in leaves.items():
        g = grads[name]
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        smooth_fp32 = leaf.dtype == torch.float32 and not conditioned
        if smooth_fp32 and name not in ALPHA_NAMES:
            tol = SAMPLING_TOL if name in THROUGH_SAMPLING else F32
            assert_close(g, ref_grads[name], tol, f"grad {name}", scale=floors.get(name))
        else:
            # The alphas' fp32 gradients in the smooth regime (alpha ~ -30: every Pr above the
            # threshold) are what is left of terms that cancel over j and over pairs, so two fp32
            # sums agree elementwise only by luck (1 % apart at B = 4, D = 512, a few seeds in a
            # hundred). They take the float64 yardstick too, on their own scale: the shared
            # one (param_scale) would exceed them and let anything pass.
            tol = TOL[leaf.dtype]
            if name in THROUGH_SAMPLING:
                tol = max(tol, SAMPLING_TOL)
            _within_fp32_reference_error(
                f"grad {name}",
                g,
                [rg[name] for _, rg in refs],
                ref64_grads[name],
                tol,
                scale=param_scale if name in PARAM_NAMES and not smooth_fp32 else floors.get(name),
            )
    return out, grads


def check_smooth(tensors, params):
    return check(tensors, params)


def check_conditioned(tensors, params, **kw):
    return check(tensors, params, conditioned=True, **kw)


# ------------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------------

SMOOTH_SHAPES = [
    ((4, 50, 77, 512), "realistic"),
    ((3, 6, 12, 37), "D37"),
    ((1, 4, 6, 16), "B1"),
]
SMOOTH_CASES = [
    pytest.param(*shape, dtype, id=f"{name}-{str(dtype)[6:]}")
    for shape, name in SMOOTH_SHAPES
    for dtype in (row[0] for row in TOLS)
]


@pytest.mark.parametrize("batch,patches,length,dim,dtype", SMOOTH_CASES)
def test_matches_reference(batch, patches, length, dim, dtype, device):
    tensors, params = inputs(batch, patches, length, dim, dtype, device, smooth=True)
    check_smooth(tensors, params)


def _one_token_texts(batch, length, device):
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return mask


def _mostly_masked(batch, length, device):
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, :2] = True
    mask[0, 5] = True
    return mask


CONDITIONED = [
    pytest.param(4, 50, 77, 512, None, torch.float32, id="realistic-default-alpha-fp32"),
    pytest.param(4, 50, 77, 512, None, torch.bfloat16, id="realistic-default-alpha-bf16"),
    pytest.param(3, 5, 4, 37, None, torch.float32, id="D37-fp32"),
    pytest.param(3, 5, 4, 37, None, torch.float16, id="D37-fp16"),
    pytest.param(2, 3, 4, 1, None, torch.float32, id="D1"),
    pytest.param(1, 1, 1, 1, None, torch.float32, id="B1-P1-L1-D1"),
    pytest.param(3, 1, 6, 24, None, torch.bfloat16, id="P1"),
    pytest.param(3, 7, 9, 24, _one_token_texts, torch.float32, id="one-token-texts"),
    pytest.param(3, 7, 40, 24, _mostly_masked, torch.float16, id="mostly-masked"),
]


@pytest.mark.parametrize("batch,patches,length,dim,make_mask,dtype", CONDITIONED)
def test_matches_reference_conditioned(batch, patches, length, dim, make_mask, dtype, device):
    mask = make_mask(batch, length, device) if make_mask else None
    tensors, params = inputs(batch, patches, length, dim, dtype, device, mask=mask)
    check_conditioned(tensors, repair_alpha(tensors, params))


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 4),
    patches=st.integers(1, 7),
    length=st.integers(1, 9),
    dim=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_matches_reference(batch, patches, length, dim, dtype, seed):
    """Random small shapes (B = 1, one token, D = 1 included) and values, all five terms and all
    13 gradients against the reference with the conditioned yardstick; the seed is drawn by
    hypothesis, so a failure reproduces."""
    torch.manual_seed(seed)
    tensors, params = inputs(batch, patches, length, dim, dtype, DEVICE)
    check_conditioned(tensors, repair_alpha(tensors, params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_constant_columns(dtype, device):
    """Tiny variances: constant semantic columns give s = sqrt(1e-5) on both sides."""
    tensors, params = inputs(3, 6, 8, 20, dtype, device)
    with torch.no_grad():
        tensors[1][:, :, :5] = tensors[1][:, :1, :5]
        tensors[4][:, :, 3:9] = 0.25
    out, grads = check_conditioned(tensors, repair_alpha(tensors, params))
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float16, 2.0e4)], ids=str)
def test_large_magnitudes(dtype, scale, device):
    """Tokens and components ~1e4 (fp16: up to ~6e4, near its 65504 max), modality components
    at unit scale: every term and gradient stays finite and matches."""
    # at least half the text tokens valid so the fp16 gradients (~ 2 r / (D Ntok)) stay far below
    # 65504 -- with fewer tokens they could overflow fp16 legitimately, on both sides
    tensors, params = inputs(
        3, 6, 8, 64, torch.float32, device, mask=text_mask(3, 8, min_valid=4, device=device)
    )
    with torch.no_grad():
        tensors = [t.detach() for t in tensors]
        for i in (0, 1, 3, 4):
            tensors[i] = (tensors[i] * scale).clamp(-6.0e4, 6.0e4)
        tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    if dtype == torch.float16:
        assert float(tensors[0].abs().max()) > 3e4
    out, grads = check_conditioned(tensors, repair_alpha(tensors, params))
    assert all(torch.isfinite(v) for v in out.values())
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy log(0), 0 * inf
def test_saturated_modality_softmax_is_nan_like_reference(device):
    """Modality components ~1e4 saturate every softmax: some qbar_d is exactly 0 and the
    reference's L_m is NaN (log 0 in KL(q || qbar)). The fast path gives NaN there too; the other
    four terms stay finite and equal."""
    tensors, params = inputs(2, 5, 6, 24, torch.float32, device)
    with torch.no_grad():
        tensors[2] = tensors[2].detach() * 1e4
        tensors[5] = tensors[5].detach() * 1e4
    out, _ = run(cdds_loss_triton, tensors, params)
    ref, _ = run(reference_cdds_loss, tensors, params)
    assert torch.isnan(ref["modality_loss"]) and torch.isnan(out["modality_loss"])
    for k in LOSS_KEYS:
        if k != "modality_loss":
            assert_close(out[k], ref[k], F32, k)


# ------------------------------------------------------------------------------------------------
# the x-semantic pooled path, layout, dtypes, errors, dispatch, torch.compile
# ------------------------------------------------------------------------------------------------


def test_pooled_x_semantic_is_normalized_c(device):
    """pool(X^x) of the materialised X^x (reference) equals normalize(c) (fast path) to rounding,
    and its gradient w.r.t. X^s through zeta (and mu, s) is zero to rounding."""
    from cdds_fast.kernels.stats import column_stats
    from cdds_fast.reference import pool, related_weights, sampling_coefficients, x_semantic

    tensors, params = inputs(4, 9, 12, 32, torch.float32, device)
    mask = tensors[6]
    for semantic, m in ((tensors[1], None), (tensors[4], mask)):
        xs = semantic.detach().requires_grad_()
        mu, s = column_stats(xs, m)
        w = related_weights(
            mu.detach(),
            s.detach(),
            mu.detach().flip(0),
            s.detach().flip(0),
            params["alpha_image"].detach(),
        )
        c, a = sampling_coefficients(w, mu.detach().flip(0), s.detach().flip(0))
        pooled = pool(x_semantic(xs, mu, s, c, a), m)
        # mean_n zeta_n = (mean_n x_n - mu) / s is 0 up to the rounding of the mean, so pool(X^x)
        # differs from normalize(c) by ~eps * |a| mean|x| / s (plus eps * mean|X^x|) relative to
        # |c|: a column with a large mean and a small spread amplifies it (seen up to 3x that
        # scale in 220 random cases; a fixed 1e-6 failed 1 case in 150)
        weights = torch.ones(xs.shape[:2], device=xs.device) if m is None else m.float()
        count = weights.sum(1, keepdim=True)
        x_abs_mean = (xs.detach().abs() * weights[..., None]).sum(1) / count
        x_x = x_semantic(xs, mu, s, c, a).detach()
        xx_abs_mean = (x_x.abs() * weights[..., None]).sum(1) / count
        terms = (a.abs() * x_abs_mean / s.detach() + xx_abs_mean) / c.norm(dim=-1, keepdim=True)
        err = (pooled.detach() - F.normalize(c, dim=-1)).abs()
        bound = 16 * torch.finfo(torch.float32).eps * terms + 1e-7
        assert bool((err <= bound).all()), (
            f"pool(X^x) vs normalize(c): excess {(err - bound).max().item():.3g}"
        )
        up = torch.randn_like(pooled)
        (g,) = torch.autograd.grad((pooled * up).sum(), xs)
        # the direct path through zeta alone (mu, s held fixed) is what the mu and s paths cancel;
        # the sum of the three is rounding (<= 5e-6 of the direct path over 200 random cases)
        direct = pool(x_semantic(xs, mu.detach(), s.detach(), c, a), m)
        (g_direct,) = torch.autograd.grad((direct * up).sum(), xs)
        assert float(g.abs().max()) <= 1e-4 * float(g_direct.abs().max()), (
            "d pool(X^x) / d X^s must vanish (to rounding of the cancelling paths)"
        )


def test_non_contiguous_inputs(device):
    tensors, params = inputs(3, 6, 8, 20, torch.float32, device, smooth=True)
    strided = [t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in tensors[:6]]
    assert not any(t.is_contiguous() for t in strided)
    wide = torch.stack([params["w_s_text"].detach()] * 2, 1)[:, 1]
    p2 = {**params, "w_s_text": wide}
    mask2 = torch.stack([tensors[6], tensors[6]], 2)[:, :, 0]
    assert not wide.is_contiguous() and not mask2.is_contiguous()
    out, grads = run(cdds_loss_triton, [*strided, mask2], p2)
    out_c, grads_c = run(cdds_loss_triton, tensors, params)
    for k in LOSS_KEYS:
        torch.testing.assert_close(out[k], out_c[k], rtol=0, atol=0)
    for n in LEAF_NAMES:
        torch.testing.assert_close(grads[n], grads_c[n], rtol=0, atol=0)
    check_smooth([*strided, mask2], p2)


def test_mixed_dtypes(device):
    """Autocast-style mixes: bf16 image side, fp16 text side, fp32 parameters."""
    tensors, params = inputs(3, 6, 8, 20, torch.float32, device, smooth=True)
    tensors = [
        t.detach().to(torch.bfloat16) if i < 3 else (t.detach().to(torch.float16) if i < 6 else t)
        for i, t in enumerate(tensors)
    ]
    check_smooth(tensors, params)


def test_float64_routes_to_reference(device):
    from cdds_fast.functional import cdds_loss

    tensors, params = inputs(2, 3, 4, 5, torch.float64, device)
    out, grads = run(functools.partial(cdds_loss, backend="triton"), tensors, params)
    ref, ref_grads = run(reference_cdds_loss, tensors, params)
    for k in LOSS_KEYS:
        assert out[k].dtype == torch.float64
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)


def test_weights_and_hyperparameters(device):
    """Non-default a_c, a_s, a_m, a_f, tau_kl, rho, a Python-number logit_scale."""
    tensors, params = inputs(3, 6, 8, 20, torch.float32, device, smooth=True)
    kw = dict(a_c=0.0, a_s=0.7, a_m=0.3, a_f=0.2, tau_kl=0.5, rho=0.05)
    params = {**params, "logit_scale": 10.0}
    fast = cdds_loss_triton(*tensors, **params, **kw)
    ref = reference_cdds_loss(*tensors, **params, **kw)
    assert float(fast["contrastive_loss"].detach()) == 0.0
    for k in LOSS_KEYS:
        assert_close(fast[k], ref[k], F32, k)


def test_custom_contrastive_is_used(device):
    tensors, params = inputs(2, 3, 4, 8, torch.float32, device)
    calls = []

    def contrastive(a, b, scale):
        calls.append((a.shape, b.shape))
        return (a * b).sum() * 0.0

    out = cdds_loss_triton(*tensors, **params, contrastive=contrastive)
    assert len(calls) == 3 and all(s == ((2, 8), (2, 8)) for s in calls)
    assert float(out["contrastive_loss"].detach()) == 0.0
    assert float(out["semantic_loss"].detach()) == 0.0


def empty_text_row_call(device):
    """A default fast-path call whose text mask has a row with no valid token (for
    ``expect_device_assertion``)."""
    from cdds_fast.functional import cdds_loss

    tensors, params = inputs(2, 3, 4, 5, torch.float32, device)
    tensors[6][1] = False
    return cdds_loss(*tensors, **params, backend="triton")


def test_bad_input_raises_before_launch(device):
    """Through the public entry, which checks the inputs once (cdds_loss_triton checks nothing)."""
    from cdds_fast.functional import cdds_loss

    fast = functools.partial(cdds_loss, backend="triton")
    tensors, params = inputs(2, 3, 4, 5, torch.float32, device)
    bad_mask = tensors[6].float()
    with pytest.raises(TypeError, match="text_mask: expected dtype torch.bool"):
        fast(*tensors[:6], bad_mask, **params)
    empty = tensors[6].clone()
    empty[1] = False
    # by default a device-side assertion (no synchronisation), with check_finite the host check
    # before any launch
    expect_device_assertion(
        "tests.test_fused_loss:empty_text_row_call",
        device,
        "text_mask: expected at least one valid token",
    )
    with pytest.raises(
        ValueError,
        match=r"text_mask: expected at least one valid token per "
        r"row, got rows \[1\]",
    ):
        fast(*tensors[:6], empty, **params, check_finite=True)
    with pytest.raises(ValueError, match="text_tokens: expected feature dim D = 5"):
        fast(*tensors[:3], tensors[3][..., :4], *tensors[4:], **params)
    nan = tensors[0].detach().clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="image_tokens: expected finite values"):
        fast(nan, *tensors[1:], **params, check_finite=True)


def test_functional_dispatch(device):
    from cdds_fast.functional import cdds_loss

    tensors, params = inputs(2, 3, 4, 8, torch.float32, device, smooth=True)
    a = cdds_loss(*tensors, **params, backend="triton")
    b = cdds_loss_triton(*tensors, **params)
    for k in LOSS_KEYS:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_torch_compile_training_step(device):
    """A torch.compile'd step through cdds_loss_triton: the loss is one torch.library custom op
    each way (an opaque node with a fake impl and registered autograd), so tracing and AOT
    autograd work, with no graph break. aot_eager keeps the CPU run short; CUDA runs inductor in
    the slow test below."""
    _compile_step(device, "aot_eager")


@pytest.mark.slow
def test_torch_compile_training_step_inductor(device):
    _compile_step(device, "inductor")


def _compile_step(device, backend):
    tensors, params = inputs(2, 3, 4, 8, torch.float32, device, smooth=True)

    def step(*args, **kw):
        return sum(cdds_loss_triton(*args, **kw).values())

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    leaves = [*tensors[:6], *params.values()]
    loss_c = compiled(*tensors, **params)
    grads_c = torch.autograd.grad(loss_c, leaves)
    loss_e = step(*tensors, **params)
    grads_e = torch.autograd.grad(loss_e, leaves)
    torch.testing.assert_close(loss_c, loss_e)
    for n, gc, ge in zip(LEAF_NAMES, grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, msg=n)


def assert_compiled_matches_eager(compiled, eager, kw, leaves):
    """``compiled(kw)`` and its (AOT-compiled) backward equal ``eager(kw)``'s loss and the
    gradients of every leaf."""
    loss_c = compiled(kw)
    grads_c = torch.autograd.grad(loss_c, leaves)
    loss_e = eager(kw)
    grads_e = torch.autograd.grad(loss_e, leaves)
    torch.testing.assert_close(loss_c, loss_e)
    for n, gc, ge in zip(LEAF_NAMES, grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, msg=n)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fullgraph_compile_through_cdds_loss(backend, device):
    """``torch.compile(step, fullgraph=True)`` of a step's loss through ``CDDSLoss``, as a user
    writes it (the backward AOT-compiled with it): no graph break on either backend's default
    path (no host reads of tensor values: the fast path's value checks are one device-side
    assertion, the reference's default host checks turn into device-side ones while tracing),
    and the eager loss and gradients."""
    from cdds_fast import CDDSLoss

    tensors, params = inputs(3, 5, 6, 16, torch.float32, device, smooth=True)
    loss_fn = CDDSLoss(backend=backend)
    leaves = [*tensors[:6], *params.values()]

    def step(kw):
        return loss_fn(**kw)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_compiled_matches_eager(compiled, step, loss_kwargs(tensors, params), leaves)
    if backend == "reference":  # the check traced as a device-side assertion still fires
        expect_device_assertion(
            "tests.test_fused_loss:empty_text_row_compiled_reference_call",
            device,
            "text_mask: expected at least one valid token",
        )


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dynamic_fullgraph_compile_through_cdds_loss(backend, device, monkeypatch):
    """``torch.compile(step, fullgraph=True, dynamic=True)``: the batch size is symbolic and the
    loss's float settings may be too, so the host checks of Python numbers must trace
    (``contract.check_number``) and the reference backend's chunks must split a symbolic batch
    (two pairs a chunk here). B = 5, then B = 7, each equal to eager."""
    import cdds_fast.chunked_sampling as chunked
    from cdds_fast import CDDSLoss

    monkeypatch.setattr(chunked, "pairs_per_chunk", lambda dim, dtype, device: 2)
    loss_fn = CDDSLoss(backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda kw: loss_fn(**kw), fullgraph=True, dynamic=True, backend="aot_eager"
    )
    for batch in (5, 7):
        tensors, params = inputs(batch, 4, 6, 8, torch.float32, device, smooth=True)
        leaves = [*tensors[:6], *params.values()]
        kw = loss_kwargs(tensors, params)
        assert_compiled_matches_eager(compiled, lambda kw: loss_fn(**kw), kw, leaves)


def empty_text_row_compiled_reference_call(device):
    """``CDDSLoss(backend="reference")`` under ``torch.compile(fullgraph=True)`` on a text mask
    with a row with no valid token (for ``expect_device_assertion``)."""
    from cdds_fast import CDDSLoss

    tensors, params = inputs(3, 5, 6, 16, torch.float32, device, smooth=True)
    tensors[6][0] = False
    loss_fn = CDDSLoss(backend="reference")
    torch._dynamo.reset()
    compiled = torch.compile(lambda kw: loss_fn(**kw), fullgraph=True, backend="aot_eager")
    return compiled(loss_kwargs(tensors, params))


HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA's synchronisation debug mode")
def test_step_does_not_synchronise(device):
    """A fast-path step (forward and backward through ``CDDSLoss``) under
    ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation raises."""
    from cdds_fast import CDDSLoss

    tensors, params = inputs(16, 50, 77, 512, torch.bfloat16, device)
    loss_fn = CDDSLoss(backend="triton")
    kw = loss_kwargs(tensors, params)
    leaves = [*tensors[:6], *params.values()]
    torch.autograd.grad(loss_fn(**kw), leaves)  # compiles the kernels, warms the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = torch.autograd.grad(loss_fn(**kw), leaves)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs")
def test_cuda_graph_replay_equals_eager(device):
    """Forward and backward captured once in a ``torch.cuda.CUDAGraph`` and replayed on new input
    values (copied into the captured tensors) give the eager loss and gradients on those values,
    to the bit (every kernel is deterministic: no atomics)."""
    tensors, params = inputs(16, 50, 77, 512, torch.bfloat16, device, smooth=True)
    leaves = [*tensors[:6], *params.values()]

    def step():
        total = sum(cdds_loss_triton(*tensors, **params).values())
        return (total, *torch.autograd.grad(total, leaves))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh, fresh_params = inputs(
        16, 50, 77, 512, torch.bfloat16, device, smooth=True, mask=tensors[6]
    )
    with torch.no_grad():
        for leaf, new in zip(leaves, [*fresh[:6], *fresh_params.values()], strict=True):
            leaf.copy_(new)
    graph.replay()
    eager = step()
    for name, got, want in zip(("loss", *LEAF_NAMES), captured, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_no_relation_matrix_or_fp32_token_tensor_is_materialised(device):
    """Every tensor the fast path creates outside its kernels (forward and backward): none is a
    [.., D, D] relation matrix, and with bf16 inputs none is an fp32 [B, N, D] tensor (the
    reference materialises both; X^x exists only inside the constraint kernels)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen += [
                (str(func), tuple(t.shape), t.dtype)
                for t in tree_leaves(out)
                if isinstance(t, torch.Tensor)
            ]
            return out

    batch, patches, length, dim = 2, 5, 6, 64
    tensors, params = inputs(batch, patches, length, dim, torch.bfloat16, device, smooth=True)
    leaves = [*tensors[:6], *params.values()]
    with Record() as rec:
        out = cdds_loss_triton(*tensors, **params)
        torch.autograd.grad(sum(out.values()), leaves)
    assert rec.seen, "the dispatch mode saw nothing"
    for op, shape, dtype in rec.seen:
        assert shape[-2:] != (dim, dim), f"{op} made a [.., D, D] tensor {shape}"
        assert not (
            dtype == torch.float32
            and len(shape) == 3
            and shape[-1] == dim
            and shape[1] in (patches, length)
        ), f"{op} made an fp32 token tensor {shape}"
