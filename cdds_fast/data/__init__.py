"""Image-caption data: the shared dataset interface, the embedded captioned-scenes data (the
default of the demo and the tests), the Karpathy-split Flickr30K / MS-COCO files and open_clip's CSV
format."""

from cdds_fast.data.captioned import (
    CAPTIONS_PER_IMAGE,
    CaptionedImageFiles,
    CaptionedImages,
    pil_to_tensor,
)
from cdds_fast.data.csv_pairs import CsvRetrieval
from cdds_fast.data.karpathy import (
    COCO_1K_FOLD_SIZE,
    COCO_1K_FOLDS,
    COCO_5K_TEST_IMAGES,
    KarpathyRetrieval,
    coco_1k_folds,
)
from cdds_fast.data.scenes import SceneCaptions, write_csv

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "COCO_1K_FOLDS",
    "COCO_1K_FOLD_SIZE",
    "COCO_5K_TEST_IMAGES",
    "CaptionedImageFiles",
    "CaptionedImages",
    "CsvRetrieval",
    "KarpathyRetrieval",
    "SceneCaptions",
    "coco_1k_folds",
    "pil_to_tensor",
    "write_csv",
]
