"""How close the fast JPEG path (Pillow draft() decoding at no less than the model's resolution) stays to the exact one.

For photo-sized JPEGs (12 MP, landscape and portrait) it embeds every image twice, once decoded at full size
and once drafted, and reports the cosine between the two embeddings (min and median over the images) for
each model, plus the decode+transform time of both paths. Two sets of photos: scenes from the shapes
generator (camera EXIF, some rotated; drawn at <= 1280 px and upscaled, so smooth) and "texture" photos
with detail down to single pixels (multi-scale noise at full resolution under shapes, plus grain), the
harder case for a reduced-scale decode. The requirement is a
minimum cosine >= 0.995. As a yardstick for how sensitive a model is, it also reports the median cosine
between embeddings of *different* images: for random weights it is high, so the shapes-mini figure (a
trained model) is the more telling one when it is installed.

    python benchmarks/draft_fidelity.py              # 8 images, ViT-B/32 (random weights) + shapes-mini
    python benchmarks/draft_fidelity.py --n 4 --models ViT-B/32

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval import shapes
from retrieval.errors import CheckpointError
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS
from retrieval.model.encode import encode_images
from retrieval.model.loading import load_model
from retrieval.model.preprocess import Preprocess, open_image

# Knobs.
N_IMAGES = 8  # half 4000x3000, half 3000x4000
PHOTO_SIZES = ((4000, 3000), (3000, 4000))
SEED = 11
CONTENTS = ("shapes", "texture")
MODELS = ("ViT-B/32", "shapes-mini")  # ViT-B/32 is built with random weights (no download needed)
REQUIRED_COSINE = 0.995


def make_photos(out_dir: Path, content: str, n: int, seed: int) -> list[Path]:
    """n photo-sized JPEGs, alternating landscape and portrait."""
    paths: list[Path] = []
    for i, size in enumerate(PHOTO_SIZES):
        count = n // len(PHOTO_SIZES) + (i < n % len(PHOTO_SIZES))
        folder = out_dir / f"{content}-{size[0]}x{size[1]}"
        if content == "shapes":
            samples = shapes.generate(folder, count, seed + i, image_size=size, formats=("jpeg",))
            paths += [Path(s.path) for s in samples]
            continue
        folder.mkdir(parents=True)
        for j in range(count):
            path = folder / f"{j:03d}.jpg"
            texture_photo(size, np.random.default_rng([seed, i, j])).save(path, quality=90)
            paths.append(path)
    return paths


def texture_photo(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Detail at every scale: octaves of colour noise (the finest at full resolution), a shapes scene, grain."""
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    for octave, weight in ((1, 18.0), (4, 28.0), (16, 40.0), (64, 60.0)):
        small = rng.normal(0.0, 1.0, size=(max(2, height // octave), max(2, width // octave), 3)).astype(np.float32)
        channels = [Image.fromarray(small[..., c], "F").resize(size, Image.Resampling.BICUBIC) for c in range(3)]
        canvas += weight * np.stack([np.asarray(c) for c in channels], axis=-1)
    scene = np.asarray(shapes.render(int(rng.integers(1 << 30)), size), dtype=np.float32)
    pixels = 0.6 * scene + 0.4 * (128.0 + canvas) + rng.normal(0.0, 6.0, size=canvas.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def timed_pixels(preprocess: Preprocess, paths: list[Path]) -> tuple[torch.Tensor, list[float]]:
    """Decode + transform every image; the stacked pixels and the seconds each took."""
    tensors, seconds = [], []
    for path in paths:
        start = time.perf_counter()
        tensors.append(preprocess(open_image(path)))
        seconds.append(time.perf_counter() - start)
    return torch.stack(tensors), seconds


def get_model(name: str) -> CLIP | None:
    """ViT-B/32 with random weights; other names through load_model (None when not installed)."""
    if name == "ViT-B/32":
        torch.manual_seed(0)
        return CLIP(PRESETS["ViT-B/32"]).eval()
    try:
        return load_model(name, towers="image")[0]
    except CheckpointError as e:
        print(f"{name}: skipped ({e})")
        return None


def measure(name: str, model: CLIP, content: str, paths: list[Path]) -> dict:
    """Cosines between the fast and the exact path, and both paths' decode times."""
    size = model.config.vision.image_size
    exact = Preprocess(size, fast=False)
    fast = Preprocess(size, fast=True)
    timed_pixels(fast, paths[:1])  # warm-up: Pillow's decoder, the allocator
    exact_pixels, exact_seconds = timed_pixels(exact, paths)
    fast_pixels, fast_seconds = timed_pixels(fast, paths)
    exact_vectors = encode_images(model, exact_pixels)
    fast_vectors = encode_images(model, fast_pixels)
    cosines = np.sum(exact_vectors * fast_vectors, axis=1)
    between = exact_vectors @ exact_vectors.T
    others = between[~np.eye(len(paths), dtype=bool)]
    drafted = fast.decode(open_image(paths[0]))
    return {
        "model": name,
        "content": content,
        "image_size": size,
        "images": len(paths),
        "cosine_min": float(cosines.min()),
        "cosine_median": float(np.median(cosines)),
        "cosine_between_different_images_median": float(np.median(others)) if others.size else None,
        "drafted_size": list(drafted.size),
        "exact_decode_ms_median": 1000 * statistics.median(exact_seconds),
        "fast_decode_ms_median": 1000 * statistics.median(fast_seconds),
        "decode_speedup": statistics.median(exact_seconds) / statistics.median(fast_seconds),
        "passes": bool(cosines.min() >= REQUIRED_COSINE),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=N_IMAGES, help="number of photos")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--contents", nargs="+", choices=CONTENTS, default=list(CONTENTS))
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        photos = {}
        for content in args.contents:
            start = time.perf_counter()
            photos[content] = make_photos(Path(tmp), content, args.n, args.seed)
            print(f"generated {args.n} {content} JPEGs of 12 MP in {time.perf_counter() - start:.1f} s")
        results = []
        for name in args.models:
            model = get_model(name)
            if model is not None:
                results += [measure(name, model, content, paths) for content, paths in photos.items()]

    print(
        f"{'model':<12} {'content':<8} {'S':>4} {'drafted':>10} {'cos min':>8} {'cos med':>8} {'diff imgs':>9} "
        f"{'exact ms':>9} {'fast ms':>8} {'speedup':>7}"
    )
    for r in results:
        drafted = "x".join(map(str, r["drafted_size"]))
        print(
            f"{r['model']:<12} {r['content']:<8} {r['image_size']:>4} {drafted:>10} "
            f"{r['cosine_min']:>8.5f} {r['cosine_median']:>8.5f} "
            f"{r['cosine_between_different_images_median']:>9.4f} {r['exact_decode_ms_median']:>9.1f} "
            f"{r['fast_decode_ms_median']:>8.1f} {r['decode_speedup']:>6.1f}x"
        )
    passed = all(r["passes"] for r in results)
    print(f"requirement: min cosine >= {REQUIRED_COSINE}: {'met' if passed else 'NOT met'}")
    print(json.dumps({"benchmark": "draft_fidelity", "required_cosine": REQUIRED_COSINE, "results": results}))


if __name__ == "__main__":
    main()
