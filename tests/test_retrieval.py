"""Retrieval evaluation (cdds_fast.eval.retrieval): metrics against a brute-force count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdds_fast.data import SceneCaptions
from cdds_fast.eval.retrieval import (
    METRIC_KEYS,
    EncodedDataset,
    average_metrics,
    encode_dataset,
    fold_metrics,
    format_table,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
)


def brute_force(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> dict[str, float]:
    """Plain loops over the full score matrix (float64), straight from the definitions."""
    s = (img.double() @ txt.double().T).numpy()
    t2i = t2i.tolist()
    n_img, n_txt = s.shape
    i2t_ranks = []
    for i in range(n_img):
        # position of the first correct caption when sorting by score, ties broken in favour of
        # the correct captions (count of strictly greater scores + 1)
        own = [t for t in range(n_txt) if t2i[t] == i]
        best = max(s[i, t] for t in own)
        i2t_ranks.append(1 + sum(1 for t in range(n_txt) if s[i, t] > best))
    t2i_ranks = []
    for t in range(n_txt):
        correct = s[t2i[t], t]
        t2i_ranks.append(1 + sum(1 for i in range(n_img) if s[i, t] > correct))
    out = {}
    for p, r in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in (1, 5, 10):
            out[f"{p}_r{k}"] = 100.0 * sum(x <= k for x in r) / len(r)
        out[f"{p}_mean_rank"] = float(np.mean(r))
        out[f"{p}_median_rank"] = float(math.floor(np.median(r)))
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return out, torch.tensor(i2t_ranks), torch.tensor(t2i_ranks)


def _normed(n, d, gen):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)


@pytest.mark.parametrize(
    "n_img, per_image, dim, block",
    [(1, 5, 4, 1024), (7, 5, 8, 3), (40, 5, 16, 16), (33, 5, 3, 1), (25, 2, 6, 7), (12, 1, 5, 5)],
)
def test_random_features_match_brute_force(n_img, per_image, dim, block):
    gen = torch.Generator().manual_seed(n_img * 100 + dim)
    img = _normed(n_img, dim, gen)
    t2i = torch.arange(n_img).repeat_interleave(per_image)
    noise = torch.randn(len(t2i), dim, generator=gen)
    txt = torch.nn.functional.normalize(img[t2i] + 0.9 * noise, dim=1)
    ref, ref_i2t, ref_t2i = brute_force(img, txt, t2i)
    i2t, t2i_r = retrieval_ranks(img, txt, t2i, block_size=block)
    assert torch.equal(i2t, ref_i2t) and torch.equal(t2i_r, ref_t2i)
    got = retrieval_metrics(img, txt, t2i, block_size=block)
    assert list(got) == list(METRIC_KEYS)
    assert got == pytest.approx(ref)
    # block size does not change anything
    assert retrieval_metrics(img, txt, t2i, block_size=1024) == got


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 4), min_size=1, max_size=14),
    dim=st.integers(1, 4),
    block=st.integers(1, 20),
    data=st.data(),
)
def test_ties_and_variable_counts_match_brute_force(counts, dim, block, data):
    """Small-integer features: many exact ties; any number of captions per image; shuffled order."""
    n_img, n_txt = len(counts), sum(counts)
    vals = st.integers(-2, 2)
    img = torch.tensor(
        data.draw(
            st.lists(st.lists(vals, min_size=dim, max_size=dim), min_size=n_img, max_size=n_img)
        ),
        dtype=torch.float32,
    )
    txt = torch.tensor(
        data.draw(
            st.lists(st.lists(vals, min_size=dim, max_size=dim), min_size=n_txt, max_size=n_txt)
        ),
        dtype=torch.float32,
    )
    t2i = torch.arange(n_img).repeat_interleave(torch.tensor(counts))
    perm = torch.tensor(data.draw(st.permutations(list(range(n_txt)))), dtype=torch.long)
    t2i, txt = t2i[perm], txt[perm]
    ref, ref_i2t, ref_t2i = brute_force(img, txt, t2i)
    i2t, t2i_r = retrieval_ranks(img, txt, t2i, block_size=block)
    assert torch.equal(i2t, ref_i2t), (i2t, ref_i2t)
    assert torch.equal(t2i_r, ref_t2i), (t2i_r, ref_t2i)
    assert retrieval_metrics(img, txt, t2i, block_size=block) == pytest.approx(ref)


def test_all_tied_counts_as_hit():
    img = torch.ones(4, 3) / math.sqrt(3)
    txt = torch.ones(20, 3) / math.sqrt(3)
    t2i = torch.arange(4).repeat_interleave(5)
    m = retrieval_metrics(img, txt, t2i, block_size=3)
    assert m["rsum"] == 600.0 and m["i2t_mean_rank"] == 1.0 and m["t2i_mean_rank"] == 1.0


@pytest.mark.parametrize("block", [1, 4, 1024])
def test_perfect_retrieval(block):
    gen = torch.Generator().manual_seed(1)
    img = _normed(30, 64, gen)
    t2i = torch.arange(30).repeat_interleave(5)
    txt = img[t2i].clone()
    m = retrieval_metrics(img, txt, t2i, block_size=block)
    for k in METRIC_KEYS:
        if k == "rsum":
            assert m[k] == 600.0
        elif "rank" in k:
            assert m[k] == 1.0
        else:
            assert m[k] == 100.0


def test_known_small_case():
    # 2 images, 2 captions each; scores chosen by hand (1-D features)
    img = torch.tensor([[1.0], [-1.0]])
    txt = torch.tensor([[0.5], [-0.2], [-0.9], [0.3]])  # t2i: 0, 0, 1, 1
    t2i = torch.tensor([0, 0, 1, 1])
    i2t, t2i_r = retrieval_ranks(img, txt, t2i)
    # image 0 scores: .5 .(-.2) (-.9) .3 -> best own .5 -> rank 1
    # image 1 scores: -.5 .2 .9 -.3 -> best own .9 -> rank 1
    assert i2t.tolist() == [1, 1]
    # text 3 (0.3) belongs to image 1 (score -0.3) but image 0 scores 0.3 -> rank 2
    assert t2i_r.tolist() == [1, 2, 1, 2]
    m = metrics_from_ranks(i2t, t2i_r)
    assert m["t2i_r1"] == 50.0 and m["t2i_mean_rank"] == 1.5 and m["t2i_median_rank"] == 1.0
    assert m["rsum"] == 100 * 3 + 50 + 100 + 100


def test_half_precision_and_device_dtype():
    gen = torch.Generator().manual_seed(2)
    img = _normed(20, 8, gen)
    t2i = torch.arange(20).repeat_interleave(5)
    txt = torch.nn.functional.normalize(img[t2i] + torch.randn(100, 8, generator=gen), dim=1)
    ref = retrieval_metrics(img.bfloat16().float(), txt.bfloat16().float(), t2i)
    assert retrieval_metrics(img.bfloat16(), txt.bfloat16(), t2i.int(), block_size=8) == ref
    m64 = retrieval_metrics(img.double(), txt.double(), t2i)
    assert set(m64) == set(METRIC_KEYS)


@pytest.mark.parametrize(
    "img_shape, txt_shape, t2i, exc, match",
    [
        ((4, 3), (20, 2), torch.arange(4).repeat_interleave(5), ValueError, "same D"),
        ((4,), (20, 3), torch.arange(4).repeat_interleave(5), ValueError, "image_features"),
        ((4, 3), (20, 3), torch.arange(4).repeat_interleave(4), ValueError, "text_to_image"),
        ((4, 3), (20, 3), torch.arange(20) % 5, ValueError, r"\[0, 4\)"),
        ((4, 3), (20, 3), torch.zeros(20, dtype=torch.long), ValueError, "at least one caption"),
        ((4, 3), (20, 3), torch.zeros(20), TypeError, "integer"),
    ],
)
def test_bad_inputs(img_shape, txt_shape, t2i, exc, match):
    with pytest.raises(exc, match=match):
        retrieval_metrics(torch.randn(*img_shape), torch.randn(*txt_shape), t2i)


@pytest.mark.parametrize(
    "value,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_bad_block_size_and_folds(value, exc):
    """Settings refused with the contract's checks: TypeError for a non-int (bool included),
    ValueError below 1, naming the argument."""
    t2i = torch.arange(2).repeat_interleave(5)
    with pytest.raises(exc, match="block_size: expected an int"):
        retrieval_metrics(torch.randn(2, 3), torch.randn(10, 3), t2i, block_size=value)
    with pytest.raises(exc, match="n_folds: expected an int"):
        fold_metrics(torch.randn(2, 3), torch.randn(10, 3), t2i, n_folds=value)


def test_fold_metrics_and_average():
    gen = torch.Generator().manual_seed(3)
    img = _normed(50, 6, gen)
    t2i = torch.arange(50).repeat_interleave(5)
    txt = torch.nn.functional.normalize(img[t2i] + 0.7 * torch.randn(250, 6, generator=gen), dim=1)
    avg, folds = fold_metrics(img, txt, t2i, n_folds=5, block_size=4)
    assert len(folds) == 5
    for k, m in enumerate(folds):
        lo = 10 * k
        ref, _, _ = brute_force(img[lo : lo + 10], txt[5 * lo : 5 * lo + 50], t2i[:50])
        assert m == pytest.approx(ref)
    for key in METRIC_KEYS:
        assert avg[key] == pytest.approx(sum(m[key] for m in folds) / 5)
    recalls = [k for k in METRIC_KEYS if k[-2:] in ("r1", "r5") or k.endswith("r10")]
    assert len(recalls) == 6
    assert avg["rsum"] == pytest.approx(sum(avg[k] for k in recalls))
    one, [only] = fold_metrics(img, txt, t2i, n_folds=1)
    assert one == only == retrieval_metrics(img, txt, t2i)
    with pytest.raises(ValueError, match="equal folds"):
        fold_metrics(img, txt, t2i, n_folds=3)
    with pytest.raises(ValueError):
        average_metrics([])


def test_format_table():
    a = {
        "i2t_r1": 12.345,
        "i2t_r5": 40,
        "i2t_r10": 55,
        "t2i_r1": 10,
        "t2i_r5": 30,
        "t2i_r10": 45,
        "rsum": 192.345,
        "i2t_mean_rank": 20.5,
        "t2i_mean_rank": 25.25,
    }
    b = dict(a, i2t_r1=15.0, i2t_mean_rank=10.0)
    del b["t2i_r10"]
    table = format_table({"InfoNCE": a, "CDDS": b})
    lines = table.splitlines()
    assert len(lines) == 2 + 9
    split = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    cells = {row[0]: row[1:] for row in split}
    assert cells["metric"] == ["InfoNCE", "CDDS"]
    assert set(lines[1]) <= {"|", "-", ":", " "}
    assert cells["I->T R@1"] == ["12.3", "15.0"]
    assert cells["T->I R@10"] == ["45.0", "-"]
    assert cells["rSum"] == ["192.3", "192.3"]
    assert cells["I->T mean rank"] == ["20.5", "10.0"]
    assert "rSum" in table and "I->T mean rank" in table and "T->I mean rank" in table
    assert len({len(line) for line in lines}) == 1  # aligned
    hi = format_table({"InfoNCE": a, "CDDS": b}, digits=2, highlight_best=True)
    assert "**15.00**" in hi and "**10.00**" in hi and "12.35" in hi and "**40.00**" in hi
    with pytest.raises(ValueError):
        format_table({})


class _ToyCLIP(torch.nn.Module):
    """encode_image: mean colour -> linear; encode_text: embedding bag of tokens -> linear."""

    def __init__(self, dim=8):
        super().__init__()
        self.img = torch.nn.Linear(3, dim)
        self.txt = torch.nn.EmbeddingBag(49408, dim, mode="mean")
        self.calls = []

    def encode_image(self, images, normalize=False):
        self.calls.append(("image", self.training, tuple(images.shape)))
        f = self.img(images.mean(dim=(2, 3)))
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=False):
        self.calls.append(("text", self.training, tuple(tokens.shape)))
        f = self.txt(tokens)
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f


def test_encode_dataset():
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    ds = SceneCaptions("test", size=7, image_size=16)
    model = _ToyCLIP()
    model.train()
    out = encode_dataset(model, ds, batch_size=4, tokenizer=tok, disable=True)
    assert isinstance(out, EncodedDataset)
    img, txt, t2i = out
    assert img.shape == (7, 8) and txt.shape == (35, 8)
    assert img.dtype == torch.float32 and txt.dtype == torch.float32
    assert torch.equal(t2i, torch.arange(7).repeat_interleave(5))
    assert torch.allclose(img.norm(dim=1), torch.ones(7))
    assert torch.allclose(txt.norm(dim=1), torch.ones(35))
    assert model.training  # mode restored
    assert all(not training for _, training, _ in model.calls)  # encoded in eval mode
    assert [c[2][0] for c in model.calls if c[0] == "image"] == [4, 3]
    assert [c[2] for c in model.calls if c[0] == "text"] == [(4, 77)] * 8 + [(3, 77)]
    with torch.no_grad():
        x = torch.stack(
            [
                torch.from_numpy(ds.image_array(i).copy()).permute(2, 0, 1).float() / 255
                for i in range(7)
            ]
        )
        assert torch.allclose(img, model.encode_image(x, normalize=True), atol=1e-6)
        ref = model.encode_text(tok(ds.all_captions()), normalize=True)
        assert torch.allclose(txt, ref, atol=1e-6)
    # transform / tokenizer taken from the dataset; metrics run on the output
    ds2 = SceneCaptions(
        "test", size=7, image_size=16, tokenizer=tok, transform=lambda im: torch.zeros(3, 2, 2)
    )
    out2 = encode_dataset(model, ds2, batch_size=64, device="cpu", disable=True)
    assert torch.allclose(out2.image_features, out2.image_features[:1].expand(7, -1))
    assert torch.equal(out2.text_features, txt)
    m = retrieval_metrics(*out)
    assert 0 <= m["rsum"] <= 600
    with pytest.raises(ValueError, match="tokenizer"):
        encode_dataset(model, ds, disable=True)
