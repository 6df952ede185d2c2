"""Captioned scenes: the embedded default image-caption dataset, generated on the fly.

Each image is a small scene of 1-3 flat objects; each object has a *shape* (circle, square,
triangle, star, diamond, cross, hexagon), a *colour* (red, green, blue, yellow, purple, orange,
pink, cyan), a *size* (small, large) and a *position* (one of five slots: left, right, top, bottom,
centre; objects take different slots). Pairs of objects stand in a spatial *relation* ("left of",
"right of", "above", "below") that follows from their slots. Every image has 5 captions that
describe this content in varied phrasing.

This is the situation CDDS is built for. The *semantic* content (which objects, their attributes,
where they are, how they relate) is shared by both modalities. Each modality also carries
*modality-specific* information that the other one cannot describe:

* images: the background (plain, linear or radial gradient, stripes, checkerboard; muted colours),
  object textures (solid, stripes, dots, shading), a global colour cast and brightness shift,
  Gaussian pixel noise, position jitter around the slot, small rotations, colour jitter;
* captions: the template (object list, "on the left is ...", relation sentence), word order
  (object order, which object of a pair comes first), synonyms ("red"/"crimson"/"scarlet",
  "square"/"box"/"block", "small"/"tiny"/"little", "above"/"over"), filler words ("a picture of",
  "there is", "in this image"), capitalisation and final punctuation.

A model that aligns the shared semantics and ignores the modality-specific nuisance retrieves well;
one that tries to align everything cannot.

Determinism and splits: everything is a function of ``(seed, split, index)``. Splits draw from
disjoint random streams (split code 0/1/2 for train/val/test mixed into the seed). Scene contents
are drawn in sequence per split, and a scene whose content (the set of objects with their attributes
and slots) already occurred earlier in the same split is redrawn, so no two images of a split have
the same semantics (they can across splits, as in real data). Because of that sequence, the first
``n`` scenes do not depend on ``size``: ``SceneCaptions(size=100)`` is a prefix of
``SceneCaptions(size=2000)``. Image nuisance and caption phrasing come from per-image streams.
Images are rendered with PIL on first access and cached (uint8, 12 KiB per 64x64 image).

Training indexing: as a ``Dataset`` the split is the list of (image, caption) pairs, 5 per image:
item ``i`` is image ``i // 5`` with its caption ``i % 5`` (fixed, independent of the epoch; shuffle
with the DataLoader). See :class:`cdds_fast.data.CaptionedImages` for the shared interface
(``images(i)``, ``captions(i)``, ``text_to_image``, ...). :func:`write_csv` writes a split as PNG
files plus an open_clip CSV, for training with the open_clip trainer.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cdds_fast.data import CAPTIONS_PER_IMAGE, CaptionedImages

__all__ = [
    "COLOURS",
    "DEFAULT_SIZES",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "ImageStyle",
    "Scene",
    "SceneCaptions",
    "SceneObject",
    "relation",
    "write_csv",
]

SPLITS = ("train", "val", "test")
#: Default number of images per split.
DEFAULT_SIZES = {"train": 2000, "val": 200, "test": 500}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

#: shape -> words a caption may use for it.
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "three-sided shape"),
    "star": ("star", "five-pointed star"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "cross": ("cross", "plus sign"),
    "hexagon": ("hexagon", "six-sided shape"),
}
#: colour -> (RGB in [0, 1], words a caption may use for it).
COLOURS: dict[str, tuple[tuple[float, float, float], tuple[str, ...]]] = {
    "red": ((0.86, 0.12, 0.12), ("red", "crimson", "scarlet")),
    "green": ((0.12, 0.67, 0.20), ("green", "emerald")),
    "blue": ((0.12, 0.24, 0.86), ("blue", "azure", "cobalt")),
    "yellow": ((0.92, 0.84, 0.12), ("yellow", "golden")),
    "purple": ((0.55, 0.16, 0.75), ("purple", "violet")),
    "orange": ((0.96, 0.51, 0.08), ("orange", "amber")),
    "pink": ((0.96, 0.45, 0.71), ("pink", "rose")),
    "cyan": ((0.08, 0.78, 0.82), ("cyan", "turquoise", "teal")),
}
#: size -> (radius as a fraction of the image side, words).
SIZES: dict[str, tuple[float, tuple[str, ...]]] = {
    "small": (0.075, ("small", "tiny", "little")),
    "large": (0.13, ("large", "big", "huge")),
}
#: position slot -> (centre (x, y) as fractions of the image side, phrases).
POSITIONS: dict[str, tuple[tuple[float, float], tuple[str, ...]]] = {
    "left": ((0.2, 0.5), ("on the left", "at the left", "on the left side")),
    "right": ((0.8, 0.5), ("on the right", "at the right", "on the right side")),
    "top": ((0.5, 0.2), ("at the top", "near the top", "in the upper part")),
    "bottom": ((0.5, 0.8), ("at the bottom", "near the bottom", "in the lower part")),
    "centre": ((0.5, 0.5), ("in the centre", "in the middle", "at the center")),
}
#: relation -> phrases ("A <phrase> B").
RELATIONS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

_SHAPE_NAMES = tuple(SHAPES)
_COLOUR_NAMES = tuple(COLOURS)
_SIZE_NAMES = tuple(SIZES)
_POSITION_NAMES = tuple(POSITIONS)
_NUM_OBJECTS_P = (0.2, 0.4, 0.4)  # P(1, 2, 3 objects)

_BACKGROUNDS = ("plain", "gradient", "radial", "stripes", "checker")
_TEXTURES = ("solid", "stripes", "dots", "shade")
_PREFIXES = (
    "",
    "",
    "a picture of ",
    "an image of ",
    "a photo of ",
    "a drawing of ",
    "there is ",
    "we can see ",
    "this image shows ",
    "in this image there is ",
    "here we have ",
)
_SUFFIXES = ("", "", " in this image", " in the picture", " in the scene")
_JOINERS = (" and ", ", and ", " along with ", " together with ")
_CLAUSE_JOINERS = (" and ", ", and ", "; ")
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    """One object: ``shape`` in :data:`SHAPES`, ``colour`` in :data:`COLOURS`, ``size`` in
    :data:`SIZES`, ``position`` in :data:`POSITIONS` (canonical names)."""

    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class ImageStyle:
    """The image-only nuisance of one scene (nothing here is described by any caption).

    ``jitter`` / ``rotation`` / ``texture`` / ``texture_param`` / ``colour_jitter`` have one entry
    per object; jitter in fractions of the image side, rotation in degrees; ``cast`` multiplies the
    RGB channels, ``brightness`` is added, ``noise_std`` is the std of the Gaussian pixel noise
    (pixel values in [0, 1]).
    """

    background: str
    background_colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    background_param: float
    texture: tuple[str, ...]
    texture_param: tuple[float, ...]
    jitter: tuple[tuple[float, float], ...]
    rotation: tuple[float, ...]
    colour_jitter: tuple[tuple[float, float, float], ...]
    cast: tuple[float, float, float]
    brightness: float
    noise_std: float


@dataclass(frozen=True)
class Scene:
    """A scene: its objects, the relation of every object pair ``(a, relation, b)`` with ``a < b``
    (:func:`relation`), and the image-only nuisance ``style``."""

    objects: tuple[SceneObject, ...]
    relations: tuple[tuple[int, str, int], ...]
    style: ImageStyle


def relation(a: str, b: str) -> str:
    """Spatial relation of an object in slot ``a`` to one in slot ``b`` (``a != b``).

    From the slot centres: the axis with the larger offset decides ("left of"/"right of" or
    "above"/"below"); diagonal pairs (equal offsets, e.g. top vs left) use the vertical relation.
    """
    if a == b or a not in POSITIONS or b not in POSITIONS:
        raise ValueError(
            f"relation needs two different slots from {_POSITION_NAMES}, got {a!r}, {b!r}"
        )
    (xa, ya), (xb, yb) = POSITIONS[a][0], POSITIONS[b][0]
    dx, dy = xb - xa, yb - ya
    if abs(dy) >= abs(dx):
        return "above" if ya < yb else "below"
    return "left of" if xa < xb else "right of"


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _noun_phrase(rng: np.random.Generator, obj: SceneObject) -> str:
    s = _pick(rng, SIZES[obj.size][1])
    c = _pick(rng, COLOURS[obj.colour][1])
    h = _pick(rng, SHAPES[obj.shape])
    form = int(rng.integers(5))
    if form <= 2:
        return _article(f"{s} {c} {h}")
    if form == 3:
        return _article(f"{s} {h} in {c}")
    return _article(f"{c} {h} that is {s}")


def _join(rng: np.random.Generator, parts: list[str], joiners: tuple[str, ...] = _JOINERS) -> str:
    if len(parts) == 1:
        return parts[0]
    head = ", ".join(parts[:-1])
    return head + _pick(rng, joiners) + parts[-1]


def _caption(rng: np.random.Generator, scene: Scene) -> str:
    objs = scene.objects
    n = len(objs)
    order = [int(k) for k in rng.permutation(n)]
    template = int(rng.integers(3)) if n >= 2 else int(rng.integers(2))
    pos = lambda o: _pick(rng, POSITIONS[o.position][1])  # noqa: E731
    if template == 0:  # object list: "[prefix] a small red circle on the left and a big box ..."
        body = _join(rng, [f"{_noun_phrase(rng, objs[k])} {pos(objs[k])}" for k in order])
        text = _pick(rng, _PREFIXES) + body
        if not text.startswith(("in this image", "an image", "this image")):
            text += _pick(rng, _SUFFIXES)
    elif template == 1:  # position first: "on the left is a small red circle, and ..."
        clauses = [f"{pos(objs[k])} is {_noun_phrase(rng, objs[k])}" for k in order]
        text = _join(rng, clauses, _CLAUSE_JOINERS)
    else:  # relation: "[prefix] a small red circle to the left of a big box[, and ... at the top]"
        a, b = order[0], order[1]
        rel = relation(objs[a].position, objs[b].position)
        text = (
            f"{_noun_phrase(rng, objs[a])} {_pick(rng, RELATIONS[rel])} "
            f"{_noun_phrase(rng, objs[b])}"
        )
        if n == 3:
            c = objs[order[2]]
            text += f", and {_noun_phrase(rng, c)} {pos(c)}"
        text = _pick(rng, _PREFIXES) + text
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.5:
        text += "."
    return text


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as fractions of the side: ``(xx, yy)``, each ``[size, size]``."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


def _polygon(
    shape: str, cx: float, cy: float, r: float, rot_deg: float
) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at ``(cx, cy)`` with radius ``r`` (pixels), rotated."""
    if shape == "square":
        pts = [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]
    elif shape == "triangle":
        pts = [(1.15 * math.cos(a), 1.15 * math.sin(a) + 0.15) for a in np.radians([-90, 30, 150])]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.15 if k % 2 == 0 else 0.5
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a) + 0.1))
    elif shape == "diamond":
        pts = [(0.0, -1.2), (0.75, 0.0), (0.0, 1.2), (-0.75, 0.0)]
    elif shape == "cross":
        w, h = 0.32, 1.0  # arm half-width, half-length
        pts = [
            (-w, -h),
            (w, -h),
            (w, -w),
            (h, -w),
            (h, w),
            (w, w),
            (w, h),
            (-w, h),
            (-w, w),
            (-h, w),
            (-h, -w),
            (-w, -w),
        ]
    elif shape == "hexagon":
        pts = [(1.02 * math.cos(a), 1.02 * math.sin(a)) for a in np.radians(np.arange(6) * 60.0)]
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {shape!r}")
    t = math.radians(rot_deg)
    ct, st = math.cos(t), math.sin(t)
    return [(cx + r * (x * ct - y * st), cy + r * (x * st + y * ct)) for x, y in pts]


