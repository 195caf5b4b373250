"""Deterministic generator of captioned synthetic images ("shapes"): the data `shapes-mini` is trained on.

A scene is one object, sometimes two, of a named shape, colour, size and position, on a background of a
named colour (flat, gradient, mottled noise, stripes or checker), with light sensor noise, sometimes a
slight blur, and the compression of the file format it is written in. Each scene comes with a caption
drawn from several templates with synonyms, and with its structured attributes.

Layout: positions and sizes are measured in the image's central square (side = the shorter side), the
region a CLIP centre crop keeps, so "a large red circle on the left" stays true after preprocessing at
any aspect ratio.

Determinism: image ``i`` of ``generate(..., seed=s)`` has its own sub-seed ``scene_seed(s, i)``, from
which its attributes, caption, pixels and file options are drawn in separate streams. So the same seed
gives the same captions and byte-identical files (for the same numpy / Pillow / libjpeg / libwebp
versions), generating ``n`` images is a prefix of generating ``n + k``, and changing the image size or
formats does not change the captions.

Manifest: ``manifest.jsonl`` in the output folder, one JSON object per line: ``image`` (path relative to
the manifest's folder), ``caption``, the attributes (``shape``, ``colour``, ``size``, ``position``,
``background``, ``background_kind``, ``second`` = null or an object with shape/colour/size/position),
``stated`` (the attributes the caption mentions), ``seed`` (the sub-seed), ``width``/``height`` (upright),
``format`` and ``orientation`` (EXIF value, 1 when none).

Run ``python -m retrieval.shapes --help``. Needs only numpy and Pillow (no torch).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageDraw, ImageFilter
from tqdm import tqdm

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "heart", "ring")
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS = ("grey", "white", "black", "brown", "pink", "cyan")
BACKGROUND_KINDS = ("flat", "gradient", "noise", "stripes", "checker")
FORMATS = ("jpeg", "png", "webp")
MAX_PIXELS = 12_000_000  # the largest "photo" the generator makes (12 MP)

RGB = {  # nominal sRGB of every named colour, before per-image tints
    "red": (215, 30, 35), "green": (35, 165, 55), "blue": (35, 75, 215), "yellow": (245, 215, 30),
    "orange": (250, 135, 20), "purple": (135, 45, 180), "white": (245, 245, 245), "black": (22, 22, 22),
    "grey": (128, 128, 128), "brown": (115, 75, 40), "pink": (245, 165, 200), "cyan": (40, 180, 185),
}  # fmt: skip
_COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"), "green": ("green", "emerald"), "blue": ("blue", "cobalt", "sapphire"),
    "yellow": ("yellow", "golden", "lemon"), "orange": ("orange", "tangerine", "amber"),
    "purple": ("purple", "violet"), "white": ("white", "snow-white"), "black": ("black", "jet-black"),
    "grey": ("grey", "gray"), "brown": ("brown",), "pink": ("pink",), "cyan": ("cyan", "turquoise"),
}  # fmt: skip
_SHAPE_WORDS = {
    "circle": ("circle", "disc", "disk"), "square": ("square", "block"), "triangle": ("triangle",),
    "star": ("star", "five-pointed star"), "hexagon": ("hexagon", "six-sided shape"),
    "cross": ("cross", "plus sign"), "heart": ("heart", "heart shape"), "ring": ("ring", "hoop", "donut"),
}  # fmt: skip
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
# A position inside a sentence ("... on the left") and as a trailing fragment ("..., left side").
_POSITION_WORDS = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
_POSITION_TAILS = {
    "left": ("left side", "on the left"), "right": ("right side", "on the right"), "top": ("top", "upper part"),
    "bottom": ("bottom", "lower part"), "centre": ("centre", "center", "middle"),
}  # fmt: skip
_KIND_WORDS = {
    "flat": ("plain",), "gradient": ("gradient",), "noise": ("mottled",), "stripes": ("striped",),
    "checker": ("checkered", "checked"),
}  # fmt: skip
# Centre of each position inside the central square, as fractions of its side.
_ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
_DIAMETER = {"small": (0.22, 0.30), "large": (0.44, 0.54)}  # fractions of the central square's side
_VALUES = {
    "shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS,
    "background_kind": BACKGROUND_KINDS,
}  # fmt: skip
_TWO_OBJECT_P = 0.2
_WORK_MAX = 1280  # scenes are drawn at most this large, then upscaled, so 12 MP photos stay cheap
# Pillow transposes that store an upright image so that applying its EXIF orientation restores it.
_STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}  # fmt: skip
_CAMERAS = (
    ("Canon", "Canon EOS 5D Mark IV"), ("NIKON CORPORATION", "NIKON D750"), ("SONY", "ILCE-7M3"),
    ("Apple", "iPhone 12"), ("FUJIFILM", "X-T3"),
)  # fmt: skip
_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_FORMAT_WEIGHT = {"jpeg": 3.0, "png": 1.0, "webp": 1.0}
_ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))
DEFAULT_SIZE_RANGE = (96, 512)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    position: str  # one of POSITIONS


@dataclass(frozen=True)
class Attributes:
    """What a scene shows: its (first) object, the background and an optional second object."""

    shape: str  # the first object's shape (one of SHAPES)
    colour: str  # its colour (one of COLOURS)
    size: str  # its size (one of SIZES)
    position: str  # its position (one of POSITIONS)
    background: str  # the background's colour (one of BACKGROUNDS, never an object's colour)
    background_kind: str  # one of BACKGROUND_KINDS
    second: ShapeObject | None = None  # the second object of a two-object scene

    @property
    def objects(self) -> tuple[ShapeObject, ...]:
        """The objects in the scene, first one first."""
        first = ShapeObject(self.shape, self.colour, self.size, self.position)
        return (first,) if self.second is None else (first, self.second)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``second`` is None or a dict)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Attributes:
        """Inverse of `to_dict`; extra keys (e.g. a manifest line's) are ignored."""
        second = d.get("second")
        return cls(
            shape=d["shape"], colour=d["colour"], size=d["size"], position=d["position"],
            background=d["background"], background_kind=d["background_kind"],
            second=ShapeObject(**second) if second else None,
        )  # fmt: skip


class Caption(NamedTuple):
    """A caption and the attribute names it states (object-level names apply to every object)."""

    text: str
    stated: frozenset[str]


class Sample(NamedTuple):
    """One generated image: its file, caption, attributes, the attributes the caption states, and its sub-seed."""

    path: Path
    caption: str
    attributes: Attributes
    stated: frozenset[str]
    seed: int


def scene_seed(seed: int, index: int) -> int:
    """The sub-seed of image ``index`` in the set generated with ``seed`` (independent of the set's size)."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


def _rng(scene: int, stream: int) -> np.random.Generator:
    """One of the independent random streams of a scene (0 attributes, 1 caption, 2 pixels, 3 file)."""
    return np.random.default_rng([scene, stream])


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """A uniform choice that returns a plain str (not numpy's str_)."""
    return options[int(rng.integers(len(options)))]


def random_attributes(
    rng: np.random.Generator | int,
    *,
    two_objects_p: float = _TWO_OBJECT_P,
    backgrounds: Sequence[str] = BACKGROUNDS,
    **fixed: str,
) -> Attributes:
    """Draws a scene's attributes.

    Args:
        rng: A generator, or a scene sub-seed (then its attribute stream is used).
        two_objects_p: Probability of a second object.
        backgrounds: Background colours to choose from (the object colours are always excluded).
        **fixed: Attributes of the first object to keep fixed, e.g. ``colour="red"``.

    Returns:
        The attributes. Two objects sit left/right or top/bottom of each other and differ in shape or colour.
    """
    for key, value in fixed.items():
        if value not in _VALUES.get(key, ()):
            known = "; ".join(f"{k}: {', '.join(v)}" for k, v in _VALUES.items())
            raise ValueError(f"cannot fix {key}={value!r}; fixable values are {known}")
    if not isinstance(rng, np.random.Generator):
        rng = _rng(rng, 0)
    shape = fixed.get("shape") or _pick(rng, SHAPES)
    colour = fixed.get("colour") or _pick(rng, COLOURS)
    size = fixed.get("size") or _pick(rng, SIZES)
    position = fixed.get("position")
    second = None
    if position != "centre" and rng.random() < two_objects_p:
        if position is None:
            pair = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
            position = pair[int(rng.integers(2))]
        pair = ("left", "right") if position in ("left", "right") else ("top", "bottom")
        while True:
            second = ShapeObject(_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, SIZES), pair[pair[0] == position])
            if (second.shape, second.colour) != (shape, colour):
                break
    position = position or _pick(rng, POSITIONS)
    used = {colour} if second is None else {colour, second.colour}
    background = fixed.get("background") or _pick(rng, [b for b in backgrounds if b not in used] or [""])
    if background in used or not background:
        raise ValueError(f"background must differ from the objects' colours {sorted(used)}; allow other backgrounds")
    kind = fixed.get("background_kind") or _pick(rng, BACKGROUND_KINDS)
    return Attributes(shape, colour, size, position, background, kind, second)


def _a(phrase: str) -> str:
    """Prefixes "a" or "an"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(attributes: Attributes, seed: int = 0) -> Caption:
    """A caption for a scene, chosen deterministically by ``seed`` among templates and synonyms.

    Args:
        attributes: The scene.
        seed: A scene sub-seed (its caption stream is used), so the same scene can get different captions.

    Returns:
        The caption text and the attributes it states. Most captions state shape, colour, size and position,
        many also the background colour, so that few scenes in a gallery share a caption's meaning.
    """
    rng = _rng(seed, 1)
    bg = _pick(rng, _COLOUR_WORDS[attributes.background])
    kind = _pick(rng, _KIND_WORDS[attributes.background_kind])
    objs = list(attributes.objects)
    if len(objs) == 2 and rng.random() < 0.5:
        objs.reverse()
    words = [
        {
            "shape": _pick(rng, _SHAPE_WORDS[o.shape]),
            "colour": _pick(rng, _COLOUR_WORDS[o.colour]),
            "size": _pick(rng, _SIZE_WORDS[o.size]),
            "pos": _pick(rng, _POSITION_WORDS[o.position]),
            "tail": _pick(rng, _POSITION_TAILS[o.position]),
        }
        for o in objs
    ]
    scp, scpz = {"shape", "colour", "position"}, {"shape", "colour", "position", "size"}
    w = words[0]
    if len(objs) == 1:
        templates = (
            (2.0, scpz, f"a photo of {_a(w['size'])} {w['colour']} {w['shape']} {w['pos']}"),
            (1.5, scpz, f"{w['size']} {w['colour']} {w['shape']}, {w['tail']}"),
            (2.0, scpz | {"background"},
             f"{_a(w['size'])} {w['colour']} {w['shape']} {w['pos']} on {_a(bg)} background"),
            (1.0, scpz | {"background", "background_kind"},
             f"a photo of {_a(w['size'])} {w['colour']} {w['shape']} {w['pos']} on {_a(kind)} {bg} background"),
            (1.0, scpz | {"background"}, f"{w['colour']} {w['shape']}, {w['size']}, {w['tail']}, {bg} background"),
            (0.5, scp, f"an image of {_a(w['colour'])} {w['shape']} {w['pos']}"),
            (0.6, {"shape", "colour", "size", "background"},
             f"{_a(w['size'])} {w['colour']} {w['shape']} against {_a(bg)} backdrop"),
            (0.3, {"shape", "colour"}, f"{_a(w['colour'])} {w['shape']}"),
        )  # fmt: skip
    else:
        v = words[1]
        sized = f"{_a(w['size'])} {w['colour']} {w['shape']} {w['pos']} and {_a(v['size'])} {v['colour']} {v['shape']}"
        templates = (
            (0.8, {"shape", "colour"}, f"{_a(w['colour'])} {w['shape']} and {_a(v['colour'])} {v['shape']}"),
            (0.8, scp, f"{_a(w['colour'])} {w['shape']} {w['pos']} and {_a(v['colour'])} {v['shape']} {v['pos']}"),
            (2.0, scpz, f"{sized} {v['pos']}"),
            (1.5, scpz | {"background"}, f"a photo of {sized} {v['pos']} on {_a(bg)} background"),
            (0.8, {"shape", "colour", "size", "background"},
             f"two shapes on {_a(bg)} background: {_a(w['size'])} {w['colour']} {w['shape']} and "
             f"{_a(v['size'])} {v['colour']} {v['shape']}"),
        )  # fmt: skip
    weights = np.array([t[0] for t in templates])
    _, stated, text = templates[int(rng.choice(len(templates), p=weights / weights.sum()))]
    return Caption(text, frozenset(stated))


def caption(attributes: Attributes, seed: int = 0) -> str:
    """The text of `describe` (see there)."""
    return describe(attributes, seed).text


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a polygonal shape of circumradius ``r`` (y axis points down)."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.radians([45, 135, 225, 315])]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a) + 0.2) for a in np.radians([-90, 30, 150])]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.radians(np.arange(0, 360, 60))]
    elif shape == "star":
        radii = np.tile([1.0, 0.45], 5)
        pts = [
            (rr * math.cos(a), rr * math.sin(a))
            for rr, a in zip(radii, np.radians(np.arange(-90, 270, 36)), strict=True)
        ]
    elif shape == "cross":
        u, v = 0.3, 0.85
        quarter = [(-u, -v), (u, -v), (u, -u)]  # one arm's end and the inner corner after it
        pts = [(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in quarter]
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3 / 17
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17 - 0.1
        pts = list(zip(x.tolist(), y.tolist(), strict=True))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _shade(rgb: Sequence[int]) -> np.ndarray:
    """A second tone of a background colour for stripes and checkers: darker, or lighter for dark colours."""
    c = np.asarray(rgb, np.float32)
    return c * 0.78 if c.mean() > 70 else c + 40


def _background(attributes: Attributes, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """The background as float32 [h, w, 3]."""
    base = np.asarray(RGB[attributes.background], np.float32) + rng.uniform(-10, 10, 3)
    kind = attributes.background_kind
    if kind == "flat":
        return np.broadcast_to(base, (h, w, 3)).copy()
    ys, xs = np.ogrid[0:h, 0:w]
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = (xs * math.cos(a) + ys * math.sin(a)) / max(w, h)  # [h, w], within [-1.4, 1.4]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        lo, hi = _shade(base) * 0.5 + base * 0.5, np.minimum(base * 1.15 + 15, 255)
        return lo + (hi - lo) * t[..., None]
    if kind == "noise":
        grid = rng.uniform(0.75, 1.2, (6, 6)).astype(np.float32)
        field = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC))
        return base * field[..., None] + (field[..., None] - 1) * 40
    period = max(4.0, rng.uniform(0.06, 0.14) * max(w, h))
    other = _shade(base)
    if kind == "stripes":
        a = float(rng.choice([0, math.pi / 4, math.pi / 2, 3 * math.pi / 4]))
        on = ((xs * math.cos(a) + ys * math.sin(a)) // (period / 2)) % 2 == 0
    else:
        on = ((xs // period) + (ys // period)) % 2 == 0
    return np.where(on[..., None], base, other)


def _draw(canvas: np.ndarray, obj: ShapeObject, square: tuple[float, float, float], rng: np.random.Generator) -> None:
    """Paints one anti-aliased, softly lit object into ``canvas`` (float32 [h, w, 3]) in place."""
    h, w, _ = canvas.shape
    x0, y0, side = square
    r = side * rng.uniform(*_DIAMETER[obj.size]) / 2
    ax, ay = _ANCHORS[obj.position]
    cx = float(np.clip(x0 + (ax + rng.uniform(-0.04, 0.04)) * side, r, w - r))
    cy = float(np.clip(y0 + (ay + rng.uniform(-0.04, 0.04)) * side, r, h - r))
    angle = math.radians(rng.uniform(-12, 12))
    bx0, by0 = max(int(cx - r) - 2, 0), max(int(cy - r) - 2, 0)
    bx1, by1 = min(int(cx + r) + 3, w), min(int(cy + r) + 3, h)
    ss = 4 if r < 100 else 2  # supersampling for anti-aliased edges, less when the object is big anyway
    mask = Image.new("L", ((bx1 - bx0) * ss, (by1 - by0) * ss))
    draw = ImageDraw.Draw(mask)
    lx, ly, lr = (cx - bx0) * ss, (cy - by0) * ss, r * ss
    if obj.shape in ("circle", "ring"):
        draw.ellipse((lx - lr, ly - lr, lx + lr, ly + lr), fill=255)
        if obj.shape == "ring":
            ir = lr * 0.55
            draw.ellipse((lx - ir, ly - ir, lx + ir, ly + ir), fill=0)
    else:
        draw.polygon(_outline(obj.shape, lx, ly, lr, angle), fill=255)
    alpha = np.asarray(mask.reduce(ss), np.float32)[..., None] / 255  # [bh, bw, 1]
    colour = np.asarray(RGB[obj.colour], np.float32) + rng.uniform(-12, 12, 3)
    light = rng.uniform(0, 2 * math.pi)
    ys, xs = np.ogrid[by0:by1, bx0:bx1]
    lit = 1 + 0.08 * ((xs - cx) * math.cos(light) + (ys - cy) * math.sin(light)) / r  # soft directional light
    paint = np.clip(colour * lit[..., None] + (lit[..., None] - 1) * 60, 0, 255)
    region = canvas[by0:by1, bx0:bx1]
    region += (paint - region) * alpha


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) from an int (square) or a pair, validated."""
    w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if w < 16 or h < 16 or w * h > MAX_PIXELS:
        raise ValueError(
            f"image size {w}x{h} is out of range; use 16..{MAX_PIXELS // 1_000_000} MP, e.g. 128 or 4000x3000"
        )
    return w, h


def render(scene: Attributes | int, size: int | tuple[int, int] = 128, *, seed: int | None = None) -> Image.Image:
    """Draws a scene as an upright RGB image, with sensor noise and sometimes a slight blur (no compression).

    Args:
        scene: Attributes to draw, or a scene sub-seed (e.g. from `scene_seed`), which also fixes the attributes.
        size: Side of a square image, or (width, height); at most 12 MP.
        seed: Sub-seed for the drawing's jitter (placement, tints, noise); defaults to ``scene`` when that is an
            int, else 0.

    Returns:
        The image. ``render(scene_seed(s, i), size)`` is exactly the picture of image ``i`` of
        ``generate(..., seed=s)`` before it is written.
    """
    if isinstance(scene, Attributes):
        attributes, seed = scene, 0 if seed is None else seed
    else:
        attributes, seed = random_attributes(scene), scene if seed is None else seed
    w, h = _size(size)
    rng = _rng(seed, 2)
    scale = min(1.0, _WORK_MAX / max(w, h))
    ww, wh = max(16, round(w * scale)), max(16, round(h * scale))
    canvas = _background(attributes, ww, wh, rng).astype(np.float32, copy=False)
    side = min(ww, wh)
    square = ((ww - side) / 2, (wh - side) / 2, side)
    for obj in attributes.objects:
        _draw(canvas, obj, square, rng)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9) * max(1.0, side / 256)))
    if (ww, wh) != (w, h):
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    sigma = rng.uniform(1.5, 5.0)
    # Full-size Gaussian noise costs ~0.5 s at 12 MP; a tiled 256 px patch looks the same and is cheap.
    # int16 rather than float keeps a 12 MP picture's peak memory near 200 MB.
    tile = np.rint(rng.standard_normal((min(h, 256), min(w, 256), 3), dtype=np.float32) * sigma).astype(np.int16)
    pixels = np.asarray(image, np.int16) + np.tile(tile, (-(-h // tile.shape[0]), -(-w // tile.shape[1]), 1))[:h, :w]
    return Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))


def example(
    seed: int, index: int, size: int | tuple[int, int] = 128, group: int = 1, vary: str = "shape"
) -> tuple[Image.Image, str, Attributes]:
    """Image ``index`` of the set for ``seed`` in memory: (upright image, caption, attributes), for training.

    Args:
        seed: The set's seed.
        index: The image's position in the set.
        size: As in `render`.
        group: With G > 1, consecutive images come in groups of G (images ``G*k .. G*k+G-1``) that are the same
            one-object scene drawn with the same jitter, except for the attribute ``vary``: G different values
            of it. Their captions come from the same caption stream (as a rule the same template and words; a
            value with one word, "triangle", draws one random number less and may get another template). In a
            training batch such a group gives captions that only that attribute tells apart, the signal that
            random scenes rarely give (two of them share colour, size and position 1 time in 80).
        vary: "shape" or "colour", the attribute the images of a group differ in, or "mixed": even groups vary
            the shape, odd ones the colour. Colour groups stand on a background no object can have (grey,
            brown, pink or cyan).
    """
    if vary not in ("shape", "colour", "mixed"):
        raise ValueError(f"vary must be 'shape', 'colour' or 'mixed', got {vary!r}")
    if not 1 <= group <= len(SHAPES):  # as many shapes as colours
        raise ValueError(f"group must be 1..{len(SHAPES)} (one value per image of a group), got {group}")
    if group == 1:
        sub = scene_seed(seed, index)
        attributes = random_attributes(sub)
        return render(attributes, size, seed=sub), caption(attributes, sub), attributes
    group_index, member = divmod(index, group)
    if vary == "mixed":
        vary = ("shape", "colour")[group_index % 2]
    values = SHAPES if vary == "shape" else COLOURS
    sub = scene_seed(seed, group_index)
    rng = _rng(sub, 0)
    picks = rng.permutation(len(values))[:group]
    backgrounds = BACKGROUNDS if vary == "shape" else tuple(b for b in BACKGROUNDS if b not in COLOURS)
    fixed = {vary: values[int(picks[member])]}
    attributes = random_attributes(rng, two_objects_p=0.0, backgrounds=backgrounds, **fixed)
    return render(attributes, size, seed=sub), caption(attributes, sub), attributes


def _file_size(
    rng: np.random.Generator, image_size: int | tuple[int, int] | None, size_range: tuple[int, int]
) -> tuple[int, int]:
    """The upright (width, height) of one file: fixed, or random sides within the range at a common aspect ratio."""
    if image_size is not None:
        return _size(image_size)
    aw, ah = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
    ratio = min(aw, ah) / max(aw, ah)
    lo, hi = size_range
    long_side = int(rng.integers(min(hi, math.ceil(lo / ratio)), hi + 1))  # so both sides are within the range
    short_side = max(round(long_side * ratio), min(lo, long_side))
    return _size((long_side, short_side) if aw >= ah else (short_side, long_side))


def _exif(rng: np.random.Generator, orientation: int) -> Image.Exif:
    """Camera-like EXIF: Make, Model, Orientation, DateTime and DateTimeOriginal."""
    make, model = _CAMERAS[int(rng.integers(len(_CAMERAS)))]
    stamp = time.gmtime(1_420_070_400 + int(rng.integers(0, 10 * 365 * 86400)))  # 2015..2024
    when = time.strftime("%Y:%m:%d %H:%M:%S", stamp)
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = make
    exif[ExifTags.Base.Model] = model
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.DateTime] = when
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = when
    return exif


