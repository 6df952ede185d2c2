"""``CDDSLoss``: the CDDS loss as an ``nn.Module``, a drop-in for open_clip's ``ClipLoss`` in a
CDDS training step (docs/method.md sections 5-6)."""

from __future__ import annotations

import functools

from torch import Tensor, nn

from cdds_fast.contract import LOSS_KEYS, Contrastive, check_distributed, check_hyper
from cdds_fast.contrastive import gathered_info_nce
from cdds_fast.dispatch import check_backend
from cdds_fast.functional import cdds_loss


def _as_vector(name: str, value: Tensor, batch_dim: tuple[int, int] | None) -> Tensor:
    """Accept a ``[D]`` parameter, or the ``[B, D]`` batch-replicated copy a model wrapper emits.

    Models put their vectors in the output with the batch on dim 0 (open_clip's trainer
    concatenates micro-batch outputs under ``--accum-freq``); the mean over identical rows gives
    the value back and spreads the gradient so that its sum reaches the parameter. Any other shape
    is refused here, as the caller passed it (``batch_dim`` is ``(B, D)`` of ``image_tokens``, or
    None when those are not a 3-d tensor: the loss's own checks then name ``image_tokens``).
    """
    if not isinstance(value, Tensor) or batch_dim is None or value.dim() == 1:
        return value
    batch, dim = batch_dim
    if list(value.shape) != [batch, dim]:
        raise ValueError(
            f"{name}: expected shape [D] = [{dim}] or batch-replicated [B, D] = [{batch}, {dim}] "
            f"(from image_tokens), got {list(value.shape)}"
        )
    return value.mean(0)


def _batch_and_dim(image_tokens: object) -> tuple[int, int] | None:
    if isinstance(image_tokens, Tensor) and image_tokens.dim() == 3:
        return image_tokens.shape[0], image_tokens.shape[2]
    return None


class CDDSLoss(nn.Module):
    """CDDS loss module: a drop-in for open_clip's ``ClipLoss`` in a CDDS training step.

    Args:
        a_c, a_s, a_m, a_f: term weights, ``a_c, a_s, a_m >= 0`` and ``a_f`` in ``[0, 1]``
            (docs/method.md section 5; ``a_c = 0`` is the paper's objective).
        tau_kl, rho: related-weights temperature (``> 0``) and threshold clamp (in
            ``[1e-6, 1)``), docs/method.md section 3.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``
            (:func:`cdds_fast.functional.cdds_loss`).
        check_finite: ``True`` reads the inputs on the host and raises ``ValueError`` on
            non-finite values and on a ``logit_scale`` tensor that is not > 0 (on CUDA this waits
            for the device: a synchronisation per step). ``False``: those value checks become
            device-side assertions, which nothing waits for. ``None`` (default): ``True`` on the
            reference backend, ``False`` on Triton. Shapes, dtypes, devices and settings are
            always checked, on the host, before any compute.
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: open_clip
            ``ClipLoss``'s distributed arguments; only the pooled features of the two contrastive
            terms are gathered (docs/method.md section 6). ``cache_labels`` is accepted for
            compatibility; ``use_horovod=True`` is refused where the installed open_clip has no
            horovod support.

    Nonsense settings are refused when the module is built (``ValueError`` / ``TypeError``
    naming the argument).
    """

    def __init__(
        self,
        a_c: float = 1.0,
        a_s: float = 1.0,
        a_m: float = 0.1,
        a_f: float = 0.5,
        *,
        tau_kl: float = 1.0,
        rho: float = 0.01,
        backend: str = "auto",
        check_finite: bool | None = None,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ) -> None:
        super().__init__()
        check_hyper(tau_kl=tau_kl, rho=rho, a_c=a_c, a_s=a_s, a_m=a_m, a_f=a_f)
        check_backend(backend)
        if check_finite not in (None, True, False):
            raise TypeError(f"check_finite: expected None, True or False, got {check_finite!r}")
        check_distributed(rank=rank, world_size=world_size, use_horovod=use_horovod)
        self.a_c, self.a_s, self.a_m, self.a_f = a_c, a_s, a_m, a_f
        self.tau_kl, self.rho = tau_kl, rho
        self.backend, self.check_finite = backend, check_finite
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels = cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod

    def _contrastive(self) -> Contrastive | None:
        """Under DDP, the InfoNCE of the two contrastive terms over the pooled features of every
        rank (docs/method.md section 6); None: the backend's local one. The features it gets are
        the loss's own pooled ones, of inputs :func:`cdds_loss` has checked."""
        if self.world_size <= 1:
            return None
        return functools.partial(
            gathered_info_nce,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
            use_horovod=self.use_horovod,
            backend=self.backend,
        )

    def forward(
        self,
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
        output_dict: bool = False,
        image_features: Tensor | None = None,
        text_features: Tensor | None = None,
        logit_bias: Tensor | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """The total loss, or with ``output_dict=True`` the five weighted terms (docs/method.md
        section 5).

        Shapes as :func:`cdds_fast.functional.cdds_loss`; the six parameter vectors may also be
        ``[B, D]`` batch-replicated copies. ``logit_scale`` is CLIP's *exponentiated* scale
        (``model.logit_scale.exp()``), a 0-d tensor or a number, finite and > 0.
        ``image_features`` / ``text_features`` (a model wrapper's pooled outputs) are accepted and
        ignored: the loss pools the components itself.
        """
        if logit_bias is not None:
            raise ValueError(
                "logit_bias: expected None (CDDS uses CLIP's softmax InfoNCE), got a tensor"
            )
        shape = _batch_and_dim(image_tokens)
        terms = cdds_loss(
            image_tokens,
            image_semantic,
            image_modality,
            text_tokens,
            text_semantic,
            text_modality,
            text_mask,
            alpha_image=_as_vector("alpha_image", alpha_image, shape),
            alpha_text=_as_vector("alpha_text", alpha_text, shape),
            w_s_image=_as_vector("w_s_image", w_s_image, shape),
            w_m_image=_as_vector("w_m_image", w_m_image, shape),
            w_s_text=_as_vector("w_s_text", w_s_text, shape),
            w_m_text=_as_vector("w_m_text", w_m_text, shape),
            logit_scale=logit_scale,
            a_c=self.a_c,
            a_s=self.a_s,
            a_m=self.a_m,
            a_f=self.a_f,
            tau_kl=self.tau_kl,
            rho=self.rho,
            backend=self.backend,
            check_finite=self.check_finite,
            contrastive=self._contrastive(),
        )
        if output_dict:
            return terms
        return sum(terms[k] for k in LOSS_KEYS)