def _mask(obj: SceneObject, cx: float, cy: float, rot: float, size: int) -> np.ndarray:
    """Anti-aliased coverage ``[size, size]`` float32 in [0, 1] of one object."""
    ss = _SUPERSAMPLE
    big = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(big)
    r = SIZES[obj.size][0] * size * ss
    X, Y = cx * size * ss, cy * size * ss
    if obj.shape == "circle":
        draw.ellipse([X - r, Y - r, X + r, Y + r], fill=255)
    else:
        draw.polygon(_polygon(obj.shape, X, Y, r, rot), fill=255)
    return np.asarray(big.reduce(ss), dtype=np.float32) * (1.0 / 255.0)


def _texture(kind: str, param: float, size: int) -> np.ndarray | float:
    xx, yy = _grid(size)
    if kind == "solid":
        return 1.0
    if kind == "stripes":
        t = ((xx + yy) * size / (2.0 + 2.0 * param)) % 1.0
        return np.where(t < 0.5, 1.0, 0.72).astype(np.float32)
    if kind == "dots":
        p = 3.0 + 2.0 * param
        on = ((xx * size) % p < p / 2) & ((yy * size) % p < p / 2)
        return np.where(on, 0.7, 1.0).astype(np.float32)
    # shade: brightness ramp
    return (0.72 + 0.45 * (xx * (1 - param) + yy * param)).astype(np.float32)


