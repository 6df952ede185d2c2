"""Input checks of spec section 9, shared by every backend and run before any kernel launch.

Every error names the argument and the expected vs received value. Wrong types and dtypes raise
``TypeError``; wrong shapes, devices, values raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

RHO_MIN = 1e-6
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def check_tensor(name: str, t: object, *, ndim: int | None = None) -> Tensor:
    """``t`` is a floating tensor of a supported dtype (and ``ndim`` dimensions)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float32, bfloat16, float16 or float64, got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {_shape(t)}")
    return t


def check_scale(name: str, scale: object) -> None:
    """``logit_scale``: a finite positive number or a 0-d floating tensor."""
    if isinstance(scale, Tensor):
        check_tensor(name, scale)
        if scale.dim() != 0:
            raise ValueError(
                f"{name}: expected a 0-d tensor (the exponentiated scale), got shape {_shape(scale)}"
            )
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{name}: expected a 0-d tensor or a number, got {type(scale).__name__}")


def check_values(ok: Tensor, message: str, *, host: bool) -> None:
    """A check on tensor *values*: every element of the bool tensor ``ok`` must be True.

    ``host=True``: read now, raising ``ValueError(message)``; on a CUDA tensor that read waits for
    the device, so callers pass it only where a synchronisation was asked for (``check_finite``).
    ``host=False``: a device-side assertion (``torch._assert_async``) that nothing waits for; a
    failure stops the program at the device's next synchronisation (on CPU tensors it raises
    ``RuntimeError(message)`` at once). While ``torch.compile`` traces, the check is always the
    device-side one: a host read would break the graph.
    """
    ok = ok if ok.dim() == 0 else ok.all()
    if host and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
        return
    torch._assert_async(ok, message)


def check_same_device(tensors: Mapping[str, Tensor | None]) -> None:
    items = [(n, t) for n, t in tensors.items() if isinstance(t, Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected device {first.device} (the device of {first_name}), "
                f"got {t.device}"
            )


def check_finite(tensors: Mapping[str, Tensor | None]) -> None:
    """Every floating tensor holds finite values only. Reads the values (a synchronisation),
    raising ValueError with the count of bad entries; while ``torch.compile`` traces, a
    device-side assertion per tensor instead (:func:`check_values`)."""
    for name, t in tensors.items():
        if not (isinstance(t, Tensor) and t.is_floating_point()):
            continue
        ok = torch.isfinite(t).all()
        if torch.compiler.is_compiling():
            check_values(ok, f"{name}: expected finite values", host=False)
        elif not bool(ok):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name}: expected finite values, got {bad} non-finite entries")


def check_mask(text_mask: object, batch: int, length: int, *, host: bool | None = True) -> Tensor:
    """``text_mask`` is bool ``[B, L]`` with at least one valid token per row.

    The per-row check reads values: ``host=True`` on the host (ValueError naming the rows),
    ``host=False`` as a device-side assertion (:func:`check_values`), ``host=None`` not at all
    (the caller checks inside a kernel that counts the tokens anyway)."""
    if not isinstance(text_mask, Tensor):
        raise TypeError(f"text_mask: expected a bool torch.Tensor, got {type(text_mask).__name__}")
    if text_mask.dtype != torch.bool:
        raise TypeError(f"text_mask: expected dtype torch.bool, got {text_mask.dtype}")
    if _shape(text_mask) != [batch, length]:
        raise ValueError(
            f"text_mask: expected shape [B, L] = {[batch, length]} (from text_tokens), "
            f"got {_shape(text_mask)}"
        )
    if host is None:
        return text_mask
    valid = text_mask.any(1)
    message = "text_mask: expected at least one valid token per row"
    if host and not torch.compiler.is_compiling():
        if not bool(valid.all()):
            rows = torch.nonzero(~valid).flatten().tolist()
            raise ValueError(f"{message}, got rows {rows[:8]} with no valid token")
        return text_mask
    check_values(valid, f"{message}, got a row with none", host=False)
    return text_mask


