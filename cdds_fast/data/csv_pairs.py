"""open_clip's CSV training format (one row per image-caption pair) as a retrieval dataset: rows
that share an image path become one image with several captions.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

from cdds_fast.data.captioned import CaptionedImageFiles

__all__ = ["CsvRetrieval"]


class CsvRetrieval(CaptionedImageFiles):
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

    def image_path(self, i: int) -> Path:
        """Resolved path of image ``i``."""
        p = Path(self.image_paths[self._check_image_index(i)])
        if self.image_root is not None and not p.is_absolute():
            p = self.image_root / p
        return p