def _write(image: Image.Image, path_stem: Path, fmt: str, rng: np.random.Generator, exif: bool) -> tuple[Path, int]:
    """Writes one file; JPEGs with EXIF may be stored rotated with an Orientation tag. Returns (path, orientation)."""
    path = path_stem.with_suffix("." + _EXT[fmt])
    orientation = 1
    data = io.BytesIO()
    if fmt == "jpeg":
        quality = int(rng.integers(70, 96))
        if exif:
            orientation = 1 if rng.random() < 0.5 else int(rng.integers(2, 9))
            stored = image if orientation == 1 else image.transpose(_STORE_FOR_ORIENTATION[orientation])
            stored.save(data, "JPEG", quality=quality, exif=_exif(rng, orientation))
        else:
            image.save(data, "JPEG", quality=quality)
    elif fmt == "png":
        image.save(data, "PNG", compress_level=1)
    else:
        image.save(data, "WEBP", quality=int(rng.integers(78, 93)))
    path.write_bytes(data.getvalue())
    return path, orientation


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Validated, lower-cased formats."""
    out = tuple(f.lower().replace("jpg", "jpeg") for f in formats)
    bad = [f for f in out if f not in FORMATS]
    if not out or bad:
        raise ValueError(f"unknown image format(s) {bad or list(formats)}; use some of {', '.join(FORMATS)}")
    return out


def _emit(
    out_dir: Path,
    jobs: Iterable[tuple[str, int, Attributes]],
    total: int,
    *,
    image_size: int | tuple[int, int] | None,
    size_range: tuple[int, int] | None,
    formats: Sequence[str],
    exif: bool,
    write_manifest: bool,
    progress: bool,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Sample]:
    """Renders and writes (relative stem, sub-seed, attributes) jobs; optionally writes the manifest last."""
    if image_size is not None and size_range is not None:
        raise ValueError("give either image_size (fixed) or size_range (random), not both")
    formats = _check_formats(formats)
    lo_hi = size_range or DEFAULT_SIZE_RANGE
    if not 16 <= lo_hi[0] <= lo_hi[1]:
        raise ValueError(f"size_range {lo_hi} must be (low, high) with 16 <= low <= high, e.g. (96, 512)")
    weights = np.array([_FORMAT_WEIGHT[f] for f in formats])
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, lines = [], []
    for stem, sub, attributes in tqdm(jobs, total=total, disable=not progress, unit="img", desc="shapes"):
        file_rng = _rng(sub, 3)
        fmt = formats[int(file_rng.choice(len(formats), p=weights / weights.sum()))]
        w, h = _file_size(file_rng, image_size, lo_hi)
        (out_dir / stem).parent.mkdir(parents=True, exist_ok=True)
        path, orientation = _write(render(attributes, (w, h), seed=sub), out_dir / stem, fmt, file_rng, exif)
        text, stated = describe(attributes, sub)
        samples.append(Sample(path, text, attributes, stated, sub))
        line = {"image": path.relative_to(out_dir).as_posix(), "caption": text, **attributes.to_dict()}
        line |= {
            "stated": sorted(stated),
            "seed": sub,
            "width": w,
            "height": h,
            "format": fmt,
            "orientation": orientation,
        }
        lines.append(line | dict((extra or {}).get(stem, {})))
    if write_manifest:
        manifest = out_dir / "manifest.jsonl"
        tmp = manifest.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, manifest)  # a reader never sees a half-written manifest
        logger.info("wrote %d images and %s", len(samples), manifest)
    return samples


def generate(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    *,
    image_size: int | tuple[int, int] | None = None,
    size_range: tuple[int, int] | None = None,
    formats: Sequence[str] = FORMATS,
    exif: bool = True,
    write_manifest: bool = True,
    progress: bool = False,
) -> list[Sample]:
    """Writes ``n`` captioned images ``000000.jpg``, ``000001.webp``, ... into ``out_dir``.

    Args:
        out_dir: Output folder (created). Re-running overwrites the same files with the same bytes.
        n: Number of images.
        seed: Seed of the set; image ``i`` depends only on (seed, i).
        image_size: Fixed size for every image: an int (square, e.g. 128 for training) or (width, height)
            (e.g. (4000, 3000) for photo-sized files).
        size_range: Random sizes with both sides in [low, high] at a common aspect ratio (1:1 to 16:9, either
            way up); default (96, 512) when neither this nor ``image_size`` is given.
        formats: Formats to draw from ("jpeg", "png", "webp"); JPEG is three times as likely as each other one.
        exif: Give JPEGs camera EXIF (Make, Model, DateTimeOriginal) and, for about half of them, an
            Orientation other than 1 with the pixels stored so that applying it gives the upright scene.
        write_manifest: Also write ``manifest.jsonl`` (paths relative to ``out_dir``).
        progress: Show a tqdm progress bar on stderr.

    Returns:
        One Sample per image, in order.

    Raises:
        ValueError: On a bad size, range or format.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = Path(out_dir)

    def jobs() -> Iterable[tuple[str, int, Attributes]]:
        for i in range(n):
            sub = scene_seed(seed, i)
            yield f"{i:06d}", sub, random_attributes(sub)

    return _emit(
        out, jobs(), n, image_size=image_size, size_range=size_range, formats=formats, exif=exif,
        write_manifest=write_manifest, progress=progress,
    )  # fmt: skip


