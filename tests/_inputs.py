"""Random CDDS inputs shared by the tests (fresh every call: no fixed seed is needed for
correctness; the shapes and dtypes are in each test's id so failures reproduce by shape)."""

from __future__ import annotations

import torch


def make_mask(batch: int, length: int, *, min_valid: int = 1, device="cpu") -> torch.Tensor:
    """Bool ``[B, L]`` with a random number (>= ``min_valid``) of valid leading tokens per row,
    like padded text."""
    lengths = torch.randint(min_valid, length + 1, (batch,), device=device)
    return torch.arange(length, device=device)[None, :] < lengths[:, None]


def subnormal_ulp(dtype: torch.dtype) -> float:
    """Spacing of the dtype's subnormals (fp16: 2^-24 = 6e-8): a value rounded to the dtype near
    zero is exact only to this absolute amount, whatever its relative tolerance."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def assert_close(actual, expected, tol, name="", scale=None):
    """Elementwise comparison with ``tol = (atol, rtol)``: atol is relative to max|expected| (or
    ``scale`` if larger) and floored at one subnormal ulp of the actual dtype."""
    atol, rtol = tol
    scale = max(expected.detach().abs().max().float().clamp_min(1e-30).item(), scale or 0.0)
    torch.testing.assert_close(
        actual.detach().float(),
        expected.detach().float(),
        atol=max(atol * scale, subnormal_ulp(actual.dtype)),
        rtol=rtol,
        equal_nan=True,
        msg=lambda m: f"{name}: {m}",
    )


#: ``make_inputs``' positional tensors by name, in order: the tensor keywords of ``CDDSLoss``.
TENSOR_NAMES = (
    "image_tokens",
    "image_semantic",
    "image_modality",
    "text_tokens",
    "text_semantic",
    "text_modality",
    "text_mask",
)


def loss_kwargs(tensors, params) -> dict:
    """``CDDSLoss``'s keyword inputs from ``make_inputs``' tensors and parameters."""
    return {**dict(zip(TENSOR_NAMES, tensors, strict=True)), **params}


def make_inputs(
    batch: int = 3,
    patches: int = 5,
    length: int = 4,
    dim: int = 7,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    requires_grad: bool = True,
    mask: torch.Tensor | None = None,
    scale: float = 14.3,
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Positional tensors ``(V, V^s, V^m, T, T^s, T^m, mask)`` and the keyword parameters of
    ``cdds_loss``. Components are the tokens plus noise, so the statistics look like a real
    head's."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).detach().requires_grad_(requires_grad)

    v = torch.randn(batch, patches, dim, device=device)
    t = torch.randn(batch, length, dim, device=device)
    tensors = (
        leaf(v),
        leaf(0.7 * v + 0.5 * torch.randn_like(v)),
        leaf(0.3 * v + 0.5 * torch.randn_like(v)),
        leaf(t),
        leaf(0.7 * t + 0.5 * torch.randn_like(t)),
        leaf(0.3 * t + 0.5 * torch.randn_like(t)),
        make_mask(batch, length, device=device) if mask is None else mask,
    )
    params = {
        "alpha_image": leaf(0.5 + 0.5 * torch.randn(dim, device=device)),
        "alpha_text": leaf(0.5 + 0.5 * torch.randn(dim, device=device)),
        "w_s_image": leaf(1.0 + 0.1 * torch.randn(dim, device=device)),
        "w_m_image": leaf(1.0 + 0.1 * torch.randn(dim, device=device)),
        "w_s_text": leaf(1.0 + 0.1 * torch.randn(dim, device=device)),
        "w_m_text": leaf(1.0 + 0.1 * torch.randn(dim, device=device)),
        "logit_scale": torch.tensor(
            scale, device=device, dtype=dtype if dtype == torch.float64 else torch.float32
        ).requires_grad_(requires_grad),
    }
    return tensors, params


def expect_device_assertion(call: str, device: torch.device, match: str) -> None:
    """The device-side value check (``torch._assert_async``) that ``call`` makes fails.

    ``call`` names a module-level function ``"tests.module:function"`` taking the device. On CPU
    tensors the assertion raises ``RuntimeError`` at once, checked here with ``match``. On CUDA it
    fails asynchronously and leaves the process's CUDA context unusable (every later CUDA call
    fails), so the call runs in a child process, which must die of CUDA's device-side assert: at
    the synchronisation after the call, or at a launch inside it that comes after the failed
    assertion kernel (CUDA reports an earlier asynchronous failure at the next launch; that the
    default path itself never synchronises is test_step_does_not_synchronise's to check). CUDA's
    error does not carry the check's message, so ``match`` applies on CPU only."""
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    module, function = call.split(":")
    if device.type != "cuda":
        import importlib

        with pytest.raises(RuntimeError, match=match):
            getattr(importlib.import_module(module), function)(device)
        return
    script = (
        f"import torch\nfrom {module} import {function}\n"
        f"{function}(torch.device('cuda'))\ntorch.cuda.synchronize()\n"
    )
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert child.returncode != 0, "the device-side assertion did not fire"
    assert "device-side assert" in child.stderr, child.stderr[-2000:]
