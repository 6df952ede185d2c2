"""Nonsense is refused with the project's named errors (docs/method.md section 7): loss settings,
``logit_scale``, the shapes of the six ``[D]`` vectors as the caller passed them, the decoupler's
settings, and the inputs of ``DualPathDecoupler``, ``CDDSHead`` and ``CDDSModel`` -- each before
any compute."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cdds_fast import CDDSHead, CDDSLoss, DualPathDecoupler
from cdds_fast.functional import cdds_loss
from tests._inputs import TENSOR_NAMES, loss_kwargs, make_inputs, make_mask


def _loss_kwargs(batch=3, dim=8, **change):
    tensors, params = make_inputs(batch, 5, 4, dim, requires_grad=False)
    kwargs = loss_kwargs(tensors, params)
    kwargs.update(change)
    return kwargs


# ---------------------------------------------------------------- loss settings
SETTINGS = [
    ("a_m-negative", dict(a_m=-1.0), ValueError, "a_m: expected a finite number >= 0, got -1.0"),
    ("a_c-negative", dict(a_c=-0.5), ValueError, "a_c: expected a finite number >= 0, got -0.5"),
    ("a_s-nan", dict(a_s=math.nan), ValueError, "a_s: expected a finite number >= 0, got nan"),
    ("a_f-above-1", dict(a_f=2.0), ValueError, r"a_f: expected a number in \[0, 1\], got 2.0"),
    ("a_f-negative", dict(a_f=-0.1), ValueError, r"a_f: expected a number in \[0, 1\], got -0.1"),
    ("a_c-string", dict(a_c="1"), TypeError, "a_c: expected a number, got str '1'"),
    ("tau_kl-zero", dict(tau_kl=0.0), ValueError, "tau_kl: expected a finite number > 0, got 0.0"),
    ("tau_kl-negative", dict(tau_kl=-1.0), ValueError, "tau_kl: expected a finite number > 0"),
    (
        "tau_kl-inf",
        dict(tau_kl=math.inf),
        ValueError,
        "tau_kl: expected a finite number > 0, got inf",
    ),
    ("rho-zero", dict(rho=0.0), ValueError, r"rho: expected a number in \[1e-06, 1\), got 0.0"),
    ("rho-one", dict(rho=1.0), ValueError, r"rho: expected a number in \[1e-06, 1\), got 1.0"),
    ("rho-negative", dict(rho=-0.5), ValueError, r"rho: expected a number in \[1e-06, 1\)"),
]


@pytest.mark.parametrize("change,exc,match", [pytest.param(*c[1:], id=c[0]) for c in SETTINGS])
def test_loss_module_refuses_nonsense_settings_when_built(change, exc, match):
    with pytest.raises(exc, match=match):
        CDDSLoss(**change)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("change,exc,match", [pytest.param(*c[1:], id=c[0]) for c in SETTINGS])
def test_functional_loss_refuses_nonsense_settings(change, exc, match, backend):
    kwargs = _loss_kwargs()
    positional = [kwargs.pop(n) for n in TENSOR_NAMES]
    with pytest.raises(exc, match=match):
        cdds_loss(*positional, **kwargs, **change, backend=backend)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(backend="cuda"), ValueError, "backend: expected one of"),
        (
            dict(check_finite="yes"),
            TypeError,
            "check_finite: expected None, True or False, got 'yes'",
        ),
        (dict(world_size=0), ValueError, "world_size: expected an int >= 1, got 0"),
        (dict(rank=2, world_size=2), ValueError, r"rank: expected a number in \[0, 2\), got 2"),
    ],
    ids=["backend", "check_finite", "world_size", "rank"],
)
def test_loss_module_refuses_bad_backend_and_distributed_settings(change, exc, match):
    with pytest.raises(exc, match=match):
        CDDSLoss(**change)


def test_boundary_settings_are_accepted():
    """The ends of the ranges are legitimate settings: a_c = 0 is the paper's objective, a_f = 0
    and 1 keep only one completeness term."""
    kwargs = _loss_kwargs()
    for change in (
        dict(a_c=0.0),
        dict(a_f=0.0),
        dict(a_f=1),
        dict(a_m=0.0, a_s=0.0),
        dict(rho=1e-6),
    ):
        terms = CDDSLoss(backend="reference", **change)(**kwargs, output_dict=True)
        assert all(bool(torch.isfinite(t)) for t in terms.values()), change


# ---------------------------------------------------------------- logit_scale
@pytest.mark.parametrize("scale", [-1.0, 0.0, math.inf, math.nan, -14], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_number_logit_scale_must_be_finite_and_positive(scale, backend):
    kwargs = _loss_kwargs(logit_scale=scale)
    with pytest.raises(
        ValueError,
        match=r"logit_scale: expected a finite value > 0 \(the "
        r"exponentiated scale.*\), got " + re.escape(repr(scale)),
    ):
        CDDSLoss(backend=backend)(**kwargs)


@pytest.mark.parametrize("value", [-1.0, 0.0, math.inf, math.nan], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tensor_logit_scale_is_checked_on_the_host_when_check_finite(value, backend):
    kwargs = _loss_kwargs(logit_scale=torch.tensor(value))
    with pytest.raises(ValueError, match="logit_scale: expected a finite value > 0"):
        CDDSLoss(backend=backend, check_finite=True)(**kwargs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tensor_logit_scale_is_a_device_side_assertion_without_check_finite(backend):
    """check_finite=False (the Triton default) must not read the scale on the host: the check is
    torch._assert_async, which on CPU tensors raises RuntimeError at once."""
    kwargs = _loss_kwargs(logit_scale=torch.tensor(-1.0))
    with pytest.raises(RuntimeError, match="logit_scale: expected a finite value > 0"):
        CDDSLoss(backend=backend, check_finite=False)(**kwargs)
    default = CDDSLoss(backend="triton")  # the Triton default is check_finite=False
    with pytest.raises(RuntimeError, match="logit_scale: expected a finite value > 0"):
        default(**kwargs)


def test_logit_scale_check_traces_under_fullgraph_compile():
    from cdds_fast.contract import check_scale_values

    def scaled(x, scale):
        check_scale_values("logit_scale", scale, host=True)
        return scale * x

    compiled = torch.compile(scaled, fullgraph=True)
    assert compiled(torch.ones(2), torch.tensor(3.0)).tolist() == [3.0, 3.0]
    with pytest.raises(RuntimeError, match="logit_scale: expected a finite value > 0"):
        compiled(torch.ones(2), torch.tensor(-3.0))


# ---------------------------------------------------------------- the six [D] vectors
@pytest.mark.parametrize("shape", [(3, 32), (4, 8), (3, 8, 1), ()], ids=str)
def test_vector_shapes_are_reported_as_passed(shape):
    kwargs = _loss_kwargs(alpha_image=torch.ones(shape))
    expected = str(list(shape)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(
        ValueError,
        match=rf"alpha_image: expected shape \[D\] = \[8\] or "
        rf"batch-replicated \[B, D\] = \[3, 8\] .*got {expected}",
    ):
        CDDSLoss(backend="reference")(**kwargs)


def test_one_dimensional_vector_of_the_wrong_length_names_its_shape():
    kwargs = _loss_kwargs(w_s_text=torch.ones(9))
    with pytest.raises(ValueError, match=r"w_s_text: expected shape \[D\] = \[8\], got \[9\]"):
        CDDSLoss(backend="reference")(**kwargs)


# ---------------------------------------------------------------- decoupler settings
@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(z=0), ValueError, "z: expected an int >= 1, got 0"),
        (dict(z=1.5), TypeError, "z: expected an int, got float 1.5"),
        (dict(sigma=-0.1), ValueError, "sigma: expected a finite number >= 0, got -0.1"),
        (dict(sigma=math.nan), ValueError, "sigma: expected a finite number >= 0, got nan"),
        (dict(n_enc=0), ValueError, "n_enc: expected an int >= 1, got 0"),
        (dict(n_dec=-1), ValueError, "n_dec: expected an int >= 1, got -1"),
        (dict(heads=0), ValueError, "heads: expected an int >= 1, got 0"),
        (dict(heads=3), ValueError, "heads: expected a divisor of dim=8, got heads=3"),
        (dict(mlp_ratio=0.0), ValueError, "mlp_ratio: expected a finite number > 0, got 0.0"),
    ],
    ids=[
        "z-zero",
        "z-float",
        "sigma-negative",
        "sigma-nan",
        "n_enc",
        "n_dec",
        "heads-zero",
        "heads-divisor",
        "mlp_ratio",
    ],
)
@pytest.mark.parametrize("module", [DualPathDecoupler, CDDSHead])
def test_decoupler_settings_are_refused(module, change, exc, match):
    with pytest.raises(exc, match=match):
        module(8, **{"heads": 2, **change})


# ---------------------------------------------------------------- head and decoupler inputs
def _head_inputs(batch=3, dim=16, **change):
    inputs = dict(
        image_tokens=torch.randn(batch, 5, dim),
        text_tokens=torch.randn(batch, 6, dim),
        text_mask=make_mask(batch, 6),
    )
    inputs.update(change)
    return inputs


HEAD_CASES = [
    (
        "batch",
        dict(text_tokens=torch.randn(2, 6, 16), text_mask=make_mask(2, 6)),
        ValueError,
        r"text_tokens: expected batch size 3 \(from image_tokens\), got shape \[2, 6, 16\]",
    ),
    (
        "image-D",
        dict(image_tokens=torch.randn(3, 5, 12)),
        ValueError,
        r"image_tokens: expected shape \[B, N, D\] with B, N >= 1 and D = 16 .*got \[3, 5, 12\]",
    ),
    (
        "text-ndim",
        dict(text_tokens=torch.randn(3, 16)),
        ValueError,
        r"text_tokens: expected 3 dimensions, got shape \[3, 16\]",
    ),
    (
        "float64",
        dict(image_tokens=torch.randn(3, 5, 16, dtype=torch.float64)),
        TypeError,
        "image_tokens: expected dtype torch.float32 .*got torch.float64",
    ),
    (
        "int-tokens",
        dict(text_tokens=torch.ones(3, 6, 16, dtype=torch.long)),
        TypeError,
        "text_tokens: expected dtype float32, bfloat16, float16 or float64, got torch.int64",
    ),
    (
        "not-a-tensor",
        dict(image_tokens=[[1.0]]),
        TypeError,
        "image_tokens: expected a torch.Tensor, got list",
    ),
    (
        "mask-none",
        dict(text_mask=None),
        TypeError,
        "text_mask: expected a bool torch.Tensor, got NoneType",
    ),
    (
        "mask-dtype",
        dict(text_mask=torch.ones(3, 6)),
        TypeError,
        "text_mask: expected dtype torch.bool, got torch.float32",
    ),
    (
        "mask-shape",
        dict(text_mask=torch.ones(3, 5, dtype=torch.bool)),
        ValueError,
        r"text_mask: expected shape \[B, N\] = \[3, 6\] \(from text_tokens\), got \[3, 5\]",
    ),
    (
        "device",
        dict(text_tokens=torch.randn(3, 6, 16, device="meta")),
        ValueError,
        "text_tokens: expected device cpu",
    ),
]


@pytest.mark.parametrize("change,exc,match", [pytest.param(*c[1:], id=c[0]) for c in HEAD_CASES])
def test_head_refuses_bad_inputs_before_any_compute(change, exc, match):
    head = CDDSHead(16, heads=4)
    calls = []
    for module in head.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(exc, match=match):
        head(**_head_inputs(**change))
    assert calls == []
    head(**_head_inputs())  # the same head takes good inputs
    assert calls


def test_head_and_loss_agree_that_text_mask_is_required():
    """text_mask=None is refused by both, with the same message."""
    head = CDDSHead(16, heads=4)
    parts = head(**_head_inputs())
    parts["text_mask"] = None
    with pytest.raises(
        TypeError, match="text_mask: expected a bool torch.Tensor, got NoneType"
    ) as loss_err:
        CDDSLoss(backend="reference")(**parts, logit_scale=10.0)
    with pytest.raises(TypeError) as head_err:
        head(**_head_inputs(text_mask=None))
    assert str(head_err.value) == str(loss_err.value)


def test_decoupler_refuses_bad_inputs():
    dec = DualPathDecoupler(8, heads=2)
    with pytest.raises(
        ValueError, match=r"tokens: expected shape \[B, N, D\] .*D = 8.*got \[2, 3, 4\]"
    ):
        dec(torch.randn(2, 3, 4))
    with pytest.raises(
        ValueError, match=r"mask: expected shape \[B, N\] = \[2, 3\] \(from tokens\)"
    ):
        dec(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="tokens: expected shape .*B, N >= 1"):
        dec(torch.randn(0, 3, 8))


def test_head_takes_other_float_dtypes_under_autocast():
    """Under autocast the module casts for itself: bf16 tokens into an fp32 head are fine there,
    and refused outside it."""
    head = CDDSHead(16, heads=4)
    inputs = _head_inputs(image_tokens=torch.randn(3, 5, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="image_tokens: expected dtype torch.float32"):
        head(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(**inputs)
    assert out["image_semantic"].shape == (3, 5, 16)
