"""DualPathDecoupler, CDDSHead and CDDSLoss (docs/method.md section 1 and the module API)."""

from __future__ import annotations

import pytest
import torch

from cdds_fast import CDDSHead, CDDSLoss, DualPathDecoupler
from cdds_fast import reference as R
from cdds_fast.contract import LOSS_KEYS
from tests._inputs import loss_kwargs, make_inputs, make_mask


def test_eval_mode_is_deterministic():
    dec = DualPathDecoupler(16, heads=4).eval()
    x, mask = torch.randn(3, 7, 16), make_mask(3, 7)
    a, b = dec(x, mask), dec(x, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_train_mode_differs_only_through_the_noise():
    dec = DualPathDecoupler(16, heads=4, z=3, sigma=0.1)
    x, mask = torch.randn(3, 7, 16), make_mask(3, 7)
    dec.eval()
    ref = dec(x, mask)
    dec.train()
    noisy = dec(x, mask)
    assert not torch.allclose(noisy[0], ref[0])
    dec.sigma = 0.0  # same groups, no noise: the group mean is the eval output
    quiet = dec(x, mask)
    torch.testing.assert_close(quiet[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(quiet[1], ref[1], atol=1e-5, rtol=1e-5)


def test_groups_are_averaged_in_one_batched_pass():
    dec = DualPathDecoupler(8, heads=2, z=4, sigma=0.5)
    seen = []
    dec.semantic_decoder[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    dec(torch.randn(2, 3, 8))
    assert seen == [8]  # z * B rows in one call


@pytest.mark.parametrize("training", [False, True])
def test_padded_tokens_never_change_valid_outputs(training):
    dec = DualPathDecoupler(16, heads=4, sigma=0.1).train(training)
    x, mask = torch.randn(3, 9, 16), make_mask(3, 9)
    mask[0, -1] = False  # at least one padded token
    y = torch.where(mask[..., None], x, torch.randn_like(x) * 50)
    torch.manual_seed(0)
    a = dec(x, mask)
    torch.manual_seed(0)
    b = dec(y, mask)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u[mask], v[mask], atol=1e-5, rtol=1e-5)


def test_unet_skip_structure():
    """d_k = F_k(d_{k-1} + h_{n_enc-k}): with identity-initialised blocks turned off, check the
    wiring."""
    dec = DualPathDecoupler(8, heads=2, n_enc=2, n_dec=3, z=1).eval()
    calls = []
    for name, blocks in (("enc", dec.encoder), ("sem", dec.semantic_decoder)):
        for k, blk in enumerate(blocks, 1):
            blk.register_forward_hook(lambda m, i, o, n=name, k=k: calls.append((n, k, i[0], o)))
    x = torch.randn(2, 3, 8)
    dec(x)
    enc = {k: o for n, k, _, o in calls if n == "enc"}
    sem = {k: (i, o) for n, k, i, o in calls if n == "sem"}
    torch.testing.assert_close(sem[1][0], enc[2] + enc[1])  # d_0 = H = h_2, skip h_1
    torch.testing.assert_close(sem[2][0], sem[1][1] + x)  # skip h_0 = X
    torch.testing.assert_close(sem[3][0], sem[2][1])  # n_dec > n_enc: no skip


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="heads: expected a divisor of dim=10, got heads=4"):
        DualPathDecoupler(10, heads=4)
    with pytest.raises(ValueError, match="z: expected an int >= 1, got 0"):
        DualPathDecoupler(8, heads=2, z=0)


def test_head_parameters_initial_values():
    head = CDDSHead(12, heads=3)
    p = head.loss_parameters()
    assert torch.equal(p["alpha_image"], torch.full((12,), 0.5))
    assert torch.equal(p["alpha_text"], torch.full((12,), 0.5))
    for k in ("w_s_image", "w_m_image", "w_s_text", "w_m_text"):
        assert torch.equal(p[k], torch.ones(12))


def test_head_and_loss_end_to_end_every_parameter_gets_a_gradient():
    head = CDDSHead(16, heads=4)
    mask = make_mask(3, 6)
    out = head(torch.randn(3, 5, 16), torch.randn(3, 6, 16), mask)
    scale = torch.tensor(10.0, requires_grad=True)
    terms = CDDSLoss(backend="reference")(**out, logit_scale=scale, output_dict=True)
    assert tuple(terms) == LOSS_KEYS
    sum(terms.values()).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert not missing, missing
    assert scale.grad is not None


def test_loss_module_total_equals_sum_and_matches_functional():
    tensors, params = make_inputs(3, 5, 4, 8, requires_grad=False)
    loss = CDDSLoss(a_c=0.5, a_s=2.0, a_m=0.3, a_f=0.6, tau_kl=0.7, rho=0.05, backend="reference")
    total = loss(**loss_kwargs(tensors, params))
    terms = R.cdds_loss(
        *tensors, **params, a_c=0.5, a_s=2.0, a_m=0.3, a_f=0.6, tau_kl=0.7, rho=0.05
    )
    torch.testing.assert_close(total, sum(terms.values()))


def test_loss_accepts_batch_replicated_parameters():
    tensors, params = make_inputs(3, 5, 4, 8)
    loss = CDDSLoss(backend="reference")
    plain = loss(**loss_kwargs(tensors, params))
    plain.backward()
    grads = {k: v.grad.clone() for k, v in params.items()}
    for v in params.values():
        v.grad = None
    rep = {k: (v.expand(3, -1) if v.dim() == 1 else v) for k, v in params.items()}
    replicated = loss(**loss_kwargs(tensors, rep))
    replicated.backward()
    torch.testing.assert_close(plain, replicated)
    for k, v in params.items():
        torch.testing.assert_close(v.grad, grads[k])


def test_loss_rejects_logit_bias():
    tensors, params = make_inputs(2, 3, 4, 8, requires_grad=False)
    with pytest.raises(ValueError, match="logit_bias"):
        CDDSLoss()(**loss_kwargs(tensors, params), logit_bias=torch.tensor(0.0))
