"""Write tests/data/preprocess_golden.npz: CLIP's transform as torchvision computes it, on small test images.

openai/CLIP preprocesses with torchvision's Compose([Resize(S, BICUBIC), CenterCrop(S), convert RGB,
ToTensor, Normalize(mean, std)]). torchvision is not a clipsearch dependency, so this script runs once in a
scratch venv and stores both the input pixels and torchvision's output; tests/test_preprocess.py checks
our `Preprocess` against them. How the file in the repository was made:

    python3 -m venv /tmp/tvvenv
    /tmp/tvvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow numpy
    /tmp/tvvenv/bin/python benchmarks/make_preprocess_golden.py

Output arrays, for each case name `c` listed in `cases`: `c/input` (uint8 [H, W, 3] or [H, W] for
greyscale), `c/size` (S), `c/expected` (float32 [3, S, S]); plus `versions` (torch, torchvision, Pillow).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision import transforms

# Knobs.
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "preprocess_golden.npz"
SEED = 7
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# (name, width, height, target size S, greyscale): odd sizes, both orientations, up- and downscaling,
# a square already at S, extreme aspect ratios.
CASES = (
    ("landscape_odd", 53, 37, 32, False),
    ("portrait_odd", 37, 53, 32, False),
    ("square_exact", 32, 32, 32, False),
    ("square_down", 47, 47, 32, False),
    ("upscale", 21, 17, 32, False),
    ("wide", 120, 23, 32, False),
    ("tall", 23, 120, 32, False),
    ("crop_half_pixel", 65, 40, 32, False),
    ("grey", 45, 38, 32, True),
    ("clip_224", 257, 193, 224, False),
)


def smooth_image(rng: np.random.Generator, width: int, height: int, grey: bool) -> np.ndarray:
    """Photo-like content: smooth colour fields plus fine noise, so both interpolation and edges matter."""
    channels = 1 if grey else 3
    coarse = rng.integers(0, 256, size=(max(2, height // 6), max(2, width // 6), channels), dtype=np.uint8)
    base = np.stack(
        [
            np.asarray(Image.fromarray(coarse[..., c]).resize((width, height), Image.Resampling.BILINEAR))
            for c in range(channels)
        ],
        axis=-1,
    ).astype(np.int16)
    noise = rng.integers(-20, 21, size=base.shape, dtype=np.int16)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    return pixels[..., 0] if grey else pixels


def reference_transform(size: int) -> transforms.Compose:
    """openai/CLIP's `_transform(n_px)`."""
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    for name, width, height, size, grey in CASES:
        pixels = smooth_image(rng, width, height, grey)
        expected = reference_transform(size)(Image.fromarray(pixels, "L" if grey else "RGB"))
        arrays[f"{name}/input"] = pixels
        arrays[f"{name}/size"] = np.array(size)
        arrays[f"{name}/expected"] = expected.numpy().astype(np.float32)
    arrays["cases"] = np.array([name for name, *_ in CASES])
    arrays["versions"] = np.array([torch.__version__, torchvision.__version__, PIL.__version__])
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {len(CASES)} cases to {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
