"""Each thing done once: every argument of a public call checked once, the backend resolved by
``cdds_fast.dispatch`` alone, open_clip's ``gather_features`` called through one helper that fits
the installed signature."""

from __future__ import annotations

import collections
import inspect

import pytest
import torch

from cdds_fast import contract, contrastive
from cdds_fast.contract import LOSS_KEYS
from cdds_fast.contrastive import FusedClipLoss, info_nce, info_nce_gathered
from cdds_fast.functional import cdds_loss
from cdds_fast.loss import CDDSLoss
from cdds_fast.reference import cdds_loss as reference_cdds_loss
from cdds_fast.reference import contrastive as R
from tests._inputs import TENSOR_NAMES, loss_kwargs, make_inputs
from tests.conftest import DEVICE


@pytest.fixture
def checked(monkeypatch):
    """The names ``check_tensor`` and ``check_scale_values`` see, in order, wherever they are
    called from."""
    names: list[str] = []
    check_tensor, check_scale_values = contract.check_tensor, contract.check_scale_values

    def counting_tensor(name, t, **kw):
        names.append(name)
        return check_tensor(name, t, **kw)

    def counting_scale_values(name, scale, **kw):
        names.append(f"{name} value")
        return check_scale_values(name, scale, **kw)

    for module in (contract, contrastive):
        monkeypatch.setattr(module, "check_tensor", counting_tensor, raising=False)
        monkeypatch.setattr(module, "check_scale_values", counting_scale_values, raising=False)
    return names


def _once(names: list[str]) -> None:
    twice = {n: c for n, c in collections.Counter(names).items() if c > 1}
    assert not twice, f"checked more than once in one call: {twice}"


def _features(rows=4, dim=6):
    return torch.randn(rows, dim, device=DEVICE), torch.randn(rows, dim, device=DEVICE)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_info_nce_and_fused_clip_loss_check_each_argument_once(checked, backend):
    a, b = _features()
    scale = torch.tensor(10.0, device=DEVICE)
    expected = ["image_features", "text_features", "logit_scale", "logit_scale value"]
    info_nce(a, b, scale, backend=backend)
    assert sorted(checked) == sorted(expected)
    checked.clear()
    FusedClipLoss(backend=backend)(a, b, scale)
    assert sorted(checked) == sorted(expected)


def test_info_nce_gathered_checks_each_argument_once(checked):
    la, lb = _features(4)
    ga, gb = torch.cat([la, la]), torch.cat([lb, lb])
    scale = torch.tensor(10.0, device=DEVICE)
    info_nce_gathered(la, lb, ga, gb, scale, local_loss=True, rank=1, backend="reference")
    # the pair checks name local_a twice (with local_b, with all_a); every tensor is one check
    assert set(checked) == {
        "local_a",
        "local_b",
        "all_a",
        "all_b",
        "logit_scale",
        "logit_scale value",
    }
    assert checked.count("logit_scale") == 1 and checked.count("logit_scale value") == 1
    checked.clear()
    info_nce_gathered(la, lb, ga, gb, scale, local_loss=False, rank=1, backend="reference")
    _once(checked)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cdds_loss_checks_each_argument_once(checked, backend):
    tensors, params = make_inputs(2, 3, 4, 5, device=DEVICE)
    cdds_loss(*tensors, **params, backend=backend)
    _once(checked)
    names = {*TENSOR_NAMES[:6], *params}
    assert names <= set(checked)


def test_one_float64_input_takes_the_reference(monkeypatch):
    """float64 anywhere (here one ``[D]`` vector) resolves to the reference in ``dispatch``; the
    fused path is never called to decide it again."""
    from cdds_fast import fused_loss

    def refuse(*args, **kwargs):
        raise AssertionError("float64 input reached the fused path")

    monkeypatch.setattr(fused_loss, "cdds_loss_triton", refuse)
    tensors, params = make_inputs(2, 3, 4, 5, device=DEVICE)
    params["w_s_text"] = params["w_s_text"].detach().double()
    out = cdds_loss(*tensors, **params, backend="triton")
    ref = reference_cdds_loss(*tensors, **params)
    for k in LOSS_KEYS:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# The gather helper against the installed open_clip
# ------------------------------------------------------------------------------------------------

WORLD = 2


@pytest.fixture(params=["installed", "without use_horovod"])
def gather_calls(request, monkeypatch):
    """open_clip's ``gather_features`` replaced by a fake with the installed signature (or that
    signature less ``use_horovod``, as on open_clip's main branch), which binds every call to it
    and returns this rank's features as every rank's."""
    import open_clip.loss

    signature = inspect.signature(open_clip.loss.gather_features)
    if request.param != "installed":
        signature = signature.replace(
            parameters=[p for name, p in signature.parameters.items() if name != "use_horovod"]
        )
    calls: list[inspect.BoundArguments] = []

    def fake(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs))  # TypeError on an argument it lacks
        assert len(args) == 2, "settings go by keyword"
        a, b = args
        return torch.cat([a] * WORLD), torch.cat([b] * WORLD)

    fake.__signature__ = signature
    monkeypatch.setattr(open_clip.loss, "gather_features", fake)
    return calls


@pytest.mark.parametrize("local_loss", [False, True])
def test_fused_clip_loss_gathers_through_the_installed_signature(gather_calls, local_loss):
    a, b = _features()
    loss = FusedClipLoss(local_loss=local_loss, rank=1, world_size=WORLD, backend="reference")(
        a, b, 10.0
    )
    (call,) = gather_calls
    settings = dict(local_loss=local_loss, gather_with_grad=False, rank=1, world_size=WORLD)
    assert {k: v for k, v in call.arguments.items() if k in settings} == settings
    ga, gb = torch.cat([a] * WORLD), torch.cat([b] * WORLD)
    expected = R.info_nce_gathered(a, b, ga, gb, 10.0, local_loss=local_loss, rank=1)
    torch.testing.assert_close(loss, expected)


def test_cdds_loss_gathers_through_the_installed_signature(gather_calls):
    tensors, params = make_inputs(2, 3, 4, 5, device=DEVICE)
    CDDSLoss(rank=1, world_size=WORLD, local_loss=True, backend="reference")(
        **loss_kwargs(tensors, params)
    )
    assert len(gather_calls) == 3  # the pooled features of the three InfoNCE problems
    assert all(c.arguments["rank"] == 1 and c.arguments["local_loss"] for c in gather_calls)


def test_use_horovod_is_refused_where_open_clip_has_no_horovod(monkeypatch):
    import open_clip.loss

    signature = inspect.signature(open_clip.loss.gather_features)

    def without_horovod(
        image_features,
        text_features,
        local_loss=False,
        gather_with_grad=False,
        rank=0,
        world_size=1,
    ):
        raise AssertionError("not called")

    monkeypatch.setattr(open_clip.loss, "gather_features", without_horovod)
    for make in (FusedClipLoss, CDDSLoss):
        with pytest.raises(ValueError, match="use_horovod: expected False"):
            make(use_horovod=True)
    if "use_horovod" in signature.parameters:  # the installed open_clip still takes it
        monkeypatch.undo()
        FusedClipLoss(use_horovod=True)
