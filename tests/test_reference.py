"""The reference is the contract: float64 gradchecks of every op, properties docs/method.md states,
agreement with open_clip's ClipLoss, every bad-input rule, and shape fuzzing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdds_fast import reference as R
from cdds_fast.contract import LOSS_KEYS
from tests._inputs import make_inputs, make_mask

F64 = torch.float64


def rand(*shape, positive=False):
    t = torch.randn(*shape, dtype=F64)
    if positive:
        t = 0.5 + torch.rand(*shape, dtype=F64) * 1.5
    return t.requires_grad_(True)


# ---------------------------------------------------------------- gradcheck (float64)
B, P, L, D = 3, 5, 4, 7


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_column_stats(masked):
    mask = make_mask(B, L) if masked else None
    x = rand(B, L, D)
    assert torch.autograd.gradcheck(lambda x: R.column_stats(x, mask), (x,))


def test_gradcheck_related_weights():
    args = (rand(B, D), rand(B, D, positive=True), rand(B, D), rand(B, D, positive=True), rand(D))
    assert torch.autograd.gradcheck(lambda *a: R.related_weights(*a, tau_kl=0.7, rho=0.01), args)


def test_gradcheck_related_sampling():
    """Both directions from the column statistics: the relation part of the loss as one op."""
    args = (
        rand(B, D),
        rand(B, D, positive=True),
        rand(B, D),
        rand(B, D, positive=True),
        rand(D),
        rand(D),
    )
    assert torch.autograd.gradcheck(lambda *a: R.related_sampling(*a, tau_kl=0.7, rho=0.01), args)


def test_gradcheck_sampling():
    w = torch.softmax(torch.randn(B, D, D, dtype=F64), -1).requires_grad_(True)
    assert torch.autograd.gradcheck(
        R.sampling_coefficients, (w, rand(B, D), rand(B, D, positive=True))
    )
    assert torch.autograd.gradcheck(
        R.x_semantic,
        (rand(B, P, D), rand(B, D), rand(B, D, positive=True), rand(B, D), rand(B, D)),
    )


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_pool_and_constraints(masked):
    mask = make_mask(B, L) if masked else None
    assert torch.autograd.gradcheck(lambda y: R.pool(y, mask), (rand(B, L, D),))
    assert torch.autograd.gradcheck(lambda y: R.modality_kl(y, mask), (rand(B, L, D),))
    assert torch.autograd.gradcheck(
        lambda *a: R.reconstruction_loss(*a, mask),
        (rand(B, L, D), rand(B, L, D), rand(B, L, D), rand(D), rand(D)),
    )


def test_gradcheck_info_nce():
    a = torch.nn.functional.normalize(torch.randn(B, D, dtype=F64), dim=-1).requires_grad_(True)
    b = torch.nn.functional.normalize(torch.randn(B, D, dtype=F64), dim=-1).requires_grad_(True)
    s = torch.tensor(5.0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(R.info_nce, (a, b, s))


def test_gradcheck_total_loss_every_input():
    tensors, params = make_inputs(B, P, L, D, dtype=F64)
    mask = tensors[-1]
    names = list(params)

    def total(*xs):
        out = R.cdds_loss(*xs[:6], mask, **dict(zip(names, xs[6:], strict=True)), tau_kl=0.8)
        return sum(out.values())

    assert torch.autograd.gradcheck(total, tensors[:6] + tuple(params.values()))


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("dim", [1, 2, 7, 64])
@pytest.mark.parametrize("alpha_value", [-1.0, 0.5, 3.0, 100.0])
def test_related_weights_rows_are_distributions(dim, alpha_value):
    mu_v, s_v = R.column_stats(torch.randn(4, 9, dim))
    mu_t, s_t = R.column_stats(torch.randn(4, 6, dim) * 2 + 1)
    alpha = torch.full((dim,), alpha_value)
    w = R.related_weights(mu_v, s_v, mu_t, s_t, alpha)
    assert w.shape == (4, dim, dim)
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(4, dim), atol=1e-6, rtol=0)
    assert bool(((w > 0).sum(-1) >= 1).all())


def test_strongest_relation_survives_threshold():
    mu_v, s_v = R.column_stats(torch.randn(2, 9, 16))
    mu_t, s_t = R.column_stats(torch.randn(2, 9, 16))
    pr = R.related_probabilities(mu_v, s_v, mu_t, s_t)
    w = R.related_weights(
        mu_v, s_v, mu_t, s_t, torch.full((16,), 1e6)
    )  # huge alpha: only the clamp
    assert torch.equal(w.argmax(-1), pr.argmax(-1))


def test_gaussian_kl_matches_torch_distributions():
    mu_v, s_v = torch.randn(2, 5, dtype=F64), torch.rand(2, 5, dtype=F64) + 0.3
    mu_t, s_t = torch.randn(2, 5, dtype=F64), torch.rand(2, 5, dtype=F64) + 0.3
    p = torch.distributions.Normal(mu_v[:, :, None], s_v[:, :, None])
    q = torch.distributions.Normal(mu_t[:, None, :], s_t[:, None, :])
    torch.testing.assert_close(
        R.gaussian_kl(mu_v, s_v, mu_t, s_t), torch.distributions.kl_divergence(p, q)
    )


def test_column_stats_matches_torch_var_mean():
    x = torch.randn(3, 11, 5, dtype=F64)
    mask = make_mask(3, 11)
    mu, s = R.column_stats(x, mask)
    for b in range(3):
        var, mean = torch.var_mean(x[b][mask[b]], dim=0, correction=0)
        torch.testing.assert_close(mu[b], mean)
        torch.testing.assert_close(s[b], torch.sqrt(var + 1e-5))


@pytest.mark.parametrize("masked", [False, True])
def test_masked_mean_of_x_semantic_is_c(masked):
    x = torch.randn(4, 10, 12)
    mask = make_mask(4, 10) if masked else None
    mu, s = R.column_stats(x, mask)
    mu_o, s_o = R.column_stats(torch.randn(4, 8, 12))
    w = R.related_weights(mu, s, mu_o, s_o, torch.full((12,), 0.5))
    c, a = R.sampling_coefficients(w, mu_o, s_o)
    xx = R.x_semantic(x, mu, s, c, a)
    torch.testing.assert_close(R.masked_mean(xx, mask), c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("local_batch", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_info_nce_equals_open_clip_clip_loss(local_batch, dtype):
    from open_clip.loss import ClipLoss

    def leaves():
        a = torch.nn.functional.normalize(torch.randn(local_batch, 24, dtype=dtype), dim=-1)
        return a.requires_grad_(True)

    a, b = leaves(), leaves()
    s = torch.tensor(14.3, dtype=dtype, requires_grad=True)
    ours = R.info_nce(a, b, s)
    ours.backward()
    grads = [a.grad.clone(), b.grad.clone(), s.grad.clone()]
    for t in (a, b, s):
        t.grad = None
    theirs = ClipLoss()(a, b, s)
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    for g, t in zip(grads, (a, b, s), strict=True):
        torch.testing.assert_close(g, t.grad)


def test_batch_of_one_has_zero_contrastive_terms():
    tensors, params = make_inputs(1, 5, 4, 8)
    out = R.cdds_loss(*tensors, **params)
    assert float(out["contrastive_loss"].detach()) == 0.0
    assert float(out["semantic_loss"].detach()) == 0.0


def test_terms_are_weighted_and_keys_exact():
    tensors, params = make_inputs(3, 5, 4, 8, requires_grad=False)
    unit = R.cdds_loss(*tensors, **params, a_c=1.0, a_s=1.0, a_m=1.0, a_f=1.0)
    weighted = R.cdds_loss(*tensors, **params, a_c=0.0, a_s=2.0, a_m=0.1, a_f=0.25)
    assert tuple(weighted) == LOSS_KEYS
    lx = R.cdds_loss(*tensors, **params, a_f=0.0)["x_completeness_loss"]
    torch.testing.assert_close(weighted["contrastive_loss"], torch.tensor(0.0))
    torch.testing.assert_close(weighted["semantic_loss"], 2.0 * unit["semantic_loss"])
    torch.testing.assert_close(weighted["modality_loss"], 0.1 * unit["modality_loss"])
    torch.testing.assert_close(weighted["completeness_loss"], 0.25 * unit["completeness_loss"])
    torch.testing.assert_close(weighted["x_completeness_loss"], 0.75 * lx)


def test_modality_kl_zero_when_all_tokens_share_a_distribution():
    x = torch.randn(1, 1, 9).expand(3, 6, 9)
    assert abs(float(R.modality_kl(x))) < 1e-6
    assert float(R.modality_kl(torch.randn(3, 6, 9))) > 0


def test_padded_tokens_do_not_change_the_loss():
    tensors, params = make_inputs(3, 5, 6, 8, requires_grad=False)
    mask = tensors[-1]
    before = R.cdds_loss(*tensors, **params)
    changed = list(tensors)
    for i in (3, 4, 5):
        changed[i] = torch.where(mask[..., None], tensors[i], torch.randn_like(tensors[i]) * 100)
    after = R.cdds_loss(*changed, **params)
    for k in LOSS_KEYS:
        torch.testing.assert_close(before[k], after[k])


def test_low_precision_inputs_compute_in_fp32_and_return_input_dtype_grads():
    tensors, params = make_inputs(2, 5, 4, 8, dtype=torch.bfloat16)
    out = R.cdds_loss(*tensors, **params)
    assert all(v.dtype == torch.float32 for v in out.values())
    sum(out.values()).backward()
    for t in tensors[:6] + tuple(params.values())[:6]:
        assert t.grad is not None and t.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_gradients_are_the_fp32_gradient_rounded_once(dtype):
    """Each 16-bit input is widened once, so its gradient is the float32 gradient of the same
    values rounded once -- not a sum of 16-bit per-use partials (which overflowed to NaN in fp16
    where large partials cancel)."""
    tensors, params = make_inputs(2, 3, 4, 6, dtype=dtype, scale=48.9)
    sum(R.cdds_loss(*tensors, **params).values()).backward()
    wide = [t.detach().float().requires_grad_(True) for t in tensors[:6]]
    sum(R.cdds_loss(*wide, *tensors[6:], **params).values()).backward()
    for t, w in zip(tensors[:6], wide, strict=True):
        assert torch.equal(t.grad, w.grad.to(dtype))


# ---------------------------------------------------------------- hypothesis shape fuzzing
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 5),
    patches=st.integers(1, 9),
    length=st.integers(1, 9),
    dim=st.integers(1, 19),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    scale=st.floats(1.0, 100.0),
    tau=st.floats(0.05, 5.0),
    rho=st.floats(1e-6, 0.5),
)
def test_fuzz_reference_loss_is_finite(batch, patches, length, dim, dtype, scale, tau, rho):
    tensors, params = make_inputs(batch, patches, length, dim, dtype=dtype, scale=scale)
    out = R.cdds_loss(*tensors, **params, tau_kl=tau, rho=rho)
    assert tuple(out) == LOSS_KEYS
    total = sum(out.values())
    assert bool(torch.isfinite(total))
    total.backward()
    if dtype != torch.float16:
        for t in tensors[:6]:
            assert bool(torch.isfinite(t.grad).all())
        return
    # fp16: the gradient itself can exceed fp16's range (rho near its minimum makes the sampling
    # coefficients ~1/rho-sensitive), so inf is right exactly where the float32 gradient on the
    # same values overflows fp16; NaN never is (it came from adding per-use 16-bit partials)
    wide = [t.detach().float().requires_grad_(True) for t in tensors[:6]]
    sum(R.cdds_loss(*wide, *tensors[6:], **params, tau_kl=tau, rho=rho).values()).backward()
    limit = torch.finfo(torch.float16).max / 2
    for t, w in zip(tensors[:6], wide, strict=True):
        assert not bool(torch.isnan(t.grad).any())
        representable = w.grad.abs() < limit
        assert bool(torch.isfinite(t.grad[representable]).all())
