"""The loss's input contract (cdds_fast/contract.py): every rule raises the named error before any
compute, through the API that runs it (``cdds_fast.functional.cdds_loss``); value checks either
on the host or as device-side assertions."""

from __future__ import annotations

import math

import pytest
import torch

from cdds_fast.contract import check_values
from cdds_fast.functional import cdds_loss
from tests._inputs import TENSOR_NAMES, loss_kwargs, make_inputs


# ------------------------------------------- bad input of the loss (docs/method.md section 7)
def _bad_cases():
    def case(name, exc, match, **change):
        return pytest.param(change, exc, match, id=name)

    return [
        case(
            "image_tokens-ndim",
            ValueError,
            "image_tokens: expected 3 dimensions",
            image_tokens=torch.randn(3, 5),
        ),
        case(
            "image_semantic-shape",
            ValueError,
            r"image_semantic: expected shape \[3, 5, 8\]",
            image_semantic=torch.randn(3, 6, 8),
        ),
        case(
            "image_modality-shape",
            ValueError,
            "image_modality: expected shape",
            image_modality=torch.randn(3, 5, 9),
        ),
        case(
            "text_semantic-shape",
            ValueError,
            "text_semantic: expected shape",
            text_semantic=torch.randn(3, 3, 8),
        ),
        case(
            "text_modality-shape",
            ValueError,
            "text_modality: expected shape",
            text_modality=torch.randn(2, 4, 8),
        ),
        case(
            "D-mismatch",
            ValueError,
            "text_tokens: expected feature dim D = 8",
            text_tokens=torch.randn(3, 4, 9),
        ),
        case(
            "B-mismatch",
            ValueError,
            "text_tokens: expected batch size 3",
            text_tokens=torch.randn(2, 4, 8),
        ),
        case(
            "mask-shape",
            ValueError,
            r"text_mask: expected shape \[B, L\] = \[3, 4\]",
            text_mask=torch.ones(3, 5, dtype=torch.bool),
        ),
        case(
            "mask-dtype",
            TypeError,
            "text_mask: expected dtype torch.bool",
            text_mask=torch.ones(3, 4),
        ),
        case(
            "mask-empty-row",
            ValueError,
            "text_mask: expected at least one valid token per row",
            text_mask=torch.tensor([[True] * 4, [False] * 4, [True] * 4]),
        ),
        case(
            "dtype",
            TypeError,
            "image_semantic: expected dtype float32, bfloat16, float16 or float64, got torch.int64",
            image_semantic=torch.ones(3, 5, 8, dtype=torch.long),
        ),
        case(
            "not-a-tensor",
            TypeError,
            "image_tokens: expected a torch.Tensor, got list",
            image_tokens=[[1.0]],
        ),
        case(
            "alpha-shape",
            ValueError,
            r"alpha_image: expected shape \[D\] = \[8\]",
            alpha_image=torch.ones(7),
        ),
        case(
            "w-ndim",
            ValueError,
            r"w_m_text: expected 1 dimensions, got shape \[8, 1\]",
            w_m_text=torch.ones(8, 1),
        ),
        case(
            "w-length",
            ValueError,
            r"w_s_text: expected shape \[D\] = \[8\], got \[9\]",
            w_s_text=torch.ones(9),
        ),
        case(
            "scale-shape",
            ValueError,
            "logit_scale: expected a 0-d tensor",
            logit_scale=torch.ones(1),
        ),
        case(
            "device",
            ValueError,
            "expected device cpu",
            image_modality=torch.randn(3, 5, 8, device="meta"),
        ),
        case(
            "non-finite",
            ValueError,
            "text_tokens: expected finite values, got 1 non-finite",
            text_tokens=torch.randn(3, 4, 8).index_put_(
                (torch.tensor([0]), torch.tensor([0]), torch.tensor([0])),
                torch.tensor(float("nan")),
            ),
        ),
        case(
            "non-finite-param",
            ValueError,
            "w_s_image: expected finite values",
            w_s_image=torch.full((8,), float("inf")),
        ),
        case("tau", ValueError, "tau_kl: expected a finite number > 0, got 0.0", tau_kl=0.0),
        case("rho", ValueError, r"rho: expected a number in \[1e-06, 1\), got 1.0", rho=1.0),
        case("rho-zero", ValueError, r"rho: expected a number in \[1e-06, 1\), got 0.0", rho=0.0),
    ]


@pytest.mark.parametrize("change,exc,match", _bad_cases())
def test_bad_input_raises_named_error(change, exc, match):
    tensors, params = make_inputs(3, 5, 4, 8, requires_grad=False)
    kwargs = loss_kwargs(tensors, params)
    kwargs.update(change)
    positional = [kwargs.pop(n) for n in TENSOR_NAMES]
    with pytest.raises(exc, match=match):
        cdds_loss(*positional, **kwargs, backend="reference")


def test_non_finite_passes_when_check_disabled():
    tensors, params = make_inputs(3, 5, 4, 8, requires_grad=False)
    bad = list(tensors)
    bad[0] = bad[0].clone()
    bad[0][0, 0, 0] = float("nan")
    out = cdds_loss(*bad, **params, backend="reference", check_finite=False)
    assert math.isnan(float(out["completeness_loss"]))


def test_check_values_host_and_device_side():
    """check_values: the host form raises the named ValueError; the device-side form raises
    RuntimeError with the same message on CPU tensors, and traces under fullgraph compile."""
    ok, bad = torch.tensor([True, True]), torch.tensor([True, False])
    check_values(ok, "x: fine", host=True)
    check_values(ok, "x: fine", host=False)
    with pytest.raises(ValueError, match="x: expected > 0"):
        check_values(bad, "x: expected > 0", host=True)
    with pytest.raises(RuntimeError, match="x: expected > 0"):
        check_values(bad, "x: expected > 0", host=False)

    def positive_sum(x):
        check_values(x > 0, "x: expected > 0", host=True)
        return x.sum()

    compiled = torch.compile(positive_sum, fullgraph=True)
    assert compiled(torch.ones(3)).item() == 3.0
    with pytest.raises(RuntimeError, match="x: expected > 0"):
        compiled(-torch.ones(3))
