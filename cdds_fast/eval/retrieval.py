"""Cross-modal retrieval evaluation: R@1/5/10, mean/median rank and rSum, computed in blocks.

Inputs: image features ``[N_img, D]``, text features ``[N_txt, D]`` (L2-normalised, so the score
is the cosine similarity ``image . text``) and ``text_to_image`` ``LongTensor [N_txt]``, the image
index of each caption (Flickr30K / MS-COCO: 5 captions per image; any count >= 1 per image works).

Ranks (1-based; ties are resolved in the query's favour, deterministically):

* text -> image, for caption ``t`` of image ``g``: ``rank = 1 + #{images j : s(j, t) > s(g, t)}``
  (the count of *strictly* greater scores is ``rank - 1``).
* image -> text, for image ``g``: the rank of its best-ranked correct caption (the standard rule:
  a hit at K if ANY of its captions is within the top K). With ``best = max over g's captions
  c of s(g, c)``: ``rank = 1 + #{captions t : s(g, t) > best}`` (no correct caption can score above
  ``best``, so this counts only wrong captions).

Metrics (:func:`retrieval_metrics`, keys): ``i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10``
(percent of queries with rank <= K), ``i2t_mean_rank, t2i_mean_rank`` (mean of the 1-based ranks),
``i2t_median_rank, t2i_median_rank`` (``floor(median)`` of the 1-based ranks, equal to the VSE++
convention ``floor(median(0-based ranks)) + 1``), and ``rsum`` (sum of the six recalls, max 600).

Memory: the score matrix is never materialised: queries go in blocks of ``block_size`` rows, so
the peak extra memory is about ``block_size * max(N_img, N_txt) * 5`` bytes (fp32 scores plus a
boolean comparison), and the MS-COCO 5K protocol (5,000 x 25,000) fits anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from cdds_fast.contract import check_number

__all__ = [
    "METRIC_KEYS",
    "EncodedDataset",
    "RetrievalDataset",
    "average_metrics",
    "encode_dataset",
    "fold_metrics",
    "format_table",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
]

RECALL_KS = (1, 5, 10)
METRIC_KEYS = (
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "i2t_mean_rank",
    "t2i_mean_rank",
    "i2t_median_rank",
    "t2i_median_rank",
    "rsum",
)


def _check_inputs(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape [N, D], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image_features and text_features must have the same D, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.device != text_features.device:
        raise ValueError(
            f"image_features and text_features must be on one device, got "
            f"{image_features.device} and {text_features.device}"
        )
    if not isinstance(text_to_image, torch.Tensor):
        raise TypeError(f"text_to_image must be a LongTensor, got {type(text_to_image).__name__}")
    if text_to_image.dim() != 1 or text_to_image.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"text_to_image must have shape [N_txt] = [{text_features.shape[0]}], got "
            f"{tuple(text_to_image.shape)}"
        )
    if text_to_image.dtype.is_floating_point or text_to_image.dtype == torch.bool:
        raise TypeError(f"text_to_image must be an integer tensor, got {text_to_image.dtype}")
    check_number("block_size", block_size, low=1, integer=True)
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"need at least one image and one text, got N_img={n_img}, N_txt={n_txt}")
    t2i = text_to_image.to(device=image_features.device, dtype=torch.long)
    lo, hi = int(t2i.min()), int(t2i.max())
    if lo < 0 or hi >= n_img:
        raise ValueError(f"text_to_image values must be in [0, {n_img}), got range [{lo}, {hi}]")
    counts = torch.bincount(t2i, minlength=n_img)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(
            f"every image needs at least one caption; images without any: {missing}..."
        )
    # half-precision features are scored in fp32 (fp64 stays fp64)
    dt = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    return image_features.to(dt), text_features.to(dt), t2i


def _count_greater(s: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row, ``#{j : s[r, j] > ref[r]}`` as int64; overwrites ``s`` (a scratch block)."""
    if s.shape[1] < 2**24:  # 0/1 sums are exact in fp32 below 2^24, and much faster than bool
        return s.gt_(ref).sum(dim=1).long()
    return (s > ref).sum(dim=1)


