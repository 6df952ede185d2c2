"""The constraint terms of the fast path (kernels/constraints.py: the token passes; ``L_x``'s
``c, a``-dependent sums formed by the sampling kernels) against the reference.

``L_m``, ``L_f``, ``L_x`` (docs/method.md section 5) of both modalities come out of one forward
pass over the tokens and one backward pass writing every token gradient; the InfoNCE terms are
weighted off here (``a_c = a_s = 0``) so the three constraint terms and the gradients they give
all 13 leaves (the tokens, both components, the six vectors) are what is compared. The yardstick
is test_fused_loss's conditioned one: the fast path's error against the float64 reference within
``FACTOR`` times the fp32 reference's own (its rounding perturbed) + the table's atol. Inputs are
fresh random tensors; test ids name shape, dtype and path (``cap``: the widest row the token pass
holds in one block, lowered through the ``row_block_cap`` fixture below D to reach the
chunked-row path with its row-LSE kernel; None: the launch rule's).
"""

from __future__ import annotations

import math

import pytest
import torch

from cdds_fast.fused_loss import cdds_loss_triton
from tests._inputs import assert_close
from tests.test_fused_loss import F32, check_conditioned, inputs, repair_alpha, run, text_mask

#: InfoNCE off: the three constraint terms alone, each with a weight that is not 0 or 1
WEIGHTS = dict(a_c=0.0, a_s=0.0, a_m=0.7, a_f=0.4)


#: the fast path's terms, on inputs these tests build valid (no checks run in it)
fast = cdds_loss_triton


def check(tensors, params, *, floors=None):
    out, grads = check_conditioned(
        tensors, repair_alpha(tensors, params), fast=fast, floors=floors, **WEIGHTS
    )
    mask = tensors[6]
    for name, g in (
        ("text_tokens", grads["text_tokens"]),
        ("text_semantic", grads["text_semantic"]),
        ("text_modality", grads["text_modality"]),
    ):
        assert bool((g[~mask] == 0).all()), f"grad {name}: masked tokens must get 0"
    assert float(grads["logit_scale"]) == 0.0
    return out, grads