def class_folders(
    out_dir: str | os.PathLike[str],
    by: str,
    n_per_class: int,
    seed: int,
    *,
    image_size: int | tuple[int, int] | None = None,
    size_range: tuple[int, int] | None = None,
    formats: Sequence[str] = FORMATS,
    exif: bool = True,
    progress: bool = False,
) -> dict[str, list[Sample]]:
    """Writes a labelled set for zero-shot benchmarks: one sub-folder per class (``red/``, ``green/``, ...).

    Every image shows one object of its class; the other attributes are random. For colour classes the
    background is never white or black, so that the only named object-palette colour in a picture is the
    label's. A ``manifest.jsonl`` with an extra ``label`` key is written in ``out_dir``.

    Args:
        out_dir: Output folder (created).
        by: "colour" (also "color") for the 8 COLOURS, or "shape" for the 8 SHAPES.
        n_per_class: Images per class.
        seed: Seed of the set.
        image_size: As in `generate`.
        size_range: As in `generate`.
        formats: As in `generate`.
        exif: As in `generate`.
        progress: Show a tqdm progress bar on stderr.

    Returns:
        Class name -> its samples.
    """
    key = {"colour": "colour", "color": "colour", "shape": "shape"}.get(by)
    if key is None:
        raise ValueError(f"class_folders by={by!r} is not supported; use 'colour' or 'shape'")
    classes = COLOURS if key == "colour" else SHAPES
    backgrounds = tuple(b for b in BACKGROUNDS if key != "colour" or b not in COLOURS)

    def jobs() -> Iterable[tuple[str, int, Attributes]]:
        for c, label in enumerate(classes):
            for i in range(n_per_class):
                sub = scene_seed(seed, (c + 1) * 1_000_000_000 + i)  # disjoint from generate()'s indices
                attrs = random_attributes(_rng(sub, 0), two_objects_p=0.0, backgrounds=backgrounds, **{key: label})
                yield f"{label}/{i:05d}", sub, attrs

    labels = {f"{label}/{i:05d}": {"label": label} for label in classes for i in range(n_per_class)}
    samples = _emit(
        Path(out_dir), jobs(), len(classes) * n_per_class, image_size=image_size, size_range=size_range,
        formats=formats, exif=exif, write_manifest=True, progress=progress, extra=labels,
    )  # fmt: skip
    return {label: samples[c * n_per_class : (c + 1) * n_per_class] for c, label in enumerate(classes)}


