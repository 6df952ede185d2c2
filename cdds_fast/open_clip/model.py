"""open_clip integration: :class:`CDDSModel`, a CLIP wrapper that adds the CDDS head.

The wrapper runs an open_clip ``CLIP`` or ``CustomTextCLIP`` with a ``VisionTransformer`` image
tower *token by token* and feeds the projected tokens to a :class:`cdds_fast.CDDSHead`:

* image tokens ``[B, P, D]``: the patch tokens (CLS dropped) after the tower's final LayerNorm
  ``visual.ln_post``, projected with ``visual.proj`` (the same LayerNorm + projection the tower
  applies to its pooled token);
* text tokens ``[B, L, D]``: every position after ``ln_final``, projected with
  ``text_projection``; text mask ``[B, L]``: valid up to and including the end-of-text token (the
  position open_clip pools: ``argmax`` of the token ids for the default tokenizer, the first
  ``eos_id`` for ``pool_type='eos'``; ``token != pad_id`` for ``'first'``/``'last'``/``'none'``).

``forward(image, text)`` returns open_clip's output dict (``image_features``, ``text_features``,
``logit_scale``) where the features are the pooled *semantic* components (docs/method.md section 5:
masked mean over tokens, then L2 normalisation), plus every tensor :class:`cdds_fast.CDDSLoss`
needs, so ``loss(**model_out, output_dict=True)`` works unchanged (in open_clip's trainer and in a
loop of your own: the dict is the default whatever ``output_dict`` the inner model was built
with). Everything except ``logit_scale`` has the batch on dim 0 (the trainer concatenates cached
micro-batch outputs under ``--accum-freq``); the six learnable CDDS vectors are emitted as
``[B, D]`` expanded views, which ``CDDSLoss`` averages back (so their gradients stay exact under
accumulation and DDP).
``encode_image`` / ``encode_text`` return the pooled semantic components too, so any CLIP
evaluation (open_clip's zero-shot and retrieval code, ``cdds-fast eval``) measures CDDS.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdds_fast.contract import check_placement, check_tensor
from cdds_fast.head import CDDSHead
from cdds_fast.open_clip.checkpoint import (
    CDDS_CONFIG_FILENAME,
    Checkpoint,
    infer_depths,
    read_checkpoint,
    register_sidecar_model,
)

__all__ = ["CDDSModel", "eval_transform", "quiet_random_init", "text_valid_mask"]

_HEAD_KEYS = ("n_enc", "n_dec", "heads", "mlp_ratio", "z", "sigma")


def _tower_classes() -> tuple[type, type, type, type]:
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer, VisionTransformer

    return CLIP, CustomTextCLIP, VisionTransformer, TextTransformer


def _check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` / ``ValueError`` (naming the offending tower) for unsupported models."""
    CLIP, CustomTextCLIP, VisionTransformer, TextTransformer = _tower_classes()
    if not isinstance(model, (CLIP, CustomTextCLIP)):
        raise TypeError(
            f"model: expected an open_clip CLIP or CustomTextCLIP, got {type(model).__name__}"
        )
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"model.visual: CDDSModel needs patch tokens from a VisionTransformer image tower, got "
            f"{type(visual).__name__} (ModifiedResNet / TimmModel towers are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError(
            "model.visual: attentional pooling (attentional_pool=True) replaces the patch tokens "
            "by learned queries; CDDSModel needs the patch tokens, use a tower without attn_pool"
        )
    if getattr(visual, "proj", None) is None:
        raise ValueError("model.visual.proj: expected a projection to the joint space, got None")
    if isinstance(model, CustomTextCLIP) and not isinstance(model.text, TextTransformer):
        raise TypeError(
            f"model.text: expected an open_clip TextTransformer text tower, got "
            f"{type(model.text).__name__} (HF text towers are not supported)"
        )
    if getattr(model, "logit_bias", None) is not None:
        raise ValueError(
            "model.logit_bias: expected None; CDDS uses CLIP's softmax InfoNCE, not SigLIP's "
            "sigmoid loss (create the model without init_logit_bias / --siglip)"
        )