def _background(style: ImageStyle, size: int) -> np.ndarray:
    xx, yy = _grid(size)
    c1 = np.asarray(style.background_colours[0], dtype=np.float32)
    c2 = np.asarray(style.background_colours[1], dtype=np.float32)
    p = style.background_param
    kind = style.background
    if kind == "plain":
        return np.broadcast_to(c1, (size, size, 3)).copy()
    if kind == "gradient":
        a = 2 * math.pi * p
        t = math.cos(a) * (xx - 0.5) + math.sin(a) * (yy - 0.5)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == "radial":
        t = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.71
    elif kind == "stripes":
        a = math.pi / 4 * int(p * 4)
        period = 4.0 + 8.0 * ((p * 4) % 1.0)
        u = (math.cos(a) * xx + math.sin(a) * yy) * size / period
        t = (u % 1.0 < 0.5).astype(np.float32)
    else:  # checker
        cell = 4 + int(p * 8)
        t = (((xx * size) // cell + (yy * size) // cell) % 2).astype(np.float32)
    return c1 + (c2 - c1) * t[..., None]


def _render(scene: Scene, size: int, noise: np.ndarray | None) -> np.ndarray:
    """Scene -> uint8 ``[size, size, 3]``."""
    st = scene.style
    img = _background(st, size)
    for k, obj in enumerate(scene.objects):
        (px, py) = POSITIONS[obj.position][0]
        jx, jy = st.jitter[k]
        m = _mask(obj, px + jx, py + jy, st.rotation[k], size)[..., None]
        colour = np.clip(np.asarray(COLOURS[obj.colour][0]) + np.asarray(st.colour_jitter[k]), 0, 1)
        tex = _texture(st.texture[k], st.texture_param[k], size)
        fill = colour.astype(np.float32) * (tex[..., None] if isinstance(tex, np.ndarray) else tex)
        img = img * (1.0 - m) + fill * m
    img = img * np.asarray(st.cast, dtype=np.float32) + st.brightness
    if noise is not None:
        img = img + noise
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class SceneCaptions(CaptionedImages):
    """Procedural captioned scenes (module docstring): 5 captions per image, deterministic by seed.

    As a ``Dataset``: ``len == 5 * num_images``; item ``i`` is ``(image i // 5, caption i % 5)``,
    the image as a float tensor ``[3, image_size, image_size]`` in ``[0, 1]`` (or
    ``transform(PIL image)``), the caption as a string (or ``tokenizer(caption)[0]``).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams).
        size: number of images; ``None``: :data:`DEFAULT_SIZES` (2000 / 200 / 500).
        image_size: side of the square images in pixels (>= 16).
        seed: non-negative int; the whole dataset is a function of ``(seed, split, index)``.
        transform: applied to the PIL image in ``__getitem__`` (e.g. open_clip ``preprocess``).
        tokenizer: applied as ``tokenizer(caption)[0]`` in ``__getitem__``.
    """

    captions_per_image = CAPTIONS_PER_IMAGE

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        image_size: int = 64,
        seed: int = 0,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
    ):
        super().__init__(transform=transform, tokenizer=tokenizer)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.size = DEFAULT_SIZES[split] if size is None else _check_int("size", size, 1)
        self.image_size = _check_int("image_size", image_size, 16)
        self.seed = _check_int("seed", seed, 0)
        self._code = _SPLIT_CODE[split]
        self._contents = self._draw_contents()
        self._image_cache: dict[int, np.ndarray] = {}
        self._caption_cache: dict[int, list[str]] = {}

    # -- generation -----------------------------------------------------------------------------
    def _rng(self, stream: int, index: int | None = None) -> np.random.Generator:
        key = [self.seed, self._code, stream] + ([] if index is None else [index])
        return np.random.default_rng(np.random.SeedSequence(key))

    def _draw_contents(self) -> list[tuple[SceneObject, ...]]:
        rng = self._rng(0)
        seen: set[frozenset[SceneObject]] = set()
        out: list[tuple[SceneObject, ...]] = []
        n_kinds = len(_SHAPE_NAMES) * len(_COLOUR_NAMES)
        for _ in range(self.size):
            while True:
                n = 1 + int(rng.choice(3, p=_NUM_OBJECTS_P))
                kinds = rng.choice(n_kinds, size=n, replace=False)
                slots = rng.choice(len(_POSITION_NAMES), size=n, replace=False)
                sizes = rng.integers(2, size=n)
                objs = tuple(
                    SceneObject(
                        shape=_SHAPE_NAMES[int(kd) // len(_COLOUR_NAMES)],
                        colour=_COLOUR_NAMES[int(kd) % len(_COLOUR_NAMES)],
                        size=_SIZE_NAMES[int(sz)],
                        position=_POSITION_NAMES[int(sl)],
                    )
                    for kd, sl, sz in zip(kinds, slots, sizes, strict=True)
                )
                key = frozenset(objs)
                if key not in seen:
                    seen.add(key)
                    out.append(objs)
                    break
        return out

    def _style(self, rng: np.random.Generator, n: int) -> ImageStyle:
        grey = rng.uniform(0.2, 0.85)
        c1 = np.clip(grey + rng.uniform(-0.08, 0.08, 3), 0, 1)
        shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.3) + rng.uniform(-0.05, 0.05, 3)
        c2 = np.clip(c1 + shift, 0, 1)
        tup = lambda a: tuple(float(v) for v in a)  # noqa: E731
        return ImageStyle(
            background=_pick(rng, _BACKGROUNDS),
            background_colours=(tup(c1), tup(c2)),
            background_param=float(rng.random()),
            texture=tuple(_pick(rng, _TEXTURES) for _ in range(n)),
            texture_param=tuple(float(rng.random()) for _ in range(n)),
            jitter=tuple(tup(rng.uniform(-0.025, 0.025, 2)) for _ in range(n)),
            rotation=tuple(float(rng.uniform(-15, 15)) for _ in range(n)),
            colour_jitter=tuple(tup(rng.uniform(-0.06, 0.06, 3)) for _ in range(n)),
            cast=tup(1.0 + rng.uniform(-0.12, 0.12, 3)),
            brightness=float(rng.uniform(-0.05, 0.05)),
            noise_std=float(0.0 if rng.random() < 0.3 else rng.uniform(0.005, 0.04)),
        )

    def _scene_and_rng(self, i: int) -> tuple[Scene, np.random.Generator]:
        objs = self._contents[i]
        rels = tuple(
            (a, relation(objs[a].position, objs[b].position), b)
            for a in range(len(objs))
            for b in range(a + 1, len(objs))
        )
        rng = self._rng(1, i)
        return Scene(objects=objs, relations=rels, style=self._style(rng, len(objs))), rng

    # -- public ---------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Number of images (``size``)."""
        return self.size

    def scene(self, i: int) -> Scene:
        """The full description of image ``i``: objects, relations, image nuisance."""
        return self._scene_and_rng(self._check_image_index(i))[0]

    def image_array(self, i: int) -> np.ndarray:
        """Image ``i`` as a read-only uint8 array ``[H, W, 3]`` (rendered once, then cached)."""
        i = self._check_image_index(i)
        arr = self._image_cache.get(i)
        if arr is None:
            scene, rng = self._scene_and_rng(i)
            s = self.image_size
            noise = None
            if scene.style.noise_std > 0:
                noise = rng.standard_normal((s, s, 3), dtype=np.float32) * scene.style.noise_std
            arr = _render(scene, s, noise)
            arr.setflags(write=False)
            self._image_cache[i] = arr
        return arr

    def _load_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.image_array(i), mode="RGB")

    def captions(self, i: int) -> list[str]:
        """The 5 distinct captions of image ``i``."""
        i = self._check_image_index(i)
        caps = self._caption_cache.get(i)
        if caps is None:
            scene = self._scene_and_rng(i)[0]
            rng = self._rng(2, i)
            caps = []
            for _ in range(100 * CAPTIONS_PER_IMAGE):
                c = _caption(rng, scene)
                if c not in caps:
                    caps.append(c)
                    if len(caps) == CAPTIONS_PER_IMAGE:
                        break
            while len(caps) < CAPTIONS_PER_IMAGE:  # pragma: no cover - never happens in practice
                caps.append(caps[-1])
            self._caption_cache[i] = caps
        return list(caps)

    def __getitem__(self, k: int):
        i, j = self.pair_index(k)
        if self.transform is not None:
            image = self.transform(self._load_image(i))
        else:
            arr = torch.from_numpy(self.image_array(i).copy())
            image = arr.permute(2, 0, 1).float().div_(255.0)
        caption = self.captions(i)[j]
        if self.tokenizer is not None:
            caption = self.tokenizer(caption)[0]
        return image, caption

    def __repr__(self) -> str:
        return (
            f"SceneCaptions(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
            f"seed={self.seed})"
        )