def check_hyper(*, tau_kl: float, rho: float, **weights: float) -> None:
    if not (isinstance(tau_kl, (int, float)) and math.isfinite(tau_kl) and tau_kl > 0):
        raise ValueError(f"tau_kl: expected a finite number > 0, got {tau_kl!r}")
    # rho > 0 is what guarantees that the strongest relation survives the threshold; below 1e-6
    # the clamp (1 - rho) * max rounds to max in float32 and a row of W could become 0 / 0.
    if not (isinstance(rho, (int, float)) and RHO_MIN <= rho < 1.0):
        raise ValueError(f"rho: expected a number in [{RHO_MIN}, 1), got {rho!r}")
    for name, value in weights.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")


def validate_cdds_inputs(
    *,
    image_tokens: Tensor,
    image_semantic: Tensor,
    image_modality: Tensor,
    text_tokens: Tensor,
    text_semantic: Tensor,
    text_modality: Tensor,
    text_mask: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    w_s_image: Tensor,
    w_m_image: Tensor,
    w_s_text: Tensor,
    w_m_text: Tensor,
    logit_scale: Tensor | float,
    tau_kl: float,
    rho: float,
    a_c: float,
    a_s: float,
    a_m: float,
    a_f: float,
    finite: bool,
    mask_in_kernel: bool = False,
) -> None:
    """All the input checks of :func:`cdds_loss`; raises on the first violation.

    Shapes, dtypes, devices and hyper-parameters are checked on the host without reading tensor
    values. The checks that read values run on the host only with ``finite`` (the finite-value
    check and the text-mask check; a synchronisation each); without it the text-mask check is a
    device-side assertion, or, with ``mask_in_kernel``, left to the caller's kernel (the fast
    path counts every row's tokens anyway)."""
    check_tensor("image_tokens", image_tokens, ndim=3)
    check_tensor("text_tokens", text_tokens, ndim=3)
    batch, patches, dim = image_tokens.shape
    t_batch, length, t_dim = text_tokens.shape
    if t_batch != batch:
        raise ValueError(
            f"text_tokens: expected batch size {batch} (from image_tokens), got {t_batch}"
        )
    if t_dim != dim:
        raise ValueError(
            f"text_tokens: expected feature dim D = {dim} (from image_tokens), got {t_dim}"
        )
    if batch < 1 or patches < 1 or length < 1 or dim < 1:
        raise ValueError(
            f"image_tokens/text_tokens: expected B, P, L, D >= 1, got image {_shape(image_tokens)} "
            f"and text {_shape(text_tokens)}"
        )
    for name, t, ref, ref_name in (
        ("image_semantic", image_semantic, image_tokens, "image_tokens"),
        ("image_modality", image_modality, image_tokens, "image_tokens"),
        ("text_semantic", text_semantic, text_tokens, "text_tokens"),
        ("text_modality", text_modality, text_tokens, "text_tokens"),
    ):
        check_tensor(name, t, ndim=3)
        if t.shape != ref.shape:
            raise ValueError(
                f"{name}: expected shape {_shape(ref)} (same as {ref_name}), got {_shape(t)}"
            )
    vectors = {
        "alpha_image": alpha_image,
        "alpha_text": alpha_text,
        "w_s_image": w_s_image,
        "w_m_image": w_m_image,
        "w_s_text": w_s_text,
        "w_m_text": w_m_text,
    }
    for name, v in vectors.items():
        check_tensor(name, v, ndim=1)
        if v.shape[0] != dim:
            raise ValueError(f"{name}: expected shape [D] = [{dim}], got {_shape(v)}")
    check_scale("logit_scale", logit_scale)
    check_mask(text_mask, batch, length,
               host=True if finite else (None if mask_in_kernel else False))
    everything = {
        "image_tokens": image_tokens,
        "image_semantic": image_semantic,
        "image_modality": image_modality,
        "text_tokens": text_tokens,
        "text_semantic": text_semantic,
        "text_modality": text_modality,
        "text_mask": text_mask,
        **vectors,
        "logit_scale": logit_scale if isinstance(logit_scale, Tensor) else None,
    }
    check_same_device(everything)
    check_hyper(tau_kl=tau_kl, rho=rho, a_c=a_c, a_s=a_s, a_m=a_m, a_f=a_f)
    if finite:
        check_finite(everything)
        if not isinstance(logit_scale, Tensor) and not math.isfinite(logit_scale):
            raise ValueError(f"logit_scale: expected a finite value, got {logit_scale!r}")
