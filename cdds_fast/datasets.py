"""Image-caption datasets for training and cross-modal retrieval evaluation.

Every dataset here (and :class:`cdds_fast.data.SceneCaptions`, the embedded default) derives from
:class:`CaptionedImages`, which gives one interface to training and to evaluation:

* ``num_images``; ``images(i) -> PIL.Image`` (RGB, untransformed); ``captions(i) -> list[str]``.
* ``text_to_image``: ``LongTensor [N_txt]``, the image index of every caption in the flat caption
  order (image 0's captions first, in their order, then image 1's, ...); ``all_captions()`` is that
  flat list of strings. This is what :func:`cdds_fast.retrieval.encode_dataset` consumes.
* As a ``torch.utils.data.Dataset`` it is the list of (image, caption) *pairs* in the flat
  caption order: ``len(ds) == N_txt`` and item ``k`` is ``(image text_to_image[k], caption k)``.
  With exactly 5 captions per image, item ``k`` is image ``k // 5`` with its caption ``k % 5``.
  The image is ``transform(PIL image)`` when a transform is set, else a float tensor
  ``[3, H, W]`` in ``[0, 1]``; the caption is ``tokenizer(caption)[0]`` when a tokenizer is set,
  else the string.

Real data loaders:

* :class:`KarpathyRetrieval`: the Karpathy-split JSON files used for Flickr30K and MS-COCO
  (``dataset_flickr30k.json``, ``dataset_coco.json``), with the MS-COCO 5K test protocol (the whole
  5,000-image test split) and the 1K protocol (5 folds of 1,000 consecutive test images, metrics
  averaged over the folds: :func:`cdds_fast.retrieval.average_metrics`).
* :class:`CsvRetrieval`: open_clip's CSV training format (one row per image-caption pair); rows that
  share an image path become one image with several captions.
"""

from __future__ import annotations

import bisect
import copy
import csv
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "COCO_1K_FOLDS",
    "COCO_1K_FOLD_SIZE",
    "COCO_5K_TEST_IMAGES",
    "CaptionedImages",
    "CsvRetrieval",
    "KarpathyRetrieval",
    "coco_1k_folds",
    "pil_to_tensor",
]

#: Captions per image in the standard Flickr30K / MS-COCO retrieval protocol.
CAPTIONS_PER_IMAGE = 5
#: MS-COCO 1K protocol: the 5K test split cut into this many folds ...
COCO_1K_FOLDS = 5
#: ... of this many consecutive images each (in the JSON file's order).
COCO_1K_FOLD_SIZE = 1000
#: Images in the Karpathy MS-COCO test split (the 5K protocol).
COCO_5K_TEST_IMAGES = COCO_1K_FOLDS * COCO_1K_FOLD_SIZE

_KARPATHY_SPLITS = ("train", "val", "test", "restval")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float32 tensor ``[3, H, W]`` in ``[0, 1]`` (converted to RGB first)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


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
        n = self.num_images
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"image index must be an int, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        return i

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
        n = len(self)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
            raise TypeError(f"index must be an int, got {type(k).__name__}")
        k = int(k)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"index {k} out of range for {n} image-caption pairs")
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


def _parse_splits(split: str) -> tuple[str, ...]:
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    parts = tuple(p.strip() for p in split.split("+"))
    for p in parts:
        if p not in _KARPATHY_SPLITS:
            raise ValueError(
                f"split must be one of {_KARPATHY_SPLITS} or several joined with '+' "
                f"(e.g. 'train+restval'), got {split!r}"
            )
    return parts


