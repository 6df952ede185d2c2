"""The interface every image-caption dataset of cdds-fast shares: :class:`CaptionedImages`.

Every dataset (:class:`cdds_fast.data.SceneCaptions`, the embedded default;
:class:`cdds_fast.data.KarpathyRetrieval`; :class:`cdds_fast.data.CsvRetrieval`) derives from it,
which gives one interface to training and to evaluation:

* ``num_images``; ``images(i) -> PIL.Image`` (RGB, untransformed); ``captions(i) -> list[str]``.
* ``text_to_image``: ``LongTensor [N_txt]``, the image index of every caption in the flat caption
  order (image 0's captions first, in their order, then image 1's, ...); ``all_captions()`` is that
  flat list of strings. This is what :func:`cdds_fast.eval.retrieval.encode_dataset` consumes.
* As a ``torch.utils.data.Dataset`` it is the list of (image, caption) *pairs* in the flat
  caption order: ``len(ds) == N_txt`` and item ``k`` is ``(image text_to_image[k], caption k)``.
  With exactly 5 captions per image, item ``k`` is image ``k // 5`` with its caption ``k % 5``.
  The image is ``transform(PIL image)`` when a transform is set, else a float tensor
  ``[3, H, W]`` in ``[0, 1]``; the caption is ``tokenizer(caption)[0]`` when a tokenizer is set,
  else the string.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["CAPTIONS_PER_IMAGE", "CaptionedImageFiles", "CaptionedImages", "pil_to_tensor"]

#: Captions per image in the standard Flickr30K / MS-COCO retrieval protocol.
CAPTIONS_PER_IMAGE = 5


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float32 tensor ``[3, H, W]`` in ``[0, 1]`` (converted to RGB first)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _checked_index(k: object, n: int, what: str, items: str) -> int:
    """``k`` as an index into ``n`` items (negative ones count from the end)."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"{what} must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 0:
        k += n
    if not 0 <= k < n:
        raise IndexError(f"{what} {k} out of range for {n} {items}")
    return k


class CaptionedImages(Dataset):
    """Base class: images, each with one or more captions (see the module docstring).

    Subclasses implement :attr:`num_images`, :meth:`captions` and :meth:`_load_image`, and either
    set ``captions_per_image`` (a constant count, e.g. 5) or leave it ``None`` and let the base
    class count ``len(captions(i))`` for every image.

    Args:
        transform: applied to the PIL image in ``__getitem__`` (e.g. open_clip's ``preprocess``).
            ``None``: float tensor ``[3, H, W]`` in ``[0, 1]``.
        tokenizer: applied as ``tokenizer(caption)[0]`` in ``__getitem__`` (e.g.
            ``open_clip.get_tokenizer(name)``, giving a ``LongTensor [context_length]``).
            ``None``: the caption string.
    """

    captions_per_image: int | None = None

    def __init__(self, transform: Callable | None = None, tokenizer: Callable | None = None):
        self.transform = transform
        self.tokenizer = tokenizer
        self._offsets: list[int] | None = None

    # -- to implement ---------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Number of images ``N_img``."""
        raise NotImplementedError

    def captions(self, i: int) -> list[str]:
        """The captions of image ``i`` (a new list)."""
        raise NotImplementedError

    def _load_image(self, i: int) -> Image.Image:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def _check_image_index(self, i: int) -> int:
        return _checked_index(i, self.num_images, "image index", "images")

    def images(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image (no transform applied)."""
        return self._load_image(self._check_image_index(i)).convert("RGB")

    def _caption_offsets(self) -> list[int]:
        """``offsets[i]`` = flat index of image i's first caption; ``offsets[-1] = N_txt``."""
        if self._offsets is None:
            if self.captions_per_image is not None:
                c = self.captions_per_image
                self._offsets = [i * c for i in range(self.num_images + 1)]
            else:
                counts = [len(self.captions(i)) for i in range(self.num_images)]
                self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        return self._offsets

    @property
    def num_captions(self) -> int:
        """Number of captions ``N_txt`` (= ``len(self)``)."""
        return self._caption_offsets()[-1]

    @property
    def text_to_image(self) -> torch.Tensor:
        """``LongTensor [N_txt]``: image index of each caption, in the flat caption order."""
        offsets = self._caption_offsets()
        counts = torch.tensor(np.diff(offsets), dtype=torch.long)
        return torch.repeat_interleave(torch.arange(self.num_images), counts)

    def all_captions(self) -> list[str]:
        """All captions in the flat order (length ``N_txt``, aligned with :attr:`text_to_image`)."""
        out: list[str] = []
        for i in range(self.num_images):
            out.extend(self.captions(i))
        return out

    def pair_index(self, k: int) -> tuple[int, int]:
        """Flat caption index ``k`` -> ``(image index, caption index within that image)``."""
        k = _checked_index(k, len(self), "index", "image-caption pairs")
        if self.captions_per_image is not None:
            return divmod(k, self.captions_per_image)
        offsets = self._caption_offsets()
        i = bisect.bisect_right(offsets, k) - 1
        return i, k - offsets[i]

    def __len__(self) -> int:
        return self.num_captions

    def __getitem__(self, k: int) -> tuple[Any, Any]:
        i, j = self.pair_index(k)
        image = self._load_image(i).convert("RGB")
        image = self.transform(image) if self.transform is not None else pil_to_tensor(image)
        caption = self.captions(i)[j]
        if self.tokenizer is not None:
            caption = self.tokenizer(caption)[0]
        return image, caption

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_images={self.num_images}, num_captions={len(self)})"


class CaptionedImageFiles(CaptionedImages):
    """Images stored as files, captions held in memory (the Karpathy and CSV datasets): a
    subclass sets ``image_paths`` (one per image) and ``_captions`` (each image's captions) and
    says in :meth:`image_path` where a path points."""

    image_paths: list[str]
    _captions: list[list[str]]

    @property
    def num_images(self) -> int:
        """Number of images (one per entry of ``image_paths``)."""
        return len(self.image_paths)

    def captions(self, i: int) -> list[str]:
        return list(self._captions[self._check_image_index(i)])

    def image_path(self, i: int) -> Path:
        """The file of image ``i``."""
        raise NotImplementedError

    def _load_image(self, i: int) -> Image.Image:
        with Image.open(self.image_path(i)) as im:
            return im.convert("RGB")
