"""``nn.Module`` front end: the dual-path UNet decoupler (docs/method.md section 1), the CDDS head
and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cdds_fast.dispatch import BACKENDS
from cdds_fast.functional import cdds_loss
from cdds_fast.reference.loss import LOSS_KEYS
from cdds_fast.reference.validation import (
    check_head_settings,
    check_hyper,
    check_key_mask,
    check_number,
    check_tokens,
)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (GELU).

    Attention is ``F.scaled_dot_product_attention`` (fused kernels on GPU) with a key-padding
    mask: padded keys are never attended to, so a padded token never changes a valid output.
    """

    def __init__(self, dim: int, heads: int = 8, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"heads: expected a divisor of dim={dim}, got heads={heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x: ``[B, N, D]``; key_mask: ``[B, N]`` bool (True = valid) or None."""
        q, k, v = rearrange(
            self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads
        )
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(rearrange(y, "b h n d -> b n (h d)"))
        return x + self.mlp(self.norm2(x))


class DualPathDecoupler(nn.Module):
    """Dual-path UNet decoupler of one modality (docs/method.md section 1).

    Encoder blocks ``h_k = E_k(h_{k-1})``; in training, ``z`` noisy copies ``H + sigma * eps^g`` of
    the encoding run through the semantic and modality decoders as ONE batched pass, with additive
    UNet skips ``d_k = F_k(d_{k-1} + h_{n_enc - k})``; the outputs are averaged over the groups. In
    eval mode ``z = 1`` and ``sigma = 0`` (deterministic).
    """

    def __init__(
        self,
        dim: int,
        *,
        n_enc: int = 2,
        n_dec: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        z: int = 4,
        sigma: float = 0.1,
    ) -> None:
        super().__init__()
        check_number("dim", dim, low=1, integer=True)
        check_head_settings(n_enc=n_enc, n_dec=n_dec, heads=heads, mlp_ratio=mlp_ratio, z=z,
                            sigma=sigma)
        self.dim = dim
        self.z, self.sigma = z, sigma
        self.encoder = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(n_enc))
        self.semantic_decoder = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(n_dec))
        self.modality_decoder = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(n_dec))
        self.grad_checkpointing = False

    def _run(self, block: Block, x: Tensor, mask: Tensor | None) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
        return block(x, mask)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decouple tokens into semantic and modality components.

        Args:
            tokens: ``[B, N, D]`` in the decoupler's dtype (any float under autocast).
            mask: ``[B, N]`` bool key-padding mask (True = valid) or None (every token valid).
        Returns:
            ``(semantic, modality)``, each ``[B, N, D]``.
        """
        self._check_inputs(tokens, mask)
        levels = [tokens]
        for block in self.encoder:
            levels.append(self._run(block, levels[-1], mask))
        encoded = levels[-1]
        n_enc = len(self.encoder)
        skips = [
            levels[n_enc - k] if n_enc - k >= 0 else None
            for k in range(1, len(self.semantic_decoder) + 1)
        ]
        z, sigma = (self.z, self.sigma) if self.training else (1, 0.0)
        start = encoded.repeat(z, 1, 1)  # groups stacked on dim 0: (g b) n d
        if sigma > 0:
            start = start + sigma * torch.randn_like(start)
        group_mask = None if mask is None else mask.repeat(z, 1)
        semantic = self._decode_groups(self.semantic_decoder, start, skips, group_mask, z)
        modality = self._decode_groups(self.modality_decoder, start, skips, group_mask, z)
        return semantic, modality

    def _check_inputs(self, tokens: Tensor, mask: Tensor | None, name: str = "tokens",
                     mask_name: str = "mask") -> None:
        """Raise the project's named errors for inputs :meth:`forward` cannot take."""
        check_tokens(name, tokens, dim=self.dim, like=next(self.parameters()))
        if mask is not None:
            check_key_mask(mask_name, mask, name, tokens)

    def _decode_groups(
        self,
        blocks: nn.ModuleList,
        start: Tensor,
        skips: list[Tensor | None],
        mask: Tensor | None,
        z: int,
    ) -> Tensor:
        d = start
        for block, skip in zip(blocks, skips):
            if skip is not None:  # broadcast the skip over the z groups without copying it
                d = (d.unflatten(0, (z, -1)) + skip).flatten(0, 1)
            d = self._run(block, d, mask)
        return d.unflatten(0, (z, -1)).mean(0)


