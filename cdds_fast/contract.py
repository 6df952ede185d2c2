"""The loss's input contract, in one neutral module: the checks every entry point runs before any
compute (docs/method.md section 7), the dtype tables, the output keys and the types the API shares.
It imports nothing of cdds_fast, so the kernels, the API and the tools all depend on it and it on
none of them.

Every error names the argument and the expected vs received value. Wrong types and dtypes raise
``TypeError``; wrong shapes, devices, values raise ``ValueError``. Shapes are reported as the caller
passed them. Python numbers are checked on the host; checks on tensor *values* go through
:func:`check_values`, which reads them on the host only where the caller asked for it.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

RHO_MIN = 1e-6
#: Dtypes the Triton kernels compute on (float64 takes the reference: docs/method.md decision 4).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Dtypes the loss accepts.
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)
#: Keys of the loss's ``output_dict``, the five weighted terms whose sum is the loss (section 5).
LOSS_KEYS = (
    "contrastive_loss",
    "semantic_loss",
    "modality_loss",
    "completeness_loss",
    "x_completeness_loss",
)
#: An InfoNCE ``f(a, b, logit_scale) -> loss`` for the two contrastive terms (``CDDSLoss`` passes
#: a gathering one under DDP: section 6).
Contrastive = Callable[[Tensor, Tensor, "Tensor | float"], Tensor]


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """``"float32, bfloat16, float16 or float64"`` for a dtype table, in error messages."""
    *first, last = (str(d).removeprefix("torch.") for d in dtypes)
    return f"{', '.join(first)} or {last}"


def check_tensor(name: str, t: object, *, ndim: int | None = None) -> Tensor:
    """``t`` is a floating tensor of a supported dtype (and ``ndim`` dimensions)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype {_dtype_names(FLOAT_DTYPES)}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {_shape(t)}")
    return t


_SCALE_MESSAGE = (
    "{name}: expected a finite value > 0 (the exponentiated scale, e.g. "
    "model.logit_scale.exp()), got {got}"
)


def check_scale(name: str, scale: object) -> None:
    """``logit_scale``: a 0-d floating tensor, or a finite number > 0.

    The scale multiplies the cosine logits, so it is CLIP's *exponentiated* ``logit_scale``
    (``model.logit_scale.exp()``, about 14.3 at CLIP's init, at most 100 under open_clip's clamp);
    a negative or zero scale would invert or erase the ranking the loss trains. A tensor's value is
    checked by :func:`check_scale_values`.
    """
    if isinstance(scale, Tensor):
        check_tensor(name, scale)
        if scale.dim() != 0:
            raise ValueError(
                f"{name}: expected a 0-d tensor (the exponentiated scale), got shape "
                f"{_shape(scale)}"
            )
        return
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{name}: expected a 0-d tensor or a number, got {type(scale).__name__}")
    if not 0 < scale < math.inf:  # NaN fails it; traces as a symbolic float (check_number)
        raise ValueError(_SCALE_MESSAGE.format(name=name, got=repr(scale)))


def check_scale_values(name: str, scale: Tensor | float, *, host: bool) -> None:
    """The value of a ``logit_scale`` tensor is finite and > 0 (numbers: :func:`check_scale`).

    ``host`` as in :func:`check_values`: callers pass their ``check_finite`` setting, so the
    default fast path asserts on the device instead of waiting for it.
    """
    if isinstance(scale, Tensor):
        # log(s) is finite exactly when s is finite and > 0 (log 0 = -inf; the log of a negative
        # or NaN is NaN): the fewest launches for the device-side form
        check_values(
            torch.isfinite(scale.detach().log()),
            _SCALE_MESSAGE.format(name=name, got="a tensor outside it"),
            host=host,
        )


def check_values(ok: Tensor, message: str, *, host: bool) -> None:
    """A check on tensor *values*: every element of the bool tensor ``ok`` must be True.

    ``host=True``: read now, raising ``ValueError(message)``; on a CUDA tensor that read waits for
    the device, so callers pass it only where a synchronisation was asked for (``check_finite``).
    ``host=False``: a device-side assertion (``torch._assert_async``) that nothing waits for; on
    CPU tensors a failure raises ``RuntimeError(message)`` at once, on CUDA it surfaces at the
    next synchronisation as "device-side assert triggered" and leaves the CUDA context unusable.
    While ``torch.compile`` traces, the check is always the device-side one: a host read would
    break the graph.
    """
    ok = ok if ok.dim() == 0 else ok.all()
    if host and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
        return
    torch._assert_async(ok, message)


def check_tokens(name: str, tokens: object, *, dim: int, like: Tensor) -> Tensor:
    """Token features ``[B, N, D]`` for a module whose parameters are ``like``: floating, ``D =
    dim``, ``B, N >= 1``, on ``like``'s device and in its dtype (any 16/32-bit float under an
    enabled autocast, which casts for the module)."""
    check_tensor(name, tokens, ndim=3)
    if tokens.shape[0] < 1 or tokens.shape[1] < 1 or tokens.shape[2] != dim:
        raise ValueError(
            f"{name}: expected shape [B, N, D] with B, N >= 1 and D = {dim} (the module's dim), "
            f"got {_shape(tokens)}"
        )
    check_placement(name, tokens, like)
    return tokens