def text_valid_mask(
    text: Tensor, pool_type: str = "argmax", eos_id: int | None = None, pad_id: int = 0
) -> Tensor:
    """Valid-token mask of tokenised text, as open_clip's ``text_global_pool`` sees the sequence.

    Args:
        text: ``[B, L]`` token ids.
        pool_type: the text tower's pool type. ``"argmax"`` (default tokenizer: the end-of-text
            token has the largest id): valid up to and including ``argmax``. ``"eos"``: up to and
            including the first ``eos_id`` (the whole row if it has none). ``"first"``,
            ``"last"``, ``"none"``: every token that is not ``pad_id``.
        eos_id: end-of-sequence id for ``pool_type="eos"``.
        pad_id: padding id for the other pool types.
    Returns:
        ``[B, L]`` bool, True = valid, at least one valid token per row (position 0 is forced
        valid for an all-padding row).
    """
    if text.dim() != 2:
        raise ValueError(f"text: expected token ids of shape [B, L], got {list(text.shape)}")
    length = text.shape[1]
    pos = torch.arange(length, device=text.device)
    if pool_type == "argmax":
        mask = pos[None, :] <= text.argmax(dim=-1, keepdim=True)
    elif pool_type == "eos":
        if eos_id is None:
            raise ValueError(
                "eos_id: expected the tokenizer's end-of-sequence id for pool_type='eos'"
            )
        is_eos = text == eos_id
        end = torch.where(
            is_eos.any(-1), is_eos.int().argmax(-1), torch.full_like(text[:, 0], length - 1)
        )
        mask = pos[None, :] <= end[:, None]
    elif pool_type in ("first", "last", "none"):
        mask = text != pad_id
        mask[:, 0] |= ~mask.any(-1)
    else:
        raise ValueError(
            f"pool_type: expected 'argmax', 'eos', 'first', 'last' or 'none', got {pool_type!r}"
        )
    return mask


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _project(x: Tensor, proj: nn.Module | Tensor | None) -> Tensor:
    if proj is None:
        return x
    if isinstance(proj, nn.Linear):
        return proj(x)
    return x @ proj


def _pool(semantic: Tensor, mask: Tensor | None, normalize: bool) -> Tensor:
    """Masked mean over tokens in fp32 (float64 stays), optionally L2-normalised: ``[B, N, D] ->
    [B, D]`` (docs/method.md section 5)."""
    y = semantic if semantic.dtype == torch.float64 else semantic.float()
    if mask is None:
        mean = y.mean(1)
    else:
        weights = mask.to(y.dtype).unsqueeze(-1)
        mean = (y * weights).sum(1) / weights.sum(1)
    return F.normalize(mean, dim=-1) if normalize else mean