class CDDSHead(nn.Module):
    """Image and text decouplers plus the learnable CDDS vectors (docs/method.md section 1).

    Parameters besides the blocks: ``alpha_image``, ``alpha_text`` ``[D]`` (init 0.5) and
    ``w_s_image``, ``w_m_image``, ``w_s_text``, ``w_m_text`` ``[D]`` (init 1.0).
    """

    PARAM_NAMES = ("alpha_image", "alpha_text", "w_s_image", "w_m_image", "w_s_text", "w_m_text")

    def __init__(
        self,
        dim: int,
        *,
        n_enc: int = 2,
        n_dec: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        z: int = 4,
        sigma: float = 0.1,
    ) -> None:
        super().__init__()
        kw = dict(n_enc=n_enc, n_dec=n_dec, heads=heads, mlp_ratio=mlp_ratio, z=z, sigma=sigma)
        self.dim = dim
        self.image_decoupler = DualPathDecoupler(dim, **kw)
        self.text_decoupler = DualPathDecoupler(dim, **kw)
        self.alpha_image = nn.Parameter(torch.full((dim,), 0.5))
        self.alpha_text = nn.Parameter(torch.full((dim,), 0.5))
        self.w_s_image = nn.Parameter(torch.ones(dim))
        self.w_m_image = nn.Parameter(torch.ones(dim))
        self.w_s_text = nn.Parameter(torch.ones(dim))
        self.w_m_text = nn.Parameter(torch.ones(dim))

    def loss_parameters(self) -> dict[str, Tensor]:
        """The six ``[D]`` vectors by the keyword names :class:`CDDSLoss` takes."""
        return {name: getattr(self, name) for name in self.PARAM_NAMES}

    def forward(
        self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor
    ) -> dict[str, Tensor]:
        """Decouple both modalities.

        Args:
            image_tokens: ``[B, P, D]``; text_tokens: ``[B, L, D]``, both in the head's dtype (any
                float under autocast); text_mask: ``[B, L]`` bool, True = valid. Required, as
                :class:`CDDSLoss` requires it: pass ``torch.ones(B, L, dtype=torch.bool)`` for
                unpadded text.
        Returns:
            dict with ``image_tokens, image_semantic, image_modality, text_tokens, text_semantic,
            text_modality, text_mask`` and the six parameter vectors: everything
            :class:`CDDSLoss` needs except ``logit_scale``.
        """
        if text_mask is None:
            raise TypeError("text_mask: expected a bool torch.Tensor, got NoneType")
        self.image_decoupler._check_inputs(image_tokens, None, "image_tokens")
        self.text_decoupler._check_inputs(text_tokens, text_mask, "text_tokens", "text_mask")
        if text_tokens.shape[0] != image_tokens.shape[0]:
            raise ValueError(
                f"text_tokens: expected batch size {image_tokens.shape[0]} (from image_tokens), "
                f"got shape {list(text_tokens.shape)}"
            )
        image_semantic, image_modality = self.image_decoupler(image_tokens)
        text_semantic, text_modality = self.text_decoupler(text_tokens, text_mask)
        return {
            "image_tokens": image_tokens,
            "image_semantic": image_semantic,
            "image_modality": image_modality,
            "text_tokens": text_tokens,
            "text_semantic": text_semantic,
            "text_modality": text_modality,
            "text_mask": text_mask,
            **self.loss_parameters(),
        }


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
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        check_finite: ``True`` reads the inputs on the host and raises ``ValueError`` on
            non-finite values and on a ``logit_scale`` tensor that is not > 0 (on CUDA this waits
            for the device: a synchronisation per step). ``False``: those value checks become
            device-side assertions, which nothing waits for. ``None`` (default): ``True`` on the
            reference backend, ``False`` on Triton. Shapes, dtypes, devices and settings are
            always checked, on the host, before any compute.
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: open_clip
            ``ClipLoss``'s distributed arguments; only the pooled features of the two contrastive
            terms are gathered (docs/method.md section 6). ``cache_labels`` is accepted for
            compatibility.

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
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if check_finite not in (None, True, False):
            raise TypeError(f"check_finite: expected None, True or False, got {check_finite!r}")
        check_number("world_size", world_size, low=1, integer=True)
        check_number("rank", rank, low=0, high=world_size, integer=True)
        self.a_c, self.a_s, self.a_m, self.a_f = a_c, a_s, a_m, a_f
        self.tau_kl, self.rho = tau_kl, rho
        self.backend, self.check_finite = backend, check_finite
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels = cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod

    def _contrastive(self, backend: str):
        """InfoNCE for the two contrastive terms; gathers pooled features under DDP."""
        if self.world_size <= 1:
            return None
        from open_clip.loss import gather_features

        from cdds_fast.contrastive import info_nce_gathered

        def gathered(a: Tensor, b: Tensor, logit_scale: Tensor | float) -> Tensor:
            all_a, all_b = gather_features(
                a, b, self.local_loss, self.gather_with_grad, self.rank, self.world_size,
                self.use_horovod,
            )
            return info_nce_gathered(
                a, b, all_a, all_b, logit_scale, local_loss=self.local_loss, rank=self.rank,
                backend=backend,
            )

        return gathered

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
            raise ValueError("logit_bias: expected None (CDDS uses CLIP's softmax InfoNCE), got a tensor")
        shape = _batch_and_dim(image_tokens)
        terms = cdds_loss(
            image_tokens, image_semantic, image_modality, text_tokens, text_semantic,
            text_modality, text_mask,
            alpha_image=_as_vector("alpha_image", alpha_image, shape),
            alpha_text=_as_vector("alpha_text", alpha_text, shape),
            w_s_image=_as_vector("w_s_image", w_s_image, shape),
            w_m_image=_as_vector("w_m_image", w_m_image, shape),
            w_s_text=_as_vector("w_s_text", w_s_text, shape),
            w_m_text=_as_vector("w_m_text", w_m_text, shape),
            logit_scale=logit_scale, a_c=self.a_c, a_s=self.a_s, a_m=self.a_m, a_f=self.a_f,
            tau_kl=self.tau_kl, rho=self.rho, backend=self.backend,
            check_finite=self.check_finite, contrastive=self._contrastive(self.backend),
        )
        if output_dict:
            return terms
        return sum(terms[k] for k in LOSS_KEYS)