def check_placement(name: str, x: Tensor, like: Tensor) -> None:
    """``x`` is on the device of the module parameter ``like`` and in its dtype, or in a 16/32-bit
    float dtype that an enabled autocast casts for the module."""
    if x.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (the module's), got {x.device}")
    autocast = torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64
    if x.dtype != like.dtype and not autocast:
        raise TypeError(
            f"{name}: expected dtype {like.dtype} (the module's parameters; cast the input or run "
            f"under torch.autocast), got {x.dtype}"
        )


def check_key_mask(name: str, mask: object, tokens_name: str, tokens: Tensor) -> Tensor:
    """A bool key-padding mask ``[B, N]`` (True = valid) for ``tokens`` ``[B, N, D]``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {mask.dtype}")
    if _shape(mask) != _shape(tokens)[:2]:
        raise ValueError(
            f"{name}: expected shape [B, N] = {_shape(tokens)[:2]} (from {tokens_name}), "
            f"got {_shape(mask)}"
        )
    if mask.device != tokens.device:
        raise ValueError(
            f"{name}: expected device {tokens.device} (the device of {tokens_name}), got "
            f"{mask.device}"
        )
    return mask


def check_same_device(tensors: Mapping[str, object]) -> None:
    items = [(n, t) for n, t in tensors.items() if isinstance(t, Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected device {first.device} (the device of {first_name}), "
                f"got {t.device}"
            )


def check_finite(tensors: Mapping[str, object]) -> None:
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


def check_mask(text_mask: object, batch: int, length: int) -> Tensor:
    """``text_mask`` is bool ``[B, L]`` (its rows' values: :func:`check_mask_rows`)."""
    if not isinstance(text_mask, Tensor):
        raise TypeError(f"text_mask: expected a bool torch.Tensor, got {type(text_mask).__name__}")
    if text_mask.dtype != torch.bool:
        raise TypeError(f"text_mask: expected dtype torch.bool, got {text_mask.dtype}")
    if _shape(text_mask) != [batch, length]:
        raise ValueError(
            f"text_mask: expected shape [B, L] = {[batch, length]} (from text_tokens), "
            f"got {_shape(text_mask)}"
        )
    return text_mask


def check_mask_rows(text_mask: Tensor, *, host: bool) -> None:
    """At least one valid token per row of a bool ``[B, L]`` mask: ``host=True`` reads it on the
    host (ValueError naming the rows), ``host=False`` is a device-side assertion
    (:func:`check_values`)."""
    valid = text_mask.any(1)
    message = "text_mask: expected at least one valid token per row"
    if host and not torch.compiler.is_compiling():
        if not bool(valid.all()):
            rows = torch.nonzero(~valid).flatten().tolist()
            raise ValueError(f"{message}, got rows {rows[:8]} with no valid token")
        return
    check_values(valid, f"{message}, got a row with none", host=False)


def check_number(
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
    integer: bool = False,
) -> None:
    """``value`` is a Python (or numpy) number, an integer if ``integer``, between ``low`` and
    ``high`` (each end included unless ``low_open`` / ``high_open``); NaN and infinities never
    pass."""
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = "an int" if integer else "a number"
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    # comparisons rather than math.isfinite: under torch.compile(dynamic=True) a setting may be a
    # symbolic float, which comparisons trace and math.isfinite does not (NaN fails both)
    if not (above and below and -math.inf < value < math.inf):
        if high == math.inf:
            expected = (
                f"{'an int' if integer else 'a finite number'} {'>' if low_open else '>='} {low:g}"
            )
        else:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            expected = f"a number in {left}{low:g}, {high:g}{right}"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def gather_takes_horovod() -> bool:
    """Whether the installed open_clip's ``gather_features`` has a ``use_horovod`` argument (its
    main branch removed it); its signature is read once per function, not at every DDP step."""
    from open_clip.loss import gather_features

    return _takes_horovod(gather_features)


@functools.lru_cache(maxsize=4)
def _takes_horovod(gather_features: Callable) -> bool:
    return "use_horovod" in inspect.signature(gather_features).parameters


def check_distributed(*, rank: object, world_size: object, use_horovod: object) -> None:
    """``ClipLoss``'s distributed settings, checked when a loss module is built."""
    check_number("world_size", world_size, low=1, integer=True)
    check_number("rank", rank, low=0, high=world_size, integer=True)
    if use_horovod:
        if not gather_takes_horovod():
            raise ValueError(
                "use_horovod: expected False (the installed open_clip's gather_features has no "
                "use_horovod argument), got True"
            )


def check_hyper(*, tau_kl: float, rho: float, **weights: float) -> None:
    """Loss hyperparameters (docs/method.md section 7): ``tau_kl > 0``, ``rho`` in
    ``[RHO_MIN, 1)`` and the term weights ``a_c, a_s, a_m >= 0``, ``a_f`` in ``[0, 1]``."""
    check_number("tau_kl", tau_kl, low=0.0, low_open=True)
    # rho > 0 is what guarantees that the strongest relation survives the threshold; below 1e-6
    # the clamp (1 - rho) * max rounds to max in float32 and a row of W could become 0 / 0.
    check_number("rho", rho, low=RHO_MIN, high=1.0)
    for name, value in weights.items():
        # a_f weighs L_f and 1 - a_f weighs L_x: outside [0, 1] one of them is rewarded for
        # growing. A negative weight on any term does the same to that term.
        if name == "a_f":
            check_number(name, value, low=0.0, high=1.0, high_open=False)
        else:
            check_number(name, value, low=0.0)


def check_head_settings(
    *, n_enc: int, n_dec: int, heads: int, mlp_ratio: float, z: int, sigma: float
) -> None:
    """Decoupler settings (docs/method.md sections 1 and 7): blocks, heads and ``z`` noise groups
    are ints >= 1, ``mlp_ratio > 0``, the noise std ``sigma >= 0``. (That ``heads`` divides the
    dim is the block's own check: the dim is known only once the model is.)"""
    for name, value in (("n_enc", n_enc), ("n_dec", n_dec), ("heads", heads), ("z", z)):
        check_number(name, value, low=1, integer=True)
    check_number("mlp_ratio", mlp_ratio, low=0.0, low_open=True)
    check_number("sigma", sigma, low=0.0)


#: The ``[D]`` parameter vectors of the loss, by their keyword names.
VECTOR_NAMES = ("alpha_image", "alpha_text", "w_s_image", "w_m_image", "w_s_text", "w_m_text")


def _check_token_tensors(inputs: Mapping[str, object]) -> tuple[int, int, int]:
    """Image ``[B, P, D]`` and text ``[B, L, D]`` tokens, each component shaped as its tokens;
    returns ``(B, L, D)``."""
    image_tokens = check_tensor("image_tokens", inputs["image_tokens"], ndim=3)
    text_tokens = check_tensor("text_tokens", inputs["text_tokens"], ndim=3)
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
    for modality in ("image", "text"):
        ref_name = f"{modality}_tokens"
        ref = inputs[ref_name]
        for name in (f"{modality}_semantic", f"{modality}_modality"):
            t = check_tensor(name, inputs[name], ndim=3)
            if t.shape != ref.shape:
                raise ValueError(
                    f"{name}: expected shape {_shape(ref)} (same as {ref_name}), got {_shape(t)}"
                )
    return batch, length, dim


def validate_cdds_inputs(
    inputs: Mapping[str, object],
    *,
    tau_kl: float,
    rho: float,
    a_c: float,
    a_s: float,
    a_m: float,
    a_f: float,
) -> None:
    """docs/method.md section 7's checks for :func:`cdds_loss` that read no tensor values, on
    its tensor arguments by name (``inputs``: the seven tokens and mask, the six vectors,
    ``logit_scale``) and its hyper-parameters: shapes, dtypes, devices, the settings and a number
    ``logit_scale``, on the host; raises on the first violation. The value checks come once the
    backend is known: :func:`check_cdds_values`."""
    batch, length, dim = _check_token_tensors(inputs)
    for name in VECTOR_NAMES:
        v = check_tensor(name, inputs[name], ndim=1)
        if v.shape[0] != dim:
            raise ValueError(f"{name}: expected shape [D] = [{dim}], got {_shape(v)}")
    check_scale("logit_scale", inputs["logit_scale"])
    check_mask(inputs["text_mask"], batch, length)
    check_same_device(inputs)
    check_hyper(tau_kl=tau_kl, rho=rho, a_c=a_c, a_s=a_s, a_m=a_m, a_f=a_f)


def check_cdds_values(
    inputs: Mapping[str, object],
    *,
    host: bool,
    mask_in_kernel: bool = False,
    scale_in_kernel: bool = False,
) -> None:
    """docs/method.md section 7's checks on the values of :func:`cdds_loss`'s ``inputs`` (its
    arguments by name, already through :func:`validate_cdds_inputs`).

    ``host=True`` (``check_finite``): every floating tensor finite, at least one valid token per
    text row and a ``logit_scale`` tensor finite and > 0, read on the host before any compute (a
    synchronisation each), raising ValueError. ``host=False``: the text-mask and ``logit_scale``
    checks are device-side assertions that nothing waits for, or are left to the kernels that
    read the token counts (``mask_in_kernel``) and the scale (``scale_in_kernel``) anyway."""
    if host or not scale_in_kernel:
        check_scale_values("logit_scale", inputs["logit_scale"], host=host)
    if host or not mask_in_kernel:
        check_mask_rows(inputs["text_mask"], host=host)
    if host:
        check_finite(inputs)