def read_manifest(path: str | os.PathLike[str]) -> list[Sample]:
    """Reads a ``manifest.jsonl`` back into Samples (relative image paths resolve against its folder).

    Raises:
        ValueError: A line is not JSON or lacks a key, naming the file and line.
    """
    manifest = Path(path)
    samples = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            samples.append(
                Sample(
                    manifest.parent / d["image"],
                    d["caption"],
                    Attributes.from_dict(d),
                    frozenset(d["stated"]),
                    d["seed"],
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest}:{number}: not a shapes manifest line ({e}); regenerate it") from e
    return samples


def _meaning(attributes: Attributes, stated: frozenset[str]) -> tuple[Any, ...]:
    """What a caption stating ``stated`` says about a scene: background facts plus the unordered objects."""
    fields = [f for f in ("shape", "colour", "size", "position") if f in stated]
    objs = sorted(tuple(getattr(o, f) for f in fields) for o in attributes.objects)
    scene = tuple(getattr(attributes, f) for f in ("background", "background_kind") if f in stated)
    return scene, tuple(objs)


def match_counts(samples: Sequence[Sample]) -> np.ndarray:
    """For each sample, how many gallery samples (itself included) fit everything its caption states.

    A caption describes a fixed number of objects (one, or two in either order); it constrains only the
    attributes it states.
    """
    counts = np.zeros(len(samples), np.int64)
    for stated in {s.stated for s in samples}:
        keys = [_meaning(s.attributes, stated) for s in samples]
        tally = Counter(keys)
        for i, s in enumerate(samples):
            if s.stated == stated:
                counts[i] = tally[keys[i]]
    return counts


def oracle_recall(samples: Sequence[Sample], ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Text->image recall@k of a perfect model that ranks tied images at random, with each caption as query.

    A caption fitting ``m`` gallery images puts its own image in the top ``k`` with probability
    ``min(1, k / m)``; recall@1 is the mean of ``1 / m``.
    """
    counts = match_counts(samples).astype(np.float64)
    return {k: float(np.minimum(1.0, k / counts).mean()) if len(counts) else 0.0 for k in ks}


def _parse_size(text: str) -> int | tuple[int, int]:
    """'128' -> 128, '640x480' -> (640, 480)."""
    try:
        if "x" in text.lower():
            w, h = text.lower().split("x")
            return int(w), int(h)
        return int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; write e.g. 128 or 4000x3000") from e


def _parse_range(text: str) -> tuple[int, int]:
    """'96-512' -> (96, 512)."""
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad size range {text!r}; write e.g. 96-512") from e
    return lo, hi


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``python -m retrieval.shapes --out DIR --n N --seed S``."""
    parser = argparse.ArgumentParser(
        prog="python -m retrieval.shapes",
        description="Write deterministic captioned synthetic images (and manifest.jsonl) for training and tests.",
        epilog="examples:\n"
        "  python -m retrieval.shapes --out data/train --n 20000 --seed 1 --size 96\n"
        "  python -m retrieval.shapes --out data/gallery --n 500 --seed 7 --oracle\n"
        "  python -m retrieval.shapes --out data/photos --n 200 --seed 3 --photo-size 4000x3000 --formats jpeg\n"
        "  python -m retrieval.shapes --out data/colours --n 50 --seed 5 --class-folders colour",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--n", type=int, default=100, help="number of images (per class with --class-folders)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the set (default 0)")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--size", type=_parse_size, help="fixed size: 128 (square) or WxH")
    sizes.add_argument("--size-range", type=_parse_range, help="both sides random in LOW-HIGH, e.g. 96-512 (default)")
    sizes.add_argument("--photo-size", type=_parse_size, help="photo-sized files, e.g. 4000x3000 (at most 12 MP)")
    parser.add_argument("--formats", default="jpeg,png,webp", help="comma-separated: jpeg,png,webp")
    parser.add_argument("--no-exif", action="store_true", help="write JPEGs without EXIF (and never rotated)")
    parser.add_argument("--class-folders", choices=("colour", "color", "shape"), help="one sub-folder per class")
    parser.add_argument("--oracle", action="store_true", help="print the oracle text->image recall@1/5/10")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("--n must be >= 0")
    size = args.size or args.photo_size
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        if args.class_folders:
            by_class = class_folders(
                args.out, args.class_folders, args.n, args.seed, image_size=size, size_range=args.size_range,
                formats=formats, exif=not args.no_exif, progress=True,
            )  # fmt: skip
            samples = [s for group in by_class.values() for s in group]
        else:
            samples = generate(
                args.out, args.n, args.seed, image_size=size, size_range=args.size_range, formats=formats,
                exif=not args.no_exif, progress=True,
            )  # fmt: skip
    except ValueError as e:
        parser.error(str(e))
    seconds = time.perf_counter() - start
    print(f"wrote {len(samples)} images to {args.out} in {seconds:.1f} s (manifest: {args.out / 'manifest.jsonl'})")
    if args.oracle:
        recall = {f"oracle_r@{k}": round(v, 4) for k, v in oracle_recall(samples).items()}
        print(json.dumps({"images": len(samples), "seed": args.seed} | recall))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