class CDDSModel(nn.Module):
    """An open_clip CLIP model with the CDDS head on its token features.

    Args:
        clip: an open_clip ``CLIP`` or ``CustomTextCLIP`` with a ``VisionTransformer`` image tower
            (pretrained or random init). Other towers raise ``TypeError``.
        n_enc, n_dec, heads, mlp_ratio, z, sigma: :class:`cdds_fast.CDDSHead` settings
            (docs/method.md section 1). The head's dim is the joint embedding dim of ``clip``.
        output_dict: ``forward`` returns the dict :class:`cdds_fast.CDDSLoss` takes (default
            True, whatever ``clip.output_dict`` is). ``False`` returns open_clip's
            ``(image_features, text_features, logit_scale)`` tuple instead, which is enough for
            evaluation but not for the loss.

    The head is created on the device and in the dtype of the image tower's projection
    (``precision='bf16'`` / ``'pure_bf16'`` models get a bf16 head).
    Attributes the open_clip trainer touches are forwarded to ``clip``: ``logit_scale`` (the
    inner parameter: the trainer's in-place clamp acts on it), ``logit_bias`` (None), ``visual``,
    ``context_length``, ``vocab_size``; any other attribute not found on the wrapper is looked up
    on ``clip`` as well (``transformer``, ``token_embedding``, ``text``, ...).
    """

    def __init__(
        self,
        clip: nn.Module,
        *,
        n_enc: int = 2,
        n_dec: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        z: int = 4,
        sigma: float = 0.1,
        output_dict: bool = True,
    ) -> None:
        super().__init__()
        _check_supported(clip)
        self.clip = clip
        proj = clip.visual.proj
        dim = int(proj.shape[1])
        text_dim = self._text_output_dim()
        if text_dim is not None and text_dim != dim:
            raise ValueError(
                f"clip: expected the text projection to map to the image embedding dim {dim}, "
                f"got {text_dim}"
            )
        self.cdds_config: dict[str, Any] = dict(
            n_enc=n_enc, n_dec=n_dec, heads=heads, mlp_ratio=mlp_ratio, z=z, sigma=sigma
        )
        self.head = CDDSHead(dim, **self.cdds_config)
        self.head.to(device=proj.device, dtype=proj.dtype)
        self.output_dict = bool(output_dict)

    # ------------------------------------------------------------------ attributes for open_clip
    @property
    def visual(self) -> nn.Module:
        """The image tower (open_clip reads ``visual.image_size``, ``visual.preprocess_cfg``)."""
        return self.clip.visual

    @property
    def logit_scale(self) -> nn.Parameter:
        """The inner model's (log) logit scale parameter; the trainer clamps it in place."""
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> None:
        """Always None (CDDS uses softmax InfoNCE)."""
        return None

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def vocab_size(self) -> int:
        return self.clip.vocab_size

    @property
    def embed_dim(self) -> int:
        """Joint embedding dim ``D`` (the head's dim)."""
        return self.head.dim

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("clip", "head", "module"):
                raise
            clip = self.__dict__["_modules"].get("clip")
            if clip is None:
                raise
            return getattr(clip, name)

    def _text_output_dim(self) -> int | None:
        proj = self._text_parts()["proj"]
        if proj is None:
            return None
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    def _text_parts(self) -> dict[str, Any]:
        clip = self.clip
        if hasattr(clip, "text"):  # CustomTextCLIP
            t = clip.text
            return dict(
                proj=t.text_projection, pool_type=t.pool_type, eos_id=t.eos_id, pad_id=t.pad_id
            )
        return dict(
            proj=clip.text_projection,
            pool_type=clip.text_pool_type,
            eos_id=getattr(clip, "text_eos_id", None),
            pad_id=0,
        )

    # ------------------------------------------------------------------ input checks
    def _check_image(self, image: object) -> Tensor:
        """``image``: float ``[B, 3, H, W]`` at the tower's input size, on its device, in its
        dtype unless autocast is on (the named errors of docs/method.md section 7)."""
        v = self.clip.visual
        weight = v.conv1.weight
        check_tensor("image", image, ndim=4)
        height, width = _pair(v.image_size)
        expected = [weight.shape[1], height, width]
        if list(image.shape[1:]) != expected or image.shape[0] < 1:
            raise ValueError(
                f"image: expected shape [B, {', '.join(map(str, expected))}] (the image tower's "
                f"input; open_clip's preprocess transform makes it), got {list(image.shape)}"
            )
        check_placement("image", image, weight)
        return image

    def _check_text(self, text: object) -> Tensor:
        """``text``: integer token ids ``[B, L]``, ``1 <= L <= context_length``."""
        if not isinstance(text, Tensor):
            raise TypeError(
                f"text: expected a torch.Tensor of token ids, got {type(text).__name__}"
            )
        if text.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"text: expected token ids of dtype torch.int64 or torch.int32 (the tokenizer's "
                f"output), got {text.dtype}"
            )
        if text.dim() != 2 or text.shape[0] < 1 or not 1 <= text.shape[1] <= self.context_length:
            raise ValueError(
                f"text: expected shape [B, L] with 1 <= L <= context_length = "
                f"{self.context_length}, got {list(text.shape)}"
            )
        device = self.logit_scale.device
        if text.device != device:
            raise ValueError(f"text: expected device {device} (the model's), got {text.device}")
        return text

    def _check_pair(self, image: Tensor | None, text: Tensor | None) -> None:
        if image is not None:
            self._check_image(image)
        if text is not None:
            self._check_text(text)
        if image is not None and text is not None and image.shape[0] != text.shape[0]:
            raise ValueError(
                f"text: expected batch size {image.shape[0]} (from image), got shape "
                f"{list(text.shape)}"
            )

    # ------------------------------------------------------------------ token features
    def image_tokens(self, image: Tensor) -> Tensor:
        """Projected patch tokens of the image tower.

        Args:
            image: ``[B, 3, H, W]``.
        Returns:
            ``[B, P, D]``: ``ln_post(x[:, 1:]) @ visual.proj`` after the tower's transformer (CLS
            dropped; with patch dropout in training, ``P`` is the number of kept patches).
        """
        self._check_image(image)
        v = self.clip.visual
        if hasattr(v, "_embeds"):
            x = v._embeds(image)
        else:  # pragma: no cover - open_clip < 2.25 without VisionTransformer._embeds
            x = v.conv1(image).flatten(2).transpose(1, 2)
            cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
            x = v.ln_pre(v.patch_dropout(x))
        x = v.transformer(x)
        return v.ln_post(x[:, 1:]) @ v.proj

    def text_tokens(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """Projected text tokens and their valid mask.

        Args:
            text: ``[B, L]`` token ids (``L <= context_length``).
        Returns:
            ``(tokens [B, L, D], mask [B, L] bool)``.
        """
        self._check_text(text)
        clip = self.clip
        parts = self._text_parts()
        if hasattr(clip, "text"):  # CustomTextCLIP: the tower builds its own masks
            t = clip.text
            x, attn_mask = t._embeds(text)
            x = t.transformer(x, attn_mask=attn_mask)
            if t.cls_emb is not None:  # appended class token (CoCa-style): not a text token
                x = x[:, :-1]
            x = t.ln_final(x)
        else:  # CLIP keeps its text tower in pieces
            length = text.shape[1]
            cast_dtype = clip.transformer.get_cast_dtype()
            x = clip.token_embedding(text).to(cast_dtype)
            x = x + clip.positional_embedding[:length].to(cast_dtype)
            attn_mask = clip.attn_mask
            if attn_mask is not None:
                attn_mask = attn_mask[:length, :length]
            x = clip.transformer(x, attn_mask=attn_mask)
            x = clip.ln_final(x)
        tokens = _project(x, parts["proj"])
        mask = text_valid_mask(text, parts["pool_type"], parts["eos_id"], parts["pad_id"])
        return tokens, mask

    # ------------------------------------------------------------------ CLIP API
    def _decouple_image(self, image: Tensor) -> dict[str, Tensor]:
        tokens = self.image_tokens(image)
        semantic, modality = self.head.image_decoupler(tokens.to(self._head_dtype()))
        return {"image_tokens": tokens, "image_semantic": semantic, "image_modality": modality}

    def _decouple_text(self, text: Tensor) -> dict[str, Tensor]:
        tokens, mask = self.text_tokens(text)
        semantic, modality = self.head.text_decoupler(tokens.to(self._head_dtype()), mask)
        return {
            "text_tokens": tokens,
            "text_semantic": semantic,
            "text_modality": modality,
            "text_mask": mask,
        }

    def _head_dtype(self) -> torch.dtype:
        return self.head.alpha_image.dtype

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """Pooled semantic component of the image: ``[B, 3, H, W] -> [B, D]`` (float32).

        Masked mean over the patch tokens of ``V^s``; L2-normalised when ``normalize``.
        """
        return _pool(self._decouple_image(image)["image_semantic"], None, normalize)

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """Pooled semantic component of the text: ``[B, L] -> [B, D]`` (float32).

        Masked mean over the valid tokens of ``T^s``; L2-normalised when ``normalize``.
        """
        out = self._decouple_text(text)
        return _pool(out["text_semantic"], out["text_mask"], normalize)

    def get_logits(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits_per_image [B_i, B_t], logits_per_text [B_t, B_i])`` as in open_clip."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logits = self._scale().to(image_features.dtype) * image_features @ text_features.T
        return logits, logits.T

    def _scale(self) -> Tensor:
        scale = self.clip.logit_scale.exp()
        return scale.reshape(()) if scale.numel() == 1 else scale

    def forward(
        self, image: Tensor | None = None, text: Tensor | None = None
    ) -> dict[str, Tensor] | tuple[Tensor | None, Tensor | None, Tensor]:
        """Run the towers and the CDDS head.

        Args:
            image: ``[B, 3, H, W]`` or None. text: ``[B, L]`` token ids or None.
        Returns:
            With ``output_dict`` a dict: ``image_features`` / ``text_features`` ``[B, D]``
            (float32, L2-normalised pooled semantic components), ``logit_scale`` (0-d,
            exponentiated) and, for each given modality, ``{image,text}_tokens``,
            ``{image,text}_semantic``, ``{image,text}_modality`` ``[B, P|L, D]``, ``text_mask``
            ``[B, L]`` bool and the head's vectors ``alpha_image, w_s_image, w_m_image`` /
            ``alpha_text, w_s_text, w_m_text`` as ``[B, D]`` expanded views. Without
            ``output_dict`` the tuple ``(image_features, text_features, logit_scale)``.
        """
        self._check_pair(image, text)
        out: dict[str, Tensor] = {}
        image_features = text_features = None
        if image is not None:
            out.update(self._decouple_image(image))
            image_features = _pool(out["image_semantic"], None, True)
            batch = image.shape[0]
            for name in ("alpha_image", "w_s_image", "w_m_image"):
                out[name] = getattr(self.head, name).expand(batch, -1)
        if text is not None:
            out.update(self._decouple_text(text))
            text_features = _pool(out["text_semantic"], out["text_mask"], True)
            batch = text.shape[0]
            for name in ("alpha_text", "w_s_text", "w_m_text"):
                out[name] = getattr(self.head, name).expand(batch, -1)
        logit_scale = self._scale()
        if not self.output_dict:
            return image_features, text_features, logit_scale
        out["image_features"] = image_features
        out["text_features"] = text_features
        out["logit_scale"] = logit_scale
        return out

    # ------------------------------------------------------------------ training controls
    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the image tower (LiT), as open_clip's ``lock_image_tower``; the head stays
        trainable."""
        self.clip.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text tower, as open_clip's ``lock_text_tower``; the head stays trainable."""
        self.clip.lock_text_tower(
            unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in both towers and in both decouplers."""
        self.clip.set_grad_checkpointing(enable)
        self.head.image_decoupler.grad_checkpointing = enable
        self.head.text_decoupler.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """open_clip's no-weight-decay names, prefixed for the wrapper (used by timm optimizers)."""
        names = {"clip." + n for n in getattr(self.clip, "no_weight_decay", lambda: set())()}
        return names | {"head." + n for n in CDDSHead.PARAM_NAMES}

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | Checkpoint,
        model_name: str | None = None,
        *,
        pretrained: str | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        strict: bool = True,
        **cdds_kwargs: Any,
    ) -> CDDSModel:
        """Build the wrapper and load a checkpoint written by ``cdds-fast train``, in eval mode.

        Args:
            path: an open_clip training checkpoint (``{"state_dict": ...}``, with or without
                DDP's ``module.`` prefixes) or a bare state dict of a :class:`CDDSModel`; or the
                :class:`~cdds_fast.open_clip.checkpoint.Checkpoint` that
                :func:`~cdds_fast.open_clip.checkpoint.read_checkpoint` made of one (not read
                again).
            model_name: open_clip model name. Default: read from the ``cdds_config.json`` the
                launcher writes next to the checkpoints, which also holds the model's config
                (registered with open_clip here, so a custom config needs no file of its own and
                a moved run folder still loads).
            pretrained: open_clip pretrained tag to build the towers from (the checkpoint
                overwrites the weights anyway; default None: random init, no download).
            device, precision: as open_clip's ``create_model``.
            strict: ``load_state_dict`` strictness.
            **cdds_kwargs: head settings (``n_enc, n_dec, heads, mlp_ratio, z, sigma``); default:
                the side-car's values, ``n_enc`` / ``n_dec`` inferred from the state dict.
        Returns:
            the loaded model, in eval mode.
        """
        import open_clip

        checkpoint = path if isinstance(path, Checkpoint) else read_checkpoint(path)
        sidecar = checkpoint.sidecar
        register_sidecar_model(sidecar)
        if model_name is None:
            model_name = sidecar.get("model")
        if model_name is None:
            raise ValueError(
                f"model_name: expected an open_clip model name (no {CDDS_CONFIG_FILENAME} found "
                f"next to {checkpoint.path}), got None"
            )
        kwargs = {k: v for k, v in (sidecar.get("cdds") or {}).items() if k in _HEAD_KEYS}
        kwargs.update(infer_depths(checkpoint.state))
        kwargs.update(cdds_kwargs)
        clip = open_clip.create_model(model_name, pretrained, precision=precision, device=device)
        model = cls(clip, **kwargs, output_dict=True)
        model.load_state_dict(checkpoint.state, strict=strict)
        return model.eval()


def eval_transform(model: nn.Module) -> Any:
    """open_clip's evaluation preprocessing for ``model``'s image tower (resize, centre crop,
    normalisation from its ``preprocess_cfg``): the ``preprocess`` that
    ``open_clip.create_model_and_transforms`` returns, for a model built another way (such as
    :meth:`CDDSModel.from_checkpoint`). PIL image in, ``[3, H, W]`` float tensor out."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(
        PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False
    )


@contextlib.contextmanager
def quiet_random_init():
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" warning (towers
    built for random-init demos, or for a checkpoint that overwrites every weight anyway)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
