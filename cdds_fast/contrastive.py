"""Fused CLIP contrastive loss: ``info_nce``, ``info_nce_gathered`` and ``FusedClipLoss``.

``FusedClipLoss`` is a drop-in for ``open_clip.loss.ClipLoss``: same constructor arguments, same
``forward`` signature and return value, same distributed semantics (it gathers with open_clip's
own ``gather_features``), but the ``[B, B]`` logits never exist: the Triton kernel
(``cdds_fast.kernels.contrastive``) keeps only per-row / per-column log-sum-exps, so memory is
O(B) and the loss scales to batch sizes whose logits would not fit on the GPU.

Differences from ``ClipLoss`` (all deliberate):

* the loss is float32 for every input dtype (docs/method.md decision 4: everything is computed
  in float32); ``ClipLoss`` returns bf16/fp16 for 16-bit features. Gradients are in the dtype of
  each input.
* ``logit_bias`` must be None (a bias belongs to SigLIP's loss, ``open_clip.loss.SigLipLoss``).
* features of different dtypes are promoted to a common dtype first (``torch.promote_types``).
* float64 features, and CPU tensors without the Triton interpreter, use the plain-PyTorch
  reference (``cdds_fast.reference.contrastive``), which is exactly ``ClipLoss``'s math.
* ``rank``, ``world_size`` and ``use_horovod`` are checked when the module is built.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from cdds_fast.contract import (
    check_distributed,
    check_scale,
    check_scale_values,
    check_tensor,
    gather_takes_horovod,
)
from cdds_fast.dispatch import check_backend, resolve_backend
from cdds_fast.kernels.launch import INFO_NCE_SCRATCH_BYTES, check_scratch_bytes

# ------------------------------------------------------------------------------------------------
# Checks: each public entry runs them once; the private functions below trust their callers
# ------------------------------------------------------------------------------------------------


def _check_features(
    a: object, b: object, names: tuple[str, str], *, same_rows: bool = True
) -> None:
    """Two ``[rows, D]`` feature tensors on one device (``same_rows``: the same shape)."""
    na, nb = names
    for name, t in ((na, a), (nb, b)):
        check_tensor(name, t, ndim=2)
        if t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"{name}: expected B >= 1 and D >= 1, got shape {list(t.shape)}")
    if same_rows and a.shape != b.shape:
        raise ValueError(
            f"{nb}: expected shape {list(a.shape)} (the shape of {na}), got {list(b.shape)}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{nb}: expected feature dimension D = {a.shape[1]} (from {na}), got "
            f"shape {list(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{nb}: expected device {a.device} (the device of {na}), got {b.device}")


def _check_logit_scale(logit_scale: object, features: Tensor, features_name: str) -> None:
    """A number or 0-d tensor, finite and > 0 (a tensor's value by a device-side assertion), on
    the features' device or the CPU."""
    check_scale("logit_scale", logit_scale)
    if (
        isinstance(logit_scale, Tensor)
        and logit_scale.device != features.device
        and logit_scale.device.type != "cpu"
    ):
        raise ValueError(
            f"logit_scale: expected device {features.device} (the device of {features_name}) or "
            f"a CPU scalar, got {logit_scale.device}"
        )
    check_scale_values("logit_scale", logit_scale, host=False)


def _check_rank(rank: object, n_local: int, n_all: int) -> None:
    if (
        isinstance(rank, bool)
        or not isinstance(rank, int)
        or rank < 0
        or (rank + 1) * n_local > n_all
    ):
        raise ValueError(
            f"rank: expected an int with 0 <= rank and (rank + 1) * B <= world * B, i.e. "
            f"rank <= {n_all // n_local - 1} for B = {n_local} local and {n_all} gathered rows, "
            f"got {rank!r}"
        )


def _common(*ts: Tensor) -> list[Tensor]:
    """The features in their common (promoted) dtype."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in ts))
    return [t.to(dtype) for t in ts]


# ------------------------------------------------------------------------------------------------
# Public entries: check, then compute
# ------------------------------------------------------------------------------------------------


def info_nce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    backend: str = "auto",
    allow_tf32: bool = False,
    max_scratch_bytes: int = INFO_NCE_SCRATCH_BYTES,
) -> Tensor:
    """Symmetric InfoNCE ``(CE(s A B^T, arange) + CE(s B A^T, arange)) / 2`` (docs/method.md
    section 5).

    Exactly open_clip ``ClipLoss``'s single-process value, in O(B) memory on the Triton path.

    Args:
        image_features: ``[B, D]`` (L2-normalised by the caller, as in CLIP).
        text_features: ``[B, D]``, same device.
        logit_scale: exponentiated scale: a 0-d tensor (receives a gradient) or a number.
        backend: ``"auto"`` (Triton for CUDA tensors or under ``TRITON_INTERPRET=1``), ``"triton"``
            or ``"reference"``.
        allow_tf32: let fp32 features use TF32 tensor cores (faster, ~1e-3 relative); default
            off: IEEE fp32 products, within 1e-5 relative of float64.
        max_scratch_bytes: bound on the logit blocks large batches are computed in (the
            Triton backend's extra memory beyond O(B D); ``kernels/contrastive.py``).
    Returns:
        0-d float32 loss (float64 for float64 features). ``B = 1`` gives 0.
    """
    _check_features(image_features, text_features, ("image_features", "text_features"))
    _check_logit_scale(logit_scale, image_features, "image_features")
    check_scratch_bytes(max_scratch_bytes)
    return _info_nce(
        image_features,
        text_features,
        logit_scale,
        backend=backend,
        allow_tf32=allow_tf32,
        max_scratch_bytes=max_scratch_bytes,
    )


def info_nce_gathered(
    local_a: Tensor,
    local_b: Tensor,
    all_a: Tensor,
    all_b: Tensor,
    logit_scale: Tensor | float,
    *,
    local_loss: bool,
    rank: int,
    backend: str = "auto",
    allow_tf32: bool = False,
    max_scratch_bytes: int = INFO_NCE_SCRATCH_BYTES,
) -> Tensor:
    """InfoNCE over gathered features with open_clip's ``local_loss`` semantics (docs/method.md
    section 6).

    Mirrors :func:`cdds_fast.reference.contrastive.info_nce_gathered`:

    * ``local_loss=False``: the full gathered square, ``info_nce(all_a, all_b)``;
    * ``local_loss=True``: ``(CE(s a_loc b_all^T, labels) + CE(s b_loc a_all^T, labels)) / 2``
      with ``labels = arange(B) + B * rank`` -- two rectangular ``[B, world*B]`` row
      cross-entropies, each fused (no ``[B, world*B]`` logits either).

    Args:
        local_a, local_b: ``[B, D]`` this rank's features.
        all_a, all_b: ``[world * B, D]`` gathered features (``open_clip.loss.gather_features``).
        logit_scale: 0-d tensor or number; rank: this process's rank.
    Returns:
        0-d loss.
    """
    kw = dict(backend=backend, allow_tf32=allow_tf32, max_scratch_bytes=max_scratch_bytes)
    _check_features(all_a, all_b, ("all_a", "all_b"))
    if not local_loss:
        _check_logit_scale(logit_scale, all_a, "all_a")
        check_scratch_bytes(max_scratch_bytes)
        return _info_nce(all_a, all_b, logit_scale, **kw)
    _check_features(local_a, local_b, ("local_a", "local_b"))
    _check_features(local_a, all_a, ("local_a", "all_a"), same_rows=False)
    _check_logit_scale(logit_scale, local_a, "local_a")
    check_scratch_bytes(max_scratch_bytes)
    _check_rank(rank, local_a.shape[0], all_a.shape[0])
    return _info_nce_local(local_a, local_b, all_a, all_b, logit_scale, rank=rank, **kw)


# ------------------------------------------------------------------------------------------------
# Internal entries: arguments already checked by a public entry (or, for the pooled features
# of CDDSLoss, produced by a loss whose inputs were checked); nothing here re-checks
# ------------------------------------------------------------------------------------------------


def _info_nce(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor | float,
    *,
    backend: str,
    allow_tf32: bool = False,
    max_scratch_bytes: int = INFO_NCE_SCRATCH_BYTES,
) -> Tensor:
    """:func:`info_nce` on checked arguments."""
    a, b = _common(a, b)
    if resolve_backend(backend, a.device, a.dtype) == "reference":
        from cdds_fast.reference.contrastive import info_nce as reference_info_nce

        return reference_info_nce(a, b, logit_scale)
    from cdds_fast.kernels.contrastive import info_nce_triton

    return info_nce_triton(
        a,
        b,
        logit_scale,
        symmetric=True,
        allow_tf32=allow_tf32,
        max_scratch_bytes=max_scratch_bytes,
    )


def _info_nce_local(
    local_a: Tensor,
    local_b: Tensor,
    all_a: Tensor,
    all_b: Tensor,
    logit_scale: Tensor | float,
    *,
    rank: int,
    backend: str,
    allow_tf32: bool = False,
    max_scratch_bytes: int = INFO_NCE_SCRATCH_BYTES,
) -> Tensor:
    """:func:`info_nce_gathered` with ``local_loss=True`` on checked arguments."""
    la, lb, ga, gb = _common(local_a, local_b, all_a, all_b)
    if resolve_backend(backend, la.device, la.dtype) == "reference":
        from cdds_fast.reference.contrastive import info_nce_gathered as reference_gathered

        return reference_gathered(la, lb, ga, gb, logit_scale, local_loss=True, rank=rank)
    from cdds_fast.kernels.contrastive import info_nce_triton

    offset = la.shape[0] * rank
    loss_a = info_nce_triton(
        la,
        gb,
        logit_scale,
        label_offset=offset,
        symmetric=False,
        allow_tf32=allow_tf32,
        max_scratch_bytes=max_scratch_bytes,
    )
    loss_b = info_nce_triton(
        lb,
        ga,
        logit_scale,
        label_offset=offset,
        symmetric=False,
        allow_tf32=allow_tf32,
        max_scratch_bytes=max_scratch_bytes,
    )
    return (loss_a + loss_b) / 2


def _gather_features(
    a: Tensor,
    b: Tensor,
    *,
    local_loss: bool,
    gather_with_grad: bool,
    rank: int,
    world_size: int,
    use_horovod: bool,
) -> tuple[Tensor, Tensor]:
    """open_clip's ``gather_features``, every setting by keyword; ``use_horovod`` only where the
    installed open_clip still has it (its main branch removed it; :func:`check_distributed`
    refuses ``use_horovod=True`` there)."""
    from open_clip.loss import gather_features

    settings = dict(
        local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size
    )
    if gather_takes_horovod():
        settings["use_horovod"] = use_horovod
    return gather_features(a, b, **settings)


def gathered_info_nce(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor | float,
    *,
    local_loss: bool,
    gather_with_grad: bool,
    rank: int,
    world_size: int,
    use_horovod: bool,
    backend: str,
    allow_tf32: bool = False,
    max_scratch_bytes: int = INFO_NCE_SCRATCH_BYTES,
) -> Tensor:
    """This rank's InfoNCE over features gathered from every rank, as open_clip's ``ClipLoss``
    computes it (docs/method.md section 6): the one DDP path of :class:`FusedClipLoss` and of
    :class:`cdds_fast.CDDSLoss`, on checked arguments (``rank < world_size`` by
    :func:`check_distributed`, so ``rank``'s rows lie inside the gathered ones)."""
    all_a, all_b = _gather_features(
        a,
        b,
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        rank=rank,
        world_size=world_size,
        use_horovod=use_horovod,
    )
    kw = dict(backend=backend, allow_tf32=allow_tf32, max_scratch_bytes=max_scratch_bytes)
    if local_loss:
        return _info_nce_local(a, b, all_a, all_b, logit_scale, rank=rank, **kw)
    return _info_nce(all_a, all_b, logit_scale, **kw)


class FusedClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss`` with an O(B)-memory fused InfoNCE.

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: as in
            ``ClipLoss``; features are gathered with ``open_clip.loss.gather_features`` (so
            gradient flow across ranks is exactly open_clip's). ``cache_labels`` is accepted for
            compatibility (no label tensor exists here); ``use_horovod=True`` is refused where
            the installed open_clip has no horovod support. ``0 <= rank < world_size`` is checked
            when the module is built.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        allow_tf32: fp32 features on TF32 tensor cores (opt-in; the global
            ``torch.backends.cuda.matmul`` TF32 setting does not apply, so IEEE fp32 stays the
            default whatever the rest of the program uses).
        max_scratch_bytes: bound on the blocks of logits large batches are computed in (default
            256 MiB): the extra memory beyond the gradients and O(B D) accumulators.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        backend: str = "auto",
        allow_tf32: bool = False,
        max_scratch_bytes: int = INFO_NCE_SCRATCH_BYTES,
    ) -> None:
        super().__init__()
        check_distributed(rank=rank, world_size=world_size, use_horovod=use_horovod)
        check_backend(backend)
        check_scratch_bytes(max_scratch_bytes)
        self.max_scratch_bytes = max_scratch_bytes
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.allow_tf32 = allow_tf32

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | None = None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        """Same arguments and return value as ``ClipLoss.forward``: the 0-d loss, or
        ``{"contrastive_loss": loss}`` when ``output_dict``."""
        if logit_bias is not None:
            raise ValueError(
                "logit_bias: expected None (FusedClipLoss is CLIP's softmax InfoNCE; a logit bias "
                "belongs to SigLIP's sigmoid loss, open_clip.loss.SigLipLoss), got "
                f"{type(logit_bias).__name__}"
            )
        _check_features(image_features, text_features, ("image_features", "text_features"))
        _check_logit_scale(logit_scale, image_features, "image_features")
        kw = dict(
            backend=self.backend,
            allow_tf32=self.allow_tf32,
            max_scratch_bytes=self.max_scratch_bytes,
        )
        if self.world_size > 1:
            loss = gathered_info_nce(
                image_features,
                text_features,
                logit_scale,
                local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad,
                rank=self.rank,
                world_size=self.world_size,
                use_horovod=self.use_horovod,
                **kw,
            )
        else:
            loss = _info_nce(image_features, text_features, logit_scale, **kw)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
            f"rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}"
        )


__all__ = ["FusedClipLoss", "info_nce", "info_nce_gathered"]
