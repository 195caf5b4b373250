"""Query images the caller does not hold as files: a stored image named by its id, and a region of an image.

A region is a box in relative coordinates (x0, y0, x1, y1 in [0, 1], origin top left, of the upright image,
i.e. after EXIF orientation), so it means the same part of a picture at any resolution: of the original
file, of a thumbnail, or of a downscaled upload. Only the crop is embedded.

    lib.search(StoredImage(123))                                  # more like stored image 123
    lib.search(StoredImage(123, Box(0.0, 0.0, 0.5, 1.0)))         # like its left half
    lib.search([(2, "a dog"), (1, Region(pil_image, Box.parse("0.1,0.1,0.6,0.9")))])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from retrieval.errors import QueryError

if TYPE_CHECKING:
    from PIL import Image


class Box(NamedTuple):
    """A region of an image, as fractions of its width and height."""

    x0: float  # left edge, 0 = the image's left
    y0: float  # top edge, 0 = the image's top
    x1: float  # right edge, > x0
    y1: float  # bottom edge, > y0

    @classmethod
    def parse(cls, value: str | Sequence[Any]) -> Box:
        """A validated box from `"x0,y0,x1,y1"` or a sequence of four numbers.

        Raises:
            QueryError: not four finite numbers in [0, 1] with x0 < x1 and y0 < y1.
        """
        parts = value.split(",") if isinstance(value, str) else value
        example = 'e.g. "0.1,0.2,0.6,0.9" for x0,y0,x1,y1 as fractions of the width and height'
        if isinstance(parts, str | bytes) or not isinstance(parts, Sequence) or len(parts) != 4:
            raise QueryError(f"a box is four numbers x0,y0,x1,y1, got {value!r}; {example}")
        try:
            numbers = [float(p) if not isinstance(p, bool) else math.nan for p in parts]
        except (TypeError, ValueError) as e:
            raise QueryError(f"a box is four numbers x0,y0,x1,y1, got {value!r}; {example}") from e
        if not all(math.isfinite(n) and 0.0 <= n <= 1.0 for n in numbers):
            raise QueryError(f"box {value!r}: every coordinate must be between 0 and 1; {example}")
        box = cls(*numbers)
        if not (box.x0 < box.x1 and box.y0 < box.y1):
            raise QueryError(f"box {value!r}: x0 must be less than x1 and y0 less than y1; {example}")
        return box


def crop(image: Image.Image, box: Box) -> Image.Image:
    """The part of an (upright) image inside `box`, widened outwards to whole pixels, at least 1 x 1."""
    width, height = image.size
    left, top = math.floor(box.x0 * width), math.floor(box.y0 * height)
    right = max(math.ceil(box.x1 * width), left + 1)
    bottom = max(math.ceil(box.y1 * height), top + 1)
    return image.crop((left, top, min(right, width), min(bottom, height)))


@dataclass(frozen=True)
class StoredImage:
    """An image of the store, by its row id; with a box, only that region of its file is embedded (without
    one, its stored vector is used as it is)."""

    id: int
    box: Box | None = None


@dataclass(frozen=True)
class Region:
    """A region of an image the caller holds: a PIL image or a path."""

    image: Any
    box: Box


def view_boxes(n: int) -> list[Box]:
    """The boxes of `n` views: a g x g grid with 50 % overlap (g*g = n - 1), then a centre crop of the same size.

    Raises:
        QueryError: `n` is not 0 or g*g + 1 for some g >= 2.
    """
    if n == 0:
        return []
    grid = round((n - 1) ** 0.5)
    if grid < 2 or grid * grid + 1 != n:
        raise QueryError(f"--views {n}: give 0 (off), 5 (2x2 grid + centre), 10 (3x3 + centre) or g*g+1 for g >= 2")
    side = 2.0 / (grid + 1)  # g crops overlapping by half their side span the image
    step = side / 2
    boxes = [Box(x * step, y * step, x * step + side, y * step + side) for y in range(grid) for x in range(grid)]
    start = (1.0 - side) / 2
    return [*boxes, Box(start, start, start + side, start + side)]


def views_min_size(n: int, image_size: int) -> int:
    """The shorter side a JPEG must keep when drafted so each view still has `image_size` pixels across."""
    if n == 0:
        return image_size
    side = view_boxes(n)[0].x1
    return math.ceil(image_size / side)