@torch.no_grad()
def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    block_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of every query (see the module docstring for the rule and the tie rule).

    Args:
        image_features: ``[N_img, D]`` float (L2-normalised for cosine scores).
        text_features: ``[N_txt, D]`` float, same device.
        text_to_image: ``LongTensor [N_txt]``, image index of each caption; every image needs >= 1.
        block_size: query rows scored at a time (peak extra memory ~ ``block_size x N x 5`` bytes).

    Returns:
        ``(i2t_ranks LongTensor [N_img], t2i_ranks LongTensor [N_txt])`` on the features' device.
    """
    img, txt, t2i = _check_inputs(image_features, text_features, text_to_image, block_size)
    n_img, n_txt = img.shape[0], txt.shape[0]
    # captions grouped by image: those of images [lo, hi) are order[start[lo]:start[hi]]
    order = torch.argsort(t2i, stable=True)
    start = torch.zeros(n_img + 1, dtype=torch.long)
    start[1:] = torch.cumsum(torch.bincount(t2i, minlength=n_img).cpu(), 0)
    i2t = torch.empty(n_img, dtype=torch.long, device=img.device)
    for lo in range(0, n_img, block_size):
        hi = min(lo + block_size, n_img)
        s = img[lo:hi] @ txt.T  # [b, N_txt]
        cols = order[int(start[lo]) : int(start[hi])]
        rows = t2i[cols] - lo
        # best correct score per image, read from the same matrix the competitors come from
        best = torch.full((hi - lo,), -math.inf, dtype=s.dtype, device=s.device)
        best.scatter_reduce_(0, rows, s[rows, cols], reduce="amax")
        i2t[lo:hi] = _count_greater(s, best[:, None]) + 1
    t2i_ranks = torch.empty(n_txt, dtype=torch.long, device=img.device)
    for lo in range(0, n_txt, block_size):
        hi = min(lo + block_size, n_txt)
        s = txt[lo:hi] @ img.T  # [b, N_img]
        correct = s.gather(1, t2i[lo:hi, None])  # [b, 1]
        t2i_ranks[lo:hi] = _count_greater(s, correct) + 1
    return i2t, t2i_ranks


def metrics_from_ranks(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor) -> dict[str, float]:
    """Metrics (:data:`METRIC_KEYS`) from 1-based ranks ``[N_img]`` and ``[N_txt]``."""
    out: dict[str, float] = {}
    for prefix, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        r = ranks.detach().to("cpu", torch.float64)
        if r.numel() == 0:
            raise ValueError(f"{prefix}_ranks is empty")
        for k in RECALL_KS:
            out[f"{prefix}_r{k}"] = 100.0 * float((r <= k).double().mean())
        out[f"{prefix}_mean_rank"] = float(r.mean())
        out[f"{prefix}_median_rank"] = float(math.floor(float(r.quantile(0.5))))
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in RECALL_KS)
    return {k: out[k] for k in METRIC_KEYS}


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    block_size: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image R@1/5/10, mean and median rank, and rSum (percent).

    Args:
        image_features: ``[N_img, D]`` float, L2-normalised.
        text_features: ``[N_txt, D]`` float, L2-normalised, same device.
        text_to_image: ``LongTensor [N_txt]``: image index of each caption.
        block_size: query rows scored at a time.

    Returns:
        ``{key: float}`` for the keys in :data:`METRIC_KEYS` (module docstring).
    """
    return metrics_from_ranks(
        *retrieval_ranks(image_features, text_features, text_to_image, block_size)
    )