class KarpathyRetrieval(CaptionedImages):
    """Flickr30K / MS-COCO in the Karpathy-split JSON format, 5 captions per image.

    The JSON is ``{"images": [{"filename": ..., "filepath": ... (COCO only), "split": "train" |
    "val" | "test" | "restval", "sentences": [{"raw": ...}, ...]}, ...]}``. Image ``i`` of the
    dataset is the ``i``-th entry of the chosen split, in file order, loaded from
    ``image_root / filepath / filename`` (``image_root / filename`` when there is no
    ``filepath``; for COCO pass the folder that holds ``train2014/`` and ``val2014/``).

    Captions: the standard protocol uses exactly 5 captions per image. Some MS-COCO images have 6
    or 7; only the first 5 (in file order) are kept, as the standard evaluation code does. An image
    with fewer than 5 is an error (``ValueError`` naming the file).

    Protocols:

    * Flickr30K: ``split="test"`` (1,000 images, 5,000 captions).
    * MS-COCO 5K: ``split="test"`` (5,000 images, 25,000 captions).
    * MS-COCO 1K: ``split="test", coco_1k_fold=k`` for ``k`` in ``0..4``: images
      ``[1000 k, 1000 (k + 1))`` of the 5K test split; report the mean over the 5 folds
      (:func:`coco_1k_folds` builds all five; :func:`cdds_fast.retrieval.average_metrics` averages;
      :func:`cdds_fast.retrieval.fold_metrics` does the same from the 5K features directly).
    * Training: ``split="train"`` (Flickr30K), ``split="train+restval"`` (the usual MS-COCO
      training set of 113K images).

    Args:
        json_path: path of ``dataset_flickr30k.json`` / ``dataset_coco.json``.
        image_root: folder the image paths are relative to.
        split: ``"train"``, ``"val"``, ``"test"``, ``"restval"``, or several joined by ``"+"``.
        transform: see :class:`CaptionedImages`.
        coco_1k_fold: ``None`` (all images of the split) or the 1K-protocol fold ``0..4``; needs
            ``split="test"`` with exactly 5,000 images.
        tokenizer: see :class:`CaptionedImages`.
        check_files: check at construction that the first image file exists (a wrong
            ``image_root`` then fails early, with the path it looked for).
    """

    captions_per_image = CAPTIONS_PER_IMAGE

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_root: str | os.PathLike,
        split: str = "test",
        transform: Callable | None = None,
        coco_1k_fold: int | None = None,
        *,
        tokenizer: Callable | None = None,
        check_files: bool = True,
    ):
        super().__init__(transform=transform, tokenizer=tokenizer)
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        self.split = split
        self.coco_1k_fold: int | None = None
        splits = _parse_splits(split)
        with open(self.json_path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(
                f"{self.json_path}: expected a Karpathy-split JSON object with an 'images' list"
            )
        self.dataset_name: str | None = data.get("dataset")

        root = str(self.image_root)
        paths: list[str] = []
        caps: list[list[str]] = []
        for n, entry in enumerate(data["images"]):
            if entry.get("split") not in splits:
                continue
            if "filename" not in entry:
                raise ValueError(f"{self.json_path}: image entry {n} has no 'filename'")
            path = os.path.join(root, entry.get("filepath", ""), entry["filename"])
            sentences = entry.get("sentences", [])
            if len(sentences) < CAPTIONS_PER_IMAGE:
                raise ValueError(
                    f"{self.json_path}: image {entry['filename']!r} (entry {n}) has "
                    f"{len(sentences)} captions; the retrieval protocol needs "
                    f"{CAPTIONS_PER_IMAGE} per image"
                )
            texts = []
            for sent in sentences[:CAPTIONS_PER_IMAGE]:
                if "raw" in sent:
                    texts.append(str(sent["raw"]).strip())
                elif "tokens" in sent:
                    texts.append(" ".join(sent["tokens"]))
                else:
                    raise ValueError(
                        f"{self.json_path}: a sentence of image {entry['filename']!r} has "
                        f"neither 'raw' nor 'tokens'"
                    )
            paths.append(path)
            caps.append(texts)
        if not paths:
            raise ValueError(f"{self.json_path}: no images in split {split!r}")
        #: image file paths (strings: ``image_root/filepath/filename``), one per image
        self.image_paths: list[str] = paths
        self._captions: list[list[str]] = caps
        if coco_1k_fold is not None:
            self._select_fold(coco_1k_fold)
        if check_files and not os.path.isfile(self.image_paths[0]):
            raise FileNotFoundError(
                f"image file {self.image_paths[0]} not found (image_root={root!r}; for MS-COCO "
                f"image_root is the folder holding train2014/ and val2014/)"
            )

    def _select_fold(self, fold: int) -> None:
        """Restrict the 5K test split to 1K-protocol fold ``fold`` (in place)."""
        if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)):
            raise TypeError(f"coco_1k_fold must be None or an int, got {type(fold).__name__}")
        if not 0 <= fold < COCO_1K_FOLDS:
            raise ValueError(f"coco_1k_fold must be in 0..{COCO_1K_FOLDS - 1}, got {fold}")
        if _parse_splits(self.split) != ("test",):
            raise ValueError(f"coco_1k_fold needs split='test', got split={self.split!r}")
        if self.coco_1k_fold is not None or len(self.image_paths) != COCO_5K_TEST_IMAGES:
            raise ValueError(
                f"coco_1k_fold needs the MS-COCO 5K test split ({COCO_5K_TEST_IMAGES} images); "
                f"{self.json_path} has {len(self.image_paths)} test images"
            )
        lo = int(fold) * COCO_1K_FOLD_SIZE
        self.image_paths = self.image_paths[lo : lo + COCO_1K_FOLD_SIZE]
        self._captions = self._captions[lo : lo + COCO_1K_FOLD_SIZE]
        self.coco_1k_fold = int(fold)
        self._offsets = None

    @property
    def num_images(self) -> int:
        """Number of images in the split (or fold)."""
        return len(self.image_paths)

    def captions(self, i: int) -> list[str]:
        """The 5 captions of image ``i``."""
        return list(self._captions[self._check_image_index(i)])

    def image_path(self, i: int) -> Path:
        """Path of image ``i``."""
        return Path(self.image_paths[self._check_image_index(i)])

    def _load_image(self, i: int) -> Image.Image:
        with Image.open(self.image_paths[i]) as im:
            return im.convert("RGB")


