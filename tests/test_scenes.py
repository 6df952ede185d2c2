"""Tests for the embedded captioned-scenes dataset (cdds_fast.data)."""

from __future__ import annotations

import hashlib
import re
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cdds_fast.data import CsvRetrieval
from cdds_fast.data.scenes import (
    COLOURS,
    DEFAULT_SIZES,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    SceneCaptions,
    relation,
    write_csv,
)


def _pattern(words) -> re.Pattern:
    alts = sorted(words, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in alts) + r")\b", re.IGNORECASE)


def _mentioned(caption: str, table: dict[str, tuple[str, ...]]) -> set[str]:
    """Canonical names whose words occur in the caption."""
    return {name for name, words in table.items() if _pattern(words).search(caption)}


_COLOUR_WORDS = {k: v[1] for k, v in COLOURS.items()}
_SIZE_WORDS = {k: v[1] for k, v in SIZES.items()}
_POSITION_WORDS = {k: v[1] for k, v in POSITIONS.items()}
_REL_RE = _pattern([p for ps in RELATIONS.values() for p in ps])
_REL_CANON = {p: rel for rel, ps in RELATIONS.items() for p in ps}


def _check_captions(ds: SceneCaptions, i: int) -> None:
    scene = ds.scene(i)
    caps = ds.captions(i)
    assert len(caps) == 5 and len(set(caps)) == 5, caps
    colours = {o.colour for o in scene.objects}
    shapes = {o.shape for o in scene.objects}
    sizes = {o.size for o in scene.objects}
    for cap in caps:
        # exactly the objects' colours, shapes and sizes are mentioned, nothing else
        assert _mentioned(cap, _COLOUR_WORDS) == colours, (cap, scene.objects)
        assert _mentioned(cap, SHAPES) == shapes, (cap, scene.objects)
        assert _mentioned(cap, _SIZE_WORDS) == sizes, (cap, scene.objects)
        # spatial content: a relation between two objects or the objects' own positions
        positions = _mentioned(cap, _POSITION_WORDS)
        assert positions <= {o.position for o in scene.objects}, (cap, scene.objects)
        m = _REL_RE.search(cap)
        if len(scene.objects) == 1:
            assert m is None and positions == {scene.objects[0].position}, cap
        elif m is None:
            assert positions == {o.position for o in scene.objects}, (cap, scene.objects)
        else:
            assert len(positions) == len(scene.objects) - 2, (cap, scene.objects)
        # no image-only nuisance leaks into the text
        assert not re.search(r"stripe|gradient|checker|noise|textur|background", cap, re.I), cap


def _check_relation_direction(ds: SceneCaptions, i: int) -> None:
    """In 2-object relation captions, 'A <rel> B' holds for the slots of A and B."""
    scene = ds.scene(i)
    if len(scene.objects) != 2 or scene.objects[0].colour == scene.objects[1].colour:
        return
    for cap in ds.captions(i):
        m = _REL_RE.search(cap)
        if m is None:
            continue
        first = {}
        for o in scene.objects:
            hit = _pattern(_COLOUR_WORDS[o.colour]).search(cap)
            first[o] = hit.start()
        subj, obj = sorted(scene.objects, key=lambda o: first[o])
        assert first[subj] < m.start() < first[obj], cap
        assert relation(subj.position, obj.position) == _REL_CANON[m.group(1).lower()], (
            cap,
            scene.objects,
        )


def test_splits_defaults_and_indexing():
    ds = SceneCaptions("val")
    assert ds.num_images == DEFAULT_SIZES["val"] == 200
    assert len(ds) == 5 * 200 and ds.num_captions == 1000
    assert SceneCaptions("train").num_images == 2000 and SceneCaptions("test").num_images == 500
    t2i = ds.text_to_image
    assert t2i.dtype == torch.long and torch.equal(t2i, torch.arange(1000) // 5)
    for k in (0, 4, 5, 13, 999):
        img, cap = ds[k]
        assert img.shape == (3, 64, 64) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        ref = torch.from_numpy(ds.image_array(k // 5).copy()).permute(2, 0, 1).float() / 255
        assert torch.equal(img, ref)
        assert cap == ds.captions(k // 5)[k % 5]
    assert ds.all_captions()[13] == ds.captions(2)[3]
    pil = ds.images(3)
    assert isinstance(pil, Image.Image) and pil.mode == "RGB" and pil.size == (64, 64)
    assert np.array_equal(np.asarray(pil), ds.image_array(3))
    with pytest.raises(IndexError):
        ds[1000]
    with pytest.raises(IndexError):
        ds.captions(200)


def test_transform_tokenizer_and_image_size():
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    ds = SceneCaptions("test", size=3, image_size=32, transform=lambda im: im.size, tokenizer=tok)
    size, tokens = ds[7]
    assert size == (32, 32)
    assert tokens.dtype == torch.long and tokens.shape == (77,)
    assert torch.equal(tokens, tok(ds.captions(1)[2])[0])
    assert ds.image_array(0).shape == (32, 32, 3)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"split": "dev"}, ValueError),
        ({"size": 0}, ValueError),
        ({"size": 2.5}, TypeError),
        ({"seed": -1}, ValueError),
        ({"image_size": 8}, ValueError),
    ],
)
def test_bad_arguments(kwargs, exc):
    with pytest.raises(exc):
        SceneCaptions(**kwargs)


