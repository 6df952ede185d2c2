"""The Karpathy-split JSON files of Flickr30K and MS-COCO (``dataset_flickr30k.json``,
``dataset_coco.json``) as retrieval datasets, with the MS-COCO 5K test protocol (the whole
5,000-image test split) and the 1K protocol (5 folds of 1,000 consecutive test images, metrics
averaged over the folds: :func:`cdds_fast.eval.retrieval.average_metrics`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cdds_fast.data.captioned import CAPTIONS_PER_IMAGE, CaptionedImageFiles

__all__ = [
    "COCO_1K_FOLDS",
    "COCO_1K_FOLD_SIZE",
    "COCO_5K_TEST_IMAGES",
    "KarpathyRetrieval",
    "coco_1k_folds",
]

#: MS-COCO 1K protocol: the 5K test split cut into this many folds ...
COCO_1K_FOLDS = 5
#: ... of this many consecutive images each (in the JSON file's order).
COCO_1K_FOLD_SIZE = 1000
#: Images in the Karpathy MS-COCO test split (the 5K protocol).
COCO_5K_TEST_IMAGES = COCO_1K_FOLDS * COCO_1K_FOLD_SIZE

_KARPATHY_SPLITS = ("train", "val", "test", "restval")


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


def _read_split(
    json_path: Path, image_root: Path, split: str
) -> tuple[str | None, list[str], list[list[str]]]:
    """``(dataset name, image paths, captions per image)`` of the images of ``split`` in a
    Karpathy JSON file (the first :data:`CAPTIONS_PER_IMAGE` captions of each)."""
    splits = _parse_splits(split)
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(
            f"{json_path}: expected a Karpathy-split JSON object with an 'images' list"
        )
    paths: list[str] = []
    captions: list[list[str]] = []
    for n, entry in enumerate(data["images"]):
        if entry.get("split") not in splits:
            continue
        if "filename" not in entry:
            raise ValueError(f"{json_path}: image entry {n} has no 'filename'")
        paths.append(os.path.join(str(image_root), entry.get("filepath", ""), entry["filename"]))
        captions.append(_entry_captions(json_path, n, entry))
    if not paths:
        raise ValueError(f"{json_path}: no images in split {split!r}")
    return data.get("dataset"), paths, captions


def _entry_captions(json_path: Path, n: int, entry: dict[str, Any]) -> list[str]:
    """The captions of image entry ``n``: each sentence's ``raw`` text, else its joined
    ``tokens``."""
    sentences = entry.get("sentences", [])
    if len(sentences) < CAPTIONS_PER_IMAGE:
        raise ValueError(
            f"{json_path}: image {entry['filename']!r} (entry {n}) has {len(sentences)} "
            f"captions; the retrieval protocol needs {CAPTIONS_PER_IMAGE} per image"
        )
    texts = []
    for sentence in sentences[:CAPTIONS_PER_IMAGE]:
        if "raw" in sentence:
            texts.append(str(sentence["raw"]).strip())
        elif "tokens" in sentence:
            texts.append(" ".join(sentence["tokens"]))
        else:
            raise ValueError(
                f"{json_path}: a sentence of image {entry['filename']!r} has neither 'raw' nor "
                f"'tokens'"
            )
    return texts


class KarpathyRetrieval(CaptionedImageFiles):
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
      (:func:`coco_1k_folds` builds all five; :func:`cdds_fast.eval.retrieval.average_metrics`
      averages; :func:`cdds_fast.eval.retrieval.fold_metrics` does the same from the 5K features
      directly).
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
        self.dataset_name: str | None
        #: image file paths (strings: ``image_root/filepath/filename``), one per image
        self.image_paths: list[str]
        self._captions: list[list[str]]
        self.dataset_name, self.image_paths, self._captions = _read_split(
            self.json_path, self.image_root, split
        )
        if coco_1k_fold is not None:
            self._select_fold(coco_1k_fold)
        if check_files and not os.path.isfile(self.image_paths[0]):
            raise FileNotFoundError(
                f"image file {self.image_paths[0]} not found (image_root={str(self.image_root)!r}; "
                f"for MS-COCO image_root is the folder holding train2014/ and val2014/)"
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

    def image_path(self, i: int) -> Path:
        """Path of image ``i`` (``image_root/filepath/filename``)."""
        return Path(self.image_paths[self._check_image_index(i)])


def coco_1k_folds(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    transform: Callable | None = None,
    **kwargs: Any,
) -> list[KarpathyRetrieval]:
    """The 5 MS-COCO 1K-protocol folds, equal to ``KarpathyRetrieval(json_path, image_root,
    "test", transform, coco_1k_fold=k, **kwargs)`` for ``k = 0..4`` (the JSON is read once).

    Evaluate each, then average with :func:`cdds_fast.eval.retrieval.average_metrics` (or encode the
    5K test split once and use :func:`cdds_fast.eval.retrieval.fold_metrics`).
    """
    full = KarpathyRetrieval(json_path, image_root, "test", transform, **kwargs)
    folds = []
    for k in range(COCO_1K_FOLDS):
        fold = copy.copy(full)
        fold._select_fold(k)
        folds.append(fold)
    return folds
