"""Tests for the real-data loaders (cdds_fast.datasets) on small generated fixtures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdds_fast.data import (
    COCO_1K_FOLD_SIZE,
    COCO_5K_TEST_IMAGES,
    CsvRetrieval,
    KarpathyRetrieval,
    coco_1k_folds,
)
from cdds_fast.eval.retrieval import average_metrics, fold_metrics, retrieval_metrics


def _png(path: Path, value: int, size=(6, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[..., 0] = value % 256
    arr[..., 1] = (value * 7) % 256
    arr[..., 2] = 255 - value % 256
    Image.fromarray(arr).save(path, format="PNG")  # lossless whatever the extension


def _pixel(value: int) -> tuple[int, int, int]:
    return (value % 256, (value * 7) % 256, 255 - value % 256)


def _sentences(tag: str, n: int) -> list[dict]:
    return [{"raw": f" {tag} caption {j} ", "tokens": [tag, "caption", str(j)]} for j in range(n)]


@pytest.fixture
def flickr(tmp_path):
    """Flickr30K-style JSON: 6 train, 2 val, 4 test images; one test image has 6 captions."""
    root = tmp_path / "flickr30k-images"
    images = []
    splits = ["train"] * 3 + ["test"] * 2 + ["val"] * 2 + ["train"] * 3 + ["test"] * 2
    for n, split in enumerate(splits):
        name = f"{1000 + n}.jpg"
        _png(root / name, n)
        images.append(
            {
                "filename": name,
                "imgid": n,
                "split": split,
                "sentences": _sentences(f"img{n}", 6 if n == 3 else 5),
            }
        )
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path, root, splits


def test_flickr_test_split(flickr):
    path, root, splits = flickr
    ds = KarpathyRetrieval(path, root, split="test")
    test_ids = [n for n, s in enumerate(splits) if s == "test"]
    assert ds.dataset_name == "flickr30k"
    assert ds.num_images == 4 and len(ds) == 20 and ds.num_captions == 20
    assert [Path(p).name for p in ds.image_paths] == [f"{1000 + n}.jpg" for n in test_ids]
    # raw text, stripped; 6 captions truncated to the first 5
    assert ds.captions(0) == [f"img3 caption {j}" for j in range(5)]
    assert ds.captions(3) == [f"img{test_ids[3]} caption {j}" for j in range(5)]
    assert torch.equal(ds.text_to_image, torch.arange(4).repeat_interleave(5))
    assert ds.all_captions()[7] == f"img{test_ids[1]} caption 2"
    img, cap = ds[7]
    assert img.shape == (3, 4, 6) and img.dtype == torch.float32
    assert torch.allclose(img[:, 0, 0] * 255, torch.tensor(_pixel(test_ids[1]), dtype=torch.float))
    assert cap == f"img{test_ids[1]} caption 2"
    pil = ds.images(2)
    assert pil.mode == "RGB" and pil.getpixel((0, 0)) == _pixel(test_ids[2])


def test_flickr_other_splits_transform_tokenizer(flickr):
    path, root, splits = flickr
    tr = KarpathyRetrieval(
        path, root, "train", transform=lambda im: im.size, tokenizer=lambda s: [s.upper()]
    )
    assert tr.num_images == 6
    assert tr[0] == ((6, 4), "IMG0 CAPTION 0")
    va = KarpathyRetrieval(path, root, "val")
    assert va.num_images == 2
    both = KarpathyRetrieval(path, root, "train+val")
    assert both.num_images == 8
    # file order is kept across splits
    assert [Path(p).name for p in both.image_paths] == [
        f"{1000 + n}.jpg" for n, s in enumerate(splits) if s in ("train", "val")
    ]


def test_karpathy_errors(flickr, tmp_path):
    path, root, _ = flickr
    with pytest.raises(ValueError, match="split"):
        KarpathyRetrieval(path, root, "dev")
    with pytest.raises(FileNotFoundError, match="1003.jpg"):
        KarpathyRetrieval(path, tmp_path / "wrong", "test")
    KarpathyRetrieval(path, tmp_path / "wrong", "test", check_files=False)  # lazy is fine
    with pytest.raises(ValueError, match="5K test split"):
        KarpathyRetrieval(path, root, "test", coco_1k_fold=0)
    data = json.loads(path.read_text())
    data["images"][4]["sentences"] = data["images"][4]["sentences"][:4]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"1004\.jpg.*4 captions"):
        KarpathyRetrieval(bad, root, "test")
    KarpathyRetrieval(bad, root, "train")  # the short image is not in this split
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="no images"):
        KarpathyRetrieval(empty, root)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """MS-COCO-style JSON: 5,000 test images (val2014/), plus train/restval/val entries.

    Only a few image files exist (the loader opens images lazily)."""
    tmp = tmp_path_factory.mktemp("coco")
    root = tmp / "coco"
    images = []
    for n in range(COCO_5K_TEST_IMAGES):
        images.append(
            {
                "filepath": "val2014",
                "filename": f"COCO_val2014_{n:012d}.jpg",
                "split": "test",
                "sentences": [
                    {"raw": f"t{n} caption {j}"} for j in range(7 if n % 997 == 0 else 5)
                ],
            }
        )
    extra = [("train", "train2014"), ("restval", "val2014"), ("val", "val2014")]
    for k, (split, folder) in enumerate(extra * 2):
        images.insert(
            2 * k,
            {
                "filepath": folder,
                "filename": f"COCO_{folder}_x{k}.jpg",
                "split": split,
                "sentences": _sentences(f"{split}{k}", 5),
            },
        )
    for n in (0, 1000, 2000, 3000, 4000, 4999, 1234):
        _png(root / "val2014" / f"COCO_val2014_{n:012d}.jpg", n)
    for k, (_, folder) in enumerate(extra * 2):
        _png(root / folder / f"COCO_{folder}_x{k}.jpg", 100 + k)
    path = tmp / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, root


def test_coco_5k(coco):
    path, root = coco
    ds = KarpathyRetrieval(path, root, "test")
    assert ds.num_images == 5000 and len(ds) == 25000
    assert ds.image_path(1234) == root / "val2014" / "COCO_val2014_000000001234.jpg"
    assert ds.images(1234).getpixel((0, 0)) == _pixel(1234)
    assert ds.captions(997) == [f"t997 caption {j}" for j in range(5)]  # 7 -> first 5
    t2i = ds.text_to_image
    assert t2i.shape == (25000,) and int(t2i[24999]) == 4999 and int(t2i[5]) == 1
    _, cap = ds[5 * 4999 + 4]
    assert cap == "t4999 caption 4"


def test_coco_train_restval(coco):
    path, root = coco
    tr = KarpathyRetrieval(path, root, "train")
    assert tr.num_images == 2 and tr.image_path(0).parent.name == "train2014"
    trv = KarpathyRetrieval(path, root, "train+restval")
    assert trv.num_images == 4
    assert {Path(p).parent.name for p in trv.image_paths} == {"train2014", "val2014"}
    assert trv.images(1).getpixel((0, 0)) == _pixel(101)


def test_coco_1k_folds(coco):
    path, root = coco
    full = KarpathyRetrieval(path, root, "test")
    folds = coco_1k_folds(path, root)
    assert len(folds) == 5
    direct = KarpathyRetrieval(path, root, "test", coco_1k_fold=3)
    assert direct.image_paths == folds[3].image_paths and direct.coco_1k_fold == 3
    assert direct.all_captions() == folds[3].all_captions()
    for k, fold in enumerate(folds):
        assert fold.coco_1k_fold == k
        assert fold.num_images == COCO_1K_FOLD_SIZE and len(fold) == 5 * COCO_1K_FOLD_SIZE
        lo = k * COCO_1K_FOLD_SIZE
        assert fold.image_paths == full.image_paths[lo : lo + COCO_1K_FOLD_SIZE]
        assert fold.captions(0) == full.captions(lo)
        assert fold.captions(999) == full.captions(lo + 999)
        assert fold.images(0).getpixel((0, 0)) == _pixel(lo)
        assert torch.equal(fold.text_to_image, torch.arange(1000).repeat_interleave(5))
    for bad, exc in ((5, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(exc):
            KarpathyRetrieval(path, root, "test", coco_1k_fold=bad)
    with pytest.raises(ValueError, match="split='test'"):
        KarpathyRetrieval(path, root, "train", coco_1k_fold=0)


def test_coco_1k_metrics_agree(coco):
    """Scoring each fold dataset == fold_metrics on the 5K features; average over 5 folds."""
    path, root = coco
    full = KarpathyRetrieval(path, root, "test", check_files=False)
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5000, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(
        img[full.text_to_image] + 0.8 * torch.randn(25000, 8, generator=g), dim=1
    )
    per_fold = []
    for k, fold in enumerate(coco_1k_folds(path, root)):
        lo = k * 1000
        per_fold.append(
            retrieval_metrics(img[lo : lo + 1000], txt[5 * lo : 5 * lo + 5000], fold.text_to_image)
        )
    avg, folds = fold_metrics(img, txt, full.text_to_image, n_folds=5)
    assert folds == per_fold
    assert avg == pytest.approx(average_metrics(per_fold))
    assert 0 < avg["rsum"] < 600


def _write_csv(path: Path, rows: list[tuple[str, str]], sep="\t", header=("filepath", "title")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)


def test_csv_grouping(tmp_path):
    for n in range(3):
        _png(tmp_path / "imgs" / f"{n}.png", 10 * n)
    a, b, c = (str(tmp_path / "imgs" / f"{n}.png") for n in range(3))
    rows = [
        (a, "a one"),
        (b, "b one"),
        (a, "a two"),
        (c, 'c, only "quoted"'),
        (b, "b two"),
        (a, "a three"),
    ]
    _write_csv(tmp_path / "d.csv", rows)
    ds = CsvRetrieval(tmp_path / "d.csv")
    assert ds.num_images == 3 and len(ds) == 6
    assert ds.captions(0) == ["a one", "a two", "a three"]
    assert ds.captions(1) == ["b one", "b two"]
    assert ds.captions(2) == ['c, only "quoted"']
    assert ds.text_to_image.tolist() == [0, 0, 0, 1, 1, 2]
    assert ds.all_captions() == ["a one", "a two", "a three", "b one", "b two", 'c, only "quoted"']
    img, cap = ds[4]
    assert cap == "b two" and torch.allclose(img[:, 0, 0] * 255, torch.tensor(_pixel(10.0)))
    assert ds.pair_index(5) == (2, 0)
    assert ds.images(2).getpixel((1, 1)) == _pixel(20)
    # open_clip reads the same file with pandas: same rows
    pd = pytest.importorskip("pandas")

    df = pd.read_csv(tmp_path / "d.csv", sep="\t")
    assert list(zip(df["filepath"], df["title"], strict=True)) == rows


def test_csv_keys_sep_relative_paths(tmp_path, monkeypatch):
    _png(tmp_path / "imgs" / "x.png", 5)
    _png(tmp_path / "imgs" / "y.png", 6)
    rows = [("imgs/x.png", "ex", "1"), ("imgs/y.png", "why", "2"), ("imgs/x.png", "ex2", "3")]
    _write_csv(tmp_path / "c.csv", rows, sep=",", header=("image", "text", "id"))
    with pytest.raises(ValueError, match=r"img_key='filepath'.*\['image', 'text', 'id'\]"):
        CsvRetrieval(tmp_path / "c.csv", sep=",")
    with pytest.raises(ValueError, match="sep"):
        CsvRetrieval(tmp_path / "c.csv", "image", "text", sep=", ")
    ds = CsvRetrieval(
        tmp_path / "c.csv",
        img_key="image",
        caption_key="text",
        sep=",",
        image_root=tmp_path,
        tokenizer=lambda s: [len(s)],
    )
    assert ds.captions(0) == ["ex", "ex2"] and ds[2][1] == 3
    assert ds.images(1).getpixel((0, 0)) == _pixel(6)
    # without image_root, relative paths are relative to the working directory (as in open_clip)
    monkeypatch.chdir(tmp_path)
    ds2 = CsvRetrieval(tmp_path / "c.csv", "image", "text", ",")
    assert ds2.images(0).getpixel((0, 0)) == _pixel(5)
    _write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match="no rows"):
        CsvRetrieval(tmp_path / "empty.csv")