def test_determinism_by_seed():
    a = SceneCaptions("train", size=20, seed=3)
    b = SceneCaptions("train", size=20, seed=3)
    c = SceneCaptions("train", size=20, seed=4)
    for i in (0, 7, 19):
        assert np.array_equal(a.image_array(i), b.image_array(i))
        assert a.captions(i) == b.captions(i)
        assert a.scene(i) == b.scene(i)
    assert any(not np.array_equal(a.image_array(i), c.image_array(i)) for i in range(20))
    assert [a.scene(i).objects for i in range(20)] != [c.scene(i).objects for i in range(20)]
    # rendering order does not matter (per-index streams, lazy cache)
    d = SceneCaptions("train", size=20, seed=3)
    for i in (19, 7, 0):
        assert np.array_equal(d.image_array(i), a.image_array(i))


def test_prefix_independent_of_size():
    small = SceneCaptions("train", size=30, seed=1)
    big = SceneCaptions("train", size=400, seed=1)
    for i in range(30):
        assert small.scene(i) == big.scene(i)
        assert small.captions(i) == big.captions(i)
    assert np.array_equal(small.image_array(29), big.image_array(29))


def test_splits_disjoint_and_semantics_unique():
    digests = {}
    for split in SPLITS:
        ds = SceneCaptions(split, size=150)
        hashes = {hashlib.sha1(ds.image_array(i).tobytes()).hexdigest() for i in range(150)}
        assert len(hashes) == 150
        digests[split] = hashes
        contents = [frozenset(ds.scene(i).objects) for i in range(150)]
        assert len(set(contents)) == 150, "duplicate scene content within a split"
        caps = [c for i in range(150) for c in ds.captions(i)]
        assert len(set(caps)) > 0.95 * len(caps)
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    # the random streams differ: the scene sequences are not the same
    seqs = {s: [SceneCaptions(s, size=10).scene(i).objects for i in range(10)] for s in SPLITS}
    assert seqs["train"] != seqs["val"] != seqs["test"] != seqs["train"]


def test_scene_structure():
    ds = SceneCaptions("train", size=300)
    counts = {1: 0, 2: 0, 3: 0}
    for i in range(300):
        sc = ds.scene(i)
        objs = sc.objects
        counts[len(objs)] += 1
        assert len({o.position for o in objs}) == len(objs)
        assert len({(o.shape, o.colour) for o in objs}) == len(objs)
        for o in objs:
            assert o.shape in SHAPES and o.colour in COLOURS and o.size in SIZES
            assert o.position in POSITIONS
        assert len(sc.relations) == len(objs) * (len(objs) - 1) // 2
        for a, rel, b in sc.relations:
            assert rel == relation(objs[a].position, objs[b].position)
    assert all(c > 30 for c in counts.values()), counts


def test_relation_geometry():
    assert relation("left", "right") == "left of"
    assert relation("right", "centre") == "right of"
    assert relation("top", "bottom") == "above"
    assert relation("centre", "top") == "below"
    assert relation("top", "left") == "above"  # diagonal: vertical wins
    assert relation("left", "bottom") == "above"
    inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for a in POSITIONS:
        for b in POSITIONS:
            if a != b:
                assert relation(b, a) == inverse[relation(a, b)]
    with pytest.raises(ValueError):
        relation("left", "left")


