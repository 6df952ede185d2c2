"""The CDDS head: the dual-path UNet decoupler of one modality (docs/method.md section 1) and the
head that runs one per modality and holds the loss's six learnable vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cdds_fast.contract import (
    VECTOR_NAMES,
    check_head_settings,
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
        check_head_settings(
            n_enc=n_enc, n_dec=n_dec, heads=heads, mlp_ratio=mlp_ratio, z=z, sigma=sigma
        )
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

    def _check_inputs(
        self, tokens: Tensor, mask: Tensor | None, name: str = "tokens", mask_name: str = "mask"
    ) -> None:
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
        for block, skip in zip(blocks, skips, strict=True):
            if skip is not None:  # broadcast the skip over the z groups without copying it
                d = (d.unflatten(0, (z, -1)) + skip).flatten(0, 1)
            d = self._run(block, d, mask)
        return d.unflatten(0, (z, -1)).mean(0)


class CDDSHead(nn.Module):
    """Image and text decouplers plus the learnable CDDS vectors (docs/method.md section 1).

    Parameters besides the blocks: ``alpha_image``, ``alpha_text`` ``[D]`` (init 0.5) and
    ``w_s_image``, ``w_m_image``, ``w_s_text``, ``w_m_text`` ``[D]`` (init 1.0).
    """

    PARAM_NAMES = VECTOR_NAMES

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