def write_csv(
    root: str | os.PathLike,
    split: str = "train",
    n: int | None = None,
    *,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the first ``n`` images of a :class:`SceneCaptions` split as PNGs plus an open_clip CSV.

    Files: ``root/<split>/<index:06d>.png`` and ``root/<split>.csv`` with columns ``filepath``
    (absolute path, so the trainer can run from any directory) and ``title``, tab-separated, one
    row per (image, caption) pair (5 per image, image-major). Train with open_clip's trainer via
    ``--dataset-type csv --train-data root/train.csv --csv-separator "\\t" --csv-img-key filepath
    --csv-caption-key title``; read back with :class:`cdds_fast.data.CsvRetrieval`.

    Args:
        root: output folder (created if needed).
        split: ``"train"``, ``"val"`` or ``"test"``.
        n: number of images; ``None``: the split's default size.
        image_size, seed: as in :class:`SceneCaptions`.

    Returns:
        The path of the CSV file.
    """
    ds = SceneCaptions(split, size=n, image_size=image_size, seed=seed)
    root = Path(root).resolve()
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    csv_path = root / f"{split}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["filepath", "title"])
        for i in range(ds.num_images):
            path = img_dir / f"{i:06d}.png"
            ds.images(i).save(path, format="PNG", compress_level=1)
            for cap in ds.captions(i):
                w.writerow([str(path), cap])
    return csv_path