def test_captions_describe_the_scene():
    ds = SceneCaptions("train", size=200, seed=5)
    for i in range(200):
        _check_captions(ds, i)
        _check_relation_direction(ds, i)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    split=st.sampled_from(SPLITS),
    size=st.integers(1, 12),
    data=st.data(),
)
def test_captions_describe_the_scene_property(seed, split, size, data):
    ds = SceneCaptions(split, size=size, seed=seed)
    i = data.draw(st.integers(0, size - 1))
    _check_captions(ds, i)
    _check_relation_direction(ds, i)
    img = ds.image_array(i)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)


def test_nuisance_varies():
    a = SceneCaptions("train", size=100, seed=0)
    styles = [a.scene(i).style for i in range(100)]
    assert len({s.background for s in styles}) >= 4
    assert len({t for s in styles for t in s.texture}) >= 3
    assert len({s.cast for s in styles}) == 100
    assert sum(s.noise_std > 0 for s in styles) > 40
    assert len({j for s in styles for j in s.jitter}) == sum(len(s.jitter) for s in styles)
    # a different seed gives different nuisance for the same index
    b = SceneCaptions("train", size=100, seed=1)
    assert all(a.scene(i).style != b.scene(i).style for i in range(100))
    # the text side varies too: filler words, synonyms and templates all occur
    caps = " ".join(c for i in range(100) for c in a.captions(i)).lower()
    for word in ("a picture of", "there is", "in this image", "crimson", "box", "tiny", " is a"):
        assert word in caps, word


def test_images_show_the_objects():
    """The object colour is present around its slot (sanity check of the renderer)."""
    ds = SceneCaptions("val", size=60, image_size=64)
    for i in range(60):
        sc = ds.scene(i)
        img = ds.image_array(i).astype(np.float32) / 255
        for k, o in enumerate(sc.objects):
            if sc.style.texture[k] != "solid":
                continue
            (x, y), (jx, jy) = POSITIONS[o.position][0], sc.style.jitter[k]
            px, py = int((x + jx) * 64), int((y + jy) * 64)
            patch = img[py - 1 : py + 2, px - 1 : px + 2].reshape(-1, 3).mean(0)
            expect = np.asarray(COLOURS[o.colour][0]) * np.asarray(sc.style.cast)
            expect = expect + sc.style.brightness
            assert np.abs(patch - np.clip(expect, 0, 1)).max() < 0.2, (i, o, patch, expect)


def test_render_speed():
    # budget: 2000 images of 64x64 in < 5 s on one core, i.e. 2.5 ms per image
    ds = SceneCaptions("train", size=400, seed=9)
    t0 = time.process_time()
    for i in range(400):
        ds.image_array(i)
    dt = time.process_time() - t0
    assert dt < 400 * 2.5e-3, f"{dt:.2f} s for 400 images"
    t0 = time.process_time()
    for i in range(400):
        ds.image_array(i)
    assert time.process_time() - t0 < 0.1  # cached


def test_write_csv_roundtrip(tmp_path):
    pd = pytest.importorskip("pandas")

    csv_path = write_csv(tmp_path / "scenes", "val", n=4, seed=2)
    assert csv_path == (tmp_path / "scenes" / "val.csv").resolve()
    # read back exactly as open_clip's CsvDataset does
    df = pd.read_csv(csv_path, sep="\t")
    assert list(df.columns) == ["filepath", "title"] and len(df) == 20
    ds = SceneCaptions("val", size=4, seed=2)
    assert df["title"].tolist() == ds.all_captions()
    for i in range(4):
        paths = set(df["filepath"][5 * i : 5 * i + 5])
        assert len(paths) == 1
        with Image.open(paths.pop()) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), ds.image_array(i))
    back = CsvRetrieval(csv_path)
    assert back.num_images == 4 and len(back) == 20
    assert back.captions(2) == ds.captions(2)
    assert torch.equal(back.text_to_image, ds.text_to_image)
    assert np.array_equal(np.asarray(back.images(3)), ds.image_array(3))


def test_write_csv_open_clip_trainer_dataset(tmp_path):
    data = pytest.importorskip("open_clip_train.data")
    import open_clip

    csv_path = write_csv(tmp_path, "test", n=2, image_size=32)
    tok = open_clip.get_tokenizer("ViT-B-32")
    ds = data.CsvDataset(
        str(csv_path),
        lambda im: np.asarray(im.convert("RGB")),
        "filepath",
        "title",
        sep="\t",
        tokenizer=tok,
    )
    assert len(ds) == 10
    img, tokens = ds[6]
    ref = SceneCaptions("test", size=2, image_size=32)
    assert np.array_equal(img, ref.image_array(1))
    assert torch.equal(tokens, tok(ref.captions(1)[1])[0])