SHAPES = [
    pytest.param(1, 1, 1, 1, None, id="B1-P1-L1-D1"),
    pytest.param(3, 5, 7, 37, None, id="D37"),
    pytest.param(2, 9, 4, 1, None, id="D1"),
    pytest.param(3, 1, 5, 24, None, id="P1"),
    # D wider than one block: per-token log-sum-exp kernel + D-chunk loops
    pytest.param(3, 6, 5, 37, 16, id="D37-chunked"),
    pytest.param(2, 33, 9, 70, 32, id="D70-chunked"),
    pytest.param(2, 4, 3, 1, 1, id="D1-chunk1"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,patches,length,dim,cap", SHAPES)
def test_matches_reference(batch, patches, length, dim, cap, dtype, device, row_block_cap):
    if cap is not None:
        row_block_cap(cap)
    tensors, params = inputs(batch, patches, length, dim, dtype, device)
    check(tensors, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_realistic(dtype, device):
    tensors, params = inputs(4, 50, 77, 512, dtype, device)
    check(tensors, params)


def test_mixed_input_dtypes(device):
    """Each tensor is loaded in its own dtype; each gradient comes back in its input's dtype."""
    tensors, params = inputs(3, 6, 11, 40, torch.float32, device)
    dtypes = (
        torch.bfloat16,
        torch.float16,
        torch.float32,
        torch.float32,
        torch.bfloat16,
        torch.float16,
    )
    tensors = [
        t.detach().to(dt).requires_grad_() for t, dt in zip(tensors[:6], dtypes, strict=True)
    ] + tensors[6:]
    params["w_s_image"] = params["w_s_image"].detach().to(torch.bfloat16).requires_grad_()
    params["w_m_text"] = params["w_m_text"].detach().to(torch.float16).requires_grad_()
    check(tensors, params)


@pytest.mark.parametrize("cap", [None, 16], ids=["one-block", "chunked"])
def test_one_valid_token_and_mostly_masked(cap, device, row_block_cap):
    if cap is not None:
        row_block_cap(cap)
    batch, length = 3, 77
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[0, 0] = True
    mask[1, 40] = True
    mask[2, :3] = True
    tensors, params = inputs(batch, 5, length, 37, torch.float32, device, mask=mask)
    check(tensors, params)


def test_non_contiguous_inputs(device):
    tensors, params = inputs(2, 7, 13, 24, torch.float32, device)
    views = [
        t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        for t in tensors[:6]
    ]
    params["w_m_image"] = torch.stack((params["w_m_image"].detach(),) * 2, 1)[:, 0].requires_grad_()
    assert not views[0].is_contiguous() and not params["w_m_image"].is_contiguous()
    check([*views, tensors[6]], params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_magnitudes(dtype, device):
    """Tokens and semantic components ~1e4 (fp16: ~2e4, near its 65504 max): the constraint
    losses are ~1e8, the statistics' means far from 0 (``L_x``'s sums are taken about the mean);
    everything stays finite and matches."""
    # at least half the text tokens valid: the fp16 gradients ~ 2 r / (D Ntok) then stay far
    # below 65504 (with a handful of tokens they could overflow fp16 legitimately, on both sides)
    tensors, params = inputs(
        2, 9, 19, 64, torch.float32, device, mask=text_mask(2, 19, min_valid=10, device=device)
    )
    scale = 1e4 if dtype == torch.float32 else 2.0e4
    with torch.no_grad():
        tensors = [t.detach() for t in tensors]
        for i in (0, 1, 3, 4):
            tensors[i] = (tensors[i] * scale).clamp(-6.0e4, 6.0e4)
        tensors = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in tensors]
    out, grads = check(tensors, params)
    assert all(torch.isfinite(v) for v in out.values())
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy log(0), 0 * inf
@pytest.mark.parametrize("cap", [None, 16], ids=["one-block", "chunked"])
def test_saturated_softmax_matches_reference_nan(cap, device, row_block_cap):
    """X^m ~ 1e4: every softmax is one-hot, so some qbar_d underflows to exactly 0 and the
    reference's log(qbar) makes L_m NaN (and its X^m gradient NaN). The kernels reproduce that:
    L_m = sum q log q / Ntok - sum qbar log qbar is NaN for the same reason; the other terms and
    the other leaves' gradients stay finite and match. Documented difference: the kernels' X^m
    gradient is NaN at the valid tokens and 0 at masked ones, where the reference is NaN
    everywhere."""
    tensors, params = inputs(2, 5, 9, 37, torch.float32, device)
    with torch.no_grad():
        tensors[2] = (tensors[2].detach() * 1e4).requires_grad_()
        tensors[5] = (tensors[5].detach() * 1e4).requires_grad_()
    params = repair_alpha(tensors, params)
    if cap is not None:
        row_block_cap(cap)
    out, grads = run(fast, tensors, params, **WEIGHTS)
    ref, ref_grads = run(_reference, tensors, params, **WEIGHTS)
    assert torch.isnan(ref["modality_loss"]) and torch.isnan(out["modality_loss"])
    for k in ("completeness_loss", "x_completeness_loss"):
        assert_close(out[k], ref[k], F32, k)
    mask = tensors[6]
    assert torch.isnan(grads["image_modality"]).all()
    assert torch.isnan(grads["text_modality"][mask]).all()
    assert (grads["text_modality"][~mask] == 0).all()
    for name in ("image_tokens", "text_tokens", "w_s_image", "w_s_text"):
        assert_close(grads[name], ref_grads[name], F32, f"grad {name}")


def _reference(*args, **kw):
    from cdds_fast.reference import cdds_loss

    return cdds_loss(*args, **kw)


def test_uniform_softmax_and_constant_columns(device):
    """Constant X^m rows (q uniform: L_m = 0 exactly, no gradient through it) and constant X^s
    columns (s = sqrt(1e-5): the statistics' corrected two-pass gives deviations of exactly 0)."""
    batch, patches, length, dim = 2, 5, 7, 19
    tensors, params = inputs(batch, patches, length, dim, torch.float32, device)
    with torch.no_grad():
        tensors = [t.detach() for t in tensors]
        tensors[1] = tensors[1][:, :1].expand(-1, patches, -1).contiguous()
        tensors[4] = tensors[4][:, :1].expand(-1, length, -1).contiguous()
        tensors[2] = tensors[2][..., :1].expand(-1, -1, dim).contiguous()
        tensors[5] = tensors[5][..., :1].expand(-1, -1, dim).contiguous()
        tensors = [t.requires_grad_() if t.is_floating_point() else t for t in tensors]
    # the kernels' L_m = sum q log q / Ntok - sum qbar log qbar: two terms of size a_m log D that
    # cancel exactly here, so fp32 gives it an absolute accuracy ~eps a_m log D (the reference
    # sums the per-token KL, exactly 0 for uniform q)
    scale = WEIGHTS["a_m"] * math.log(dim)
    out, _ = check(tensors, params, floors={"modality_loss": scale})
    assert abs(float(out["modality_loss"].detach())) < 16 * torch.finfo(torch.float32).eps * scale