def average_metrics(metrics: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over several evaluations (e.g. the 5 MS-COCO 1K folds).

    Keys present in every dict are averaged; the averaged ``rsum`` equals the sum of the averaged
    recalls.
    """
    if not metrics:
        raise ValueError("average_metrics needs at least one metrics dict, got none")
    keys = [k for k in metrics[0] if all(k in m for m in metrics)]
    return {k: sum(float(m[k]) for m in metrics) / len(metrics) for k in keys}


def fold_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    n_folds: int = 5,
    block_size: int = 1024,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Metrics on ``n_folds`` folds of consecutive images, and their average (MS-COCO 1K protocol).

    Fold ``k`` holds images ``[k F, (k + 1) F)`` with ``F = N_img / n_folds`` and their captions
    (in their order), exactly like ``KarpathyRetrieval(..., coco_1k_fold=k)``, so the 5K test
    features can be encoded once and scored both ways.

    Args:
        image_features: ``[N_img, D]`` with ``N_img`` divisible by ``n_folds``.
        text_features: ``[N_txt, D]``.
        text_to_image: ``LongTensor [N_txt]``.
        n_folds: number of folds (5 for MS-COCO 1K).
        block_size: query rows scored at a time.

    Returns:
        ``(average, per_fold)``: :func:`average_metrics` of the folds, and the list of fold metrics.
    """
    n_img = image_features.shape[0]
    check_number("n_folds", n_folds, low=1, integer=True)
    if n_img % n_folds:
        raise ValueError(f"N_img={n_img} images do not split into n_folds={n_folds} equal folds")
    size = n_img // n_folds
    t2i = text_to_image.to(image_features.device, torch.long)
    folds = []
    for k in range(n_folds):
        lo = k * size
        sel = (t2i >= lo) & (t2i < lo + size)
        folds.append(
            retrieval_metrics(
                image_features[lo : lo + size],
                text_features[sel.to(text_features.device)],
                t2i[sel] - lo,
                block_size,
            )
        )
    return average_metrics(folds), folds


# ---------------------------------------------------------------------------------------------
# Encoding a dataset
# ---------------------------------------------------------------------------------------------


class RetrievalDataset(Protocol):
    """What :func:`encode_dataset` needs (every :class:`cdds_fast.data.CaptionedImages`)."""

    @property
    def num_images(self) -> int: ...

    def images(self, i: int) -> Any: ...

    def captions(self, i: int) -> list[str]: ...


class EncodedDataset(NamedTuple):
    """Output of :func:`encode_dataset`."""

    image_features: torch.Tensor  #: ``[N_img, D]`` float32
    text_features: torch.Tensor  #: ``[N_txt, D]`` float32
    text_to_image: torch.Tensor  #: ``LongTensor [N_txt]``


class _ImageView(Dataset):
    def __init__(self, dataset: RetrievalDataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return self.dataset.num_images

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.dataset.images(i))


class _TextView(Dataset):
    def __init__(self, texts: list[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]


class _Tokenize:
    """Collate function: a list of strings -> ``tokenizer(list)`` (picklable for workers)."""

    def __init__(self, tokenizer: Callable):
        self.tokenizer = tokenizer

    def __call__(self, batch: list[str]) -> torch.Tensor:
        return self.tokenizer(list(batch))


def _default_transform(image: Any) -> torch.Tensor:
    from cdds_fast.data import pil_to_tensor

    return pil_to_tensor(image)


@torch.no_grad()
def encode_dataset(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    *,
    transform: Callable | None = None,
    tokenizer: Callable | None = None,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    disable: bool = False,
) -> EncodedDataset:
    """Encode every image and caption of a retrieval dataset with an open_clip-style model.

    Runs ``model.encode_image(images, normalize=True)`` over the images (in index order) and
    ``model.encode_text(tokens, normalize=True)`` over ``all captions`` in the flat caption order
    (image 0's captions, then image 1's, ...), in eval mode and without gradients (the model's
    train/eval mode is restored afterwards).

    Args:
        model: has ``encode_image`` and ``encode_text`` accepting ``normalize=True``.
        dataset: ``num_images``, ``images(i) -> PIL image``, ``captions(i) -> list[str]`` (any
            :class:`cdds_fast.data.CaptionedImages`).
        batch_size: images / captions per forward pass.
        device: where the model runs and the features end up; ``None``: the model's device.
        transform: PIL image -> tensor ``[3, H, W]`` (open_clip ``preprocess``); ``None``: the
            dataset's ``transform`` if it has one, else a plain ``[0, 1]`` float tensor.
        tokenizer: list of strings -> ``LongTensor [n, L]``; ``None``: the dataset's ``tokenizer``
            (required: one of the two must be set).
        num_workers: DataLoader workers for the images.
        autocast_dtype: run the model under ``torch.autocast(device_type, autocast_dtype)``.
        disable: disable the tqdm progress bar.

    Returns:
        :class:`EncodedDataset` ``(image_features [N_img, D] float32, text_features [N_txt, D]
        float32, text_to_image LongTensor [N_txt])``, all on ``device``.
    """
    from tqdm.auto import tqdm

    check_number("batch_size", batch_size, low=1, integer=True)
    device = _model_device(model) if device is None else torch.device(device)
    transform = transform or getattr(dataset, "transform", None) or _default_transform
    tokenizer = tokenizer or getattr(dataset, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "encode_dataset needs a tokenizer (e.g. open_clip.get_tokenizer(model_name)): pass "
            "tokenizer=... or set dataset.tokenizer; got None for both"
        )
    texts, text_to_image = _flat_captions(dataset)
    images = DataLoader(
        _ImageView(dataset, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    tokens = DataLoader(
        _TextView(texts), batch_size=batch_size, shuffle=False, collate_fn=_Tokenize(tokenizer)
    )
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(images) + len(tokens), desc="encode", disable=disable) as bar:
            image_features = _encode(model.encode_image, images, device, autocast_dtype, bar)
            text_features = _encode(model.encode_text, tokens, device, autocast_dtype, bar)
    finally:
        model.train(was_training)
    return EncodedDataset(
        image_features, text_features, torch.tensor(text_to_image, dtype=torch.long, device=device)
    )


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _flat_captions(dataset: RetrievalDataset) -> tuple[list[str], list[int]]:
    """Every caption in the flat order (image 0's, then image 1's, ...) and its image's index."""
    texts: list[str] = []
    owners: list[int] = []
    for i in range(dataset.num_images):
        captions = dataset.captions(i)
        texts.extend(captions)
        owners.extend([i] * len(captions))
    return texts, owners


def _encode(
    encode: Callable,
    loader: DataLoader,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    bar: Any,
) -> torch.Tensor:
    """``encode(batch, normalize=True)`` over every batch of ``loader``, as one float32 tensor;
    under ``torch.autocast`` with ``autocast_dtype``, else with autocast off."""
    features = []
    for batch in loader:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            features.append(encode(batch.to(device, non_blocking=True), normalize=True).float())
        bar.update()
    return torch.cat(features)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

_TABLE_ROWS: tuple[tuple[str, str, bool], ...] = (
    ("I->T R@1", "i2t_r1", True),
    ("I->T R@5", "i2t_r5", True),
    ("I->T R@10", "i2t_r10", True),
    ("T->I R@1", "t2i_r1", True),
    ("T->I R@5", "t2i_r5", True),
    ("T->I R@10", "t2i_r10", True),
    ("rSum", "rsum", True),
    ("I->T mean rank", "i2t_mean_rank", False),
    ("T->I mean rank", "t2i_mean_rank", False),
)


def format_table(
    results: dict[str, dict[str, float]],
    digits: int = 1,
    highlight_best: bool = False,
    extra_rows: dict[str, dict[str, str]] | None = None,
) -> str:
    """A markdown table comparing methods side by side.

    Rows: I->T R@1/5/10, T->I R@1/5/10, rSum, I->T and T->I mean rank; one column per method
    (``results = {method name: metrics dict}``, e.g. from :func:`retrieval_metrics`); a missing
    metric shows as ``-``. ``highlight_best`` bolds the best value of each row (highest recall /
    rSum, lowest mean rank; all tied values). ``extra_rows`` (``{label: {method name: cell}}``)
    appends rows of cells already formatted. Columns are padded so the text lines up.
    """
    if not isinstance(results, dict) or not results:
        raise ValueError("results must be a non-empty dict {method name: metrics dict}")
    grid: list[list[str]] = [["metric", *map(str, results)]]
    for label, key, higher in _TABLE_ROWS:
        vals = [m.get(key) for m in results.values()]
        present = [float(v) for v in vals if v is not None]
        best = (max(present) if higher else min(present)) if present else None
        row = [label]
        for v in vals:
            if v is None:
                row.append("-")
                continue
            cell = f"{float(v):.{digits}f}"
            is_best = round(float(v), digits) == round(best, digits)
            if highlight_best and len(present) > 1 and is_best:
                cell = f"**{cell}**"
            row.append(cell)
        grid.append(row)
    for label, cells in (extra_rows or {}).items():
        grid.append([label, *(cells.get(name, "-") for name in results)])
    widths = [max(len(r[c]) for r in grid) for c in range(len(grid[0]))]
    lines = []
    for n, r in enumerate(grid):
        cells = [r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, len(r))]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            sep = ["-" * widths[0]] + ["-" * (widths[c] - 1) + ":" for c in range(1, len(r))]
            lines.append("| " + " | ".join(sep) + " |")
    return "\n".join(lines)
