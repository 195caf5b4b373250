"""Small things in big photos: text->image recall with and without sub-views (`clipsearch index --views N`).

Each scene is a large photo-sized JPEG (2000x1500 by default) of clutter (blocks of noise, gradients and
stripes in random greys, no shapes) with one small shapes-mini object pasted somewhere inside the area
the views cover, taking `OBJECT_SIDE`**2 / (W*H) of the picture (3 % by default). Every scene's object has
its own colour and shape, and its caption ("a red star") is the query. The same folder is indexed twice by
the real indexer into two stores, `--views 0` and `--views N`, and each caption is searched with
`Library.search` (the path `clipsearch query` takes); R@k is the share of captions whose scene is among the
top k.

Also reported: the index time of each run and their ratio, and how many times the JPEG decoder ran per photo
(counted inside the decoder in this process: the run uses `workers=0`), which must be 1 with views too: the
views are cut from the one decoded (drafted) image.

    python -m benchmarks.small_objects [--scenes 48] [--views 10] [--size 2000x1500] [--json]

The last line is one JSON object: {"benchmark": "small_objects", "r1_without": ..., "r5_with": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from retrieval.shapes import COLOURS, SHAPES, Attributes, render

SCENES = 48  # photos (each with its own colour and shape; at most 64)
SIZE = (2000, 1500)  # photo size
OBJECT_SIDE = 300  # the pasted object's square, in pixels (3 % of a 2000x1500 photo)
VIEWS = 10  # 3x3 grid + centre
MODEL = "shapes-mini"
SEED = 15


def clutter(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A canvas of 6x4 blocks, each flat, a gradient, stripes or noise in random greys: busy, but no coloured
    shapes (a block in a caption's colour would be a "red square" to the model)."""
    width, height = size
    canvas = np.zeros((height, width, 3), np.float32)
    rows, cols = 4, 6
    for r, c in product(range(rows), range(cols)):
        y0, y1 = r * height // rows, (r + 1) * height // rows
        x0, x1 = c * width // cols, (c + 1) * width // cols
        a, b = rng.uniform(40, 215) + rng.normal(0, 8, 3), rng.uniform(40, 215) + rng.normal(0, 8, 3)  # greyish
        kind = rng.integers(4)
        h, w = y1 - y0, x1 - x0
        if kind == 0:
            block = np.broadcast_to(a, (h, w, 3))
        elif kind == 1:
            t = np.linspace(0, 1, w)[None, :, None]
            block = a * (1 - t) + b * t + np.zeros((h, 1, 1))
        elif kind == 2:
            stripes = ((np.arange(h)[:, None] // rng.integers(8, 40)) % 2).astype(np.float32)[..., None]
            block = a * stripes + b * (1 - stripes) + np.zeros((1, w, 1))
        else:
            block = a + rng.normal(0, 40, (h, w, 3))
        canvas[y0:y1, x0:x1] = block
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def make_scenes(folder: Path, n: int, size: tuple[int, int], seed: int, views: int) -> list[tuple[Path, str]]:
    """`n` photos with one small object each; returns (path, caption) pairs."""
    from retrieval.regions import view_boxes

    rng = np.random.default_rng(seed)
    pairs = list(product(COLOURS, SHAPES))
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[:n]]
    # inside what the whole-image embedding sees (the centred square) and what the views see (the centred square
    # of each grid crop), so the object is whole in both runs
    width, height = size
    share = (view_boxes(views) or view_boxes(5))[0].x1
    short = min(width, height)
    margin_x = max((width - short) / 2, (share * width - share * short) / 2)
    margin_y = max((height - short) / 2, (share * height - share * short) / 2)
    out = []
    for i, (colour, shape) in enumerate(chosen):
        canvas = clutter(rng, size)
        background = "grey" if colour not in ("white", "black") else ("cyan" if colour == "black" else "brown")
        obj = render(Attributes(shape, colour, "large", "centre", background, "flat"), OBJECT_SIDE, seed=i)
        x = int(rng.uniform(margin_x, width - margin_x - OBJECT_SIDE))
        y = int(rng.uniform(margin_y, height - margin_y - OBJECT_SIDE))
        canvas.paste(obj, (x, y))
        path = folder / f"scene{i:03d}.jpg"
        canvas.save(path, quality=90)
        out.append((path, f"a {colour} {shape}"))
    return out


class DecodeCounter:
    """Counts image decodes in this process: calls of `ImageFile.load` that still have data to decode."""

    def __init__(self) -> None:
        self.count = 0
        self._load = ImageFile.ImageFile.load

    def __enter__(self) -> DecodeCounter:
        counter, load = self, self._load

        def counting_load(image: ImageFile.ImageFile) -> Any:
            if image.tile:  # emptied once the pixels are decoded
                counter.count += 1
            return load(image)

        ImageFile.ImageFile.load = counting_load
        return self

    def __exit__(self, *exc: object) -> None:
        ImageFile.ImageFile.load = self._load


def recall(library: Any, scenes: list[tuple[Path, str]], ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Text->image R@k: share of captions whose own scene is among the top k results."""
    hits = dict.fromkeys(ks, 0)
    for path, text in scenes:
        found = [r.path for r in library.search(text, k=max(ks))]
        for k in ks:
            hits[k] += str(path) in found[:k]
    return {k: hits[k] / len(scenes) for k in ks}


def run(scenes_n: int, views: int, size: tuple[int, int], seed: int, model: str) -> dict[str, Any]:
    """Generate the scenes, index them twice, measure."""
    from clipsearch.library import Library

    with tempfile.TemporaryDirectory(prefix="small-objects-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        scenes = make_scenes(folder, scenes_n, size, seed, views)
        result: dict[str, Any] = {"scenes": scenes_n, "size": f"{size[0]}x{size[1]}", "views": views}
        result["object_area"] = round(OBJECT_SIDE**2 / (size[0] * size[1]), 4)
        for label, n in (("without", 0), ("with", views)):
            library = Library(db=Path(tmp) / f"db{n}", model=model, text_precision="float32")
            with DecodeCounter() as decodes:
                summary = library.index([folder], workers=0, progress=False, views=n)
            result[f"index_seconds_{label}"] = round(summary.seconds, 3)  # the run itself, not the model's loading
            result[f"decodes_per_photo_{label}"] = decodes.count / summary.indexed
            r = recall(library, scenes)
            result[f"r1_{label}"], result[f"r5_{label}"] = r[1], r[5]
        result["index_cost_ratio"] = round(result["index_seconds_with"] / result["index_seconds_without"], 2)
        result["r5_gain"] = round(result["r5_with"] / max(result["r5_without"], 1e-9), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=SCENES, help=f"photos (default {SCENES}, at most 64)")
    parser.add_argument("--views", type=int, default=VIEWS, help=f"sub-views of the second run (default {VIEWS})")
    parser.add_argument("--size", default=f"{SIZE[0]}x{SIZE[1]}", help="photo size WxH (default %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="scene seed (default %(default)s)")
    parser.add_argument("--model", default=MODEL, help="model (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    result = run(min(args.scenes, 64), args.views, (width, height), args.seed, args.model)
    if not args.json:
        print(
            f"{result['scenes']} scenes {result['size']}, object {result['object_area']:.1%} of the area\n"
            f"  --views 0:  R@1 {result['r1_without']:.3f}  R@5 {result['r5_without']:.3f}  "
            f"index {result['index_seconds_without']:.1f} s  decodes/photo {result['decodes_per_photo_without']:g}\n"
            f"  --views {result['views']}:  R@1 {result['r1_with']:.3f}  R@5 {result['r5_with']:.3f}  "
            f"index {result['index_seconds_with']:.1f} s  decodes/photo {result['decodes_per_photo_with']:g}\n"
            f"  R@5 gain {result['r5_gain']}x, index time ratio {result['index_cost_ratio']}x",
            file=sys.stderr,
        )
    print(json.dumps({"benchmark": "small_objects", **result}))


if __name__ == "__main__":
    main()