def coco_1k_folds(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    transform: Callable | None = None,
    **kwargs: Any,
) -> list[KarpathyRetrieval]:
    """The 5 MS-COCO 1K-protocol folds, equal to ``KarpathyRetrieval(json_path, image_root,
    "test", transform, coco_1k_fold=k, **kwargs)`` for ``k = 0..4`` (the JSON is read once).

    Evaluate each, then average with :func:`cdds_fast.retrieval.average_metrics` (or encode the
    5K test split once and use :func:`cdds_fast.retrieval.fold_metrics`).
    """
    full = KarpathyRetrieval(json_path, image_root, "test", transform, **kwargs)
    folds = []
    for k in range(COCO_1K_FOLDS):
        fold = copy.copy(full)
        fold._select_fold(k)
        folds.append(fold)
    return folds


class CsvRetrieval(CaptionedImages):
    """open_clip's CSV format (``--dataset-type csv``) as a retrieval dataset.

    One row per image-caption pair; rows with the same image path are grouped into one image whose
    captions are those rows' captions in row order. Images are numbered in order of first
    appearance. Any number (>= 1) of captions per image is allowed; the retrieval metrics take the
    mapping from :attr:`text_to_image`.

    Args:
        csv_path: the CSV file (first line is the header).
        img_key: column with the image paths (open_clip ``--csv-img-key``).
        caption_key: column with the captions (open_clip ``--csv-caption-key``).
        sep: one-character field separator (open_clip ``--csv-separator``, default tab).
        transform: see :class:`CaptionedImages`.
        tokenizer: see :class:`CaptionedImages`.
        image_root: folder that relative image paths are relative to. ``None``: as open_clip
            does, relative paths are opened relative to the current working directory.
        check_files: check at construction that the first image file exists (a CSV whose paths
            are relative to another folder then fails early, naming ``image_root``).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str = "\t",
        transform: Callable | None = None,
        *,
        tokenizer: Callable | None = None,
        image_root: str | os.PathLike | None = None,
        check_files: bool = True,
    ):
        super().__init__(transform=transform, tokenizer=tokenizer)
        if not isinstance(sep, str) or len(sep) != 1:
            raise ValueError(f"sep must be a one-character string, got {sep!r}")
        self.csv_path = Path(csv_path)
        self.image_root = Path(image_root) if image_root is not None else None
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            for arg, key in (("img_key", img_key), ("caption_key", caption_key)):
                if key not in columns:
                    raise ValueError(
                        f"{arg}={key!r} is not a column of {self.csv_path}; columns are {columns} "
                        f"(separator {sep!r})"
                    )
            index: dict[str, int] = {}
            paths: list[str] = []
            caps: list[list[str]] = []
            for row in reader:
                path, caption = row[img_key], row[caption_key]
                if path is None or caption is None:
                    continue
                if path not in index:
                    index[path] = len(paths)
                    paths.append(path)
                    caps.append([])
                caps[index[path]].append(caption)
        if not paths:
            raise ValueError(f"{self.csv_path}: no rows")
        self.image_paths: list[str] = paths
        self._captions: list[list[str]] = caps
        if check_files and not self.image_path(0).is_file():
            base = self.image_root if self.image_root is not None else Path.cwd()
            raise FileNotFoundError(
                f"{self.csv_path}: image file {paths[0]!r} (first row) not found at "
                f"{self.image_path(0)}; relative paths are read relative to {base}: pass the "
                f"folder they are relative to as image_root (cdds-fast eval --image-root DIR)"
            )

    @property
    def num_images(self) -> int:
        """Number of distinct image paths."""
        return len(self.image_paths)

    def captions(self, i: int) -> list[str]:
        """The captions of image ``i`` (rows of the CSV with its path, in row order)."""
        return list(self._captions[self._check_image_index(i)])

    def image_path(self, i: int) -> Path:
        """Resolved path of image ``i``."""
        p = Path(self.image_paths[self._check_image_index(i)])
        if self.image_root is not None and not p.is_absolute():
            p = self.image_root / p
        return p

    def _load_image(self, i: int) -> Image.Image:
        with Image.open(self.image_path(i)) as im:
            return im.convert("RGB")

