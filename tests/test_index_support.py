"""Shared helpers of the indexer tests: a tiny random CLIP, real image files, decoders with injected faults.

The fault-injecting decoders live in a module (not inside a test function) because decoder worker
processes unpickle them by reference.
"""

from __future__ import annotations

import io
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from indexer.decode import Decoder, DecodeTask, Failed
from retrieval.model.checkpoint import save_checkpoint
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS
from retrieval.model.identity import ModelInfo
from retrieval.model.preprocess import Preprocess


def tiny_model(seed: int = 0, name: str = "tiny-test") -> tuple[CLIP, Preprocess]:
    """The `tiny-vit` architecture (32 px, 64-d) with seeded random weights and `.info` set."""
    torch.manual_seed(seed)
    model = CLIP(PRESETS["tiny-vit"]).eval()
    model.info = ModelInfo.for_model(model, name)
    return model, Preprocess.from_config(model.config)


def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny model saved in clipsearch's checkpoint format, for `--model PATH`."""
    model, _ = tiny_model(seed)
    return save_checkpoint(model, folder, name="tiny-test")


def pattern(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A distinct RGB image per seed: smooth colour blocks, so JPEG keeps them distinct."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def write_images(folder: Path, n: int, start: int = 0, ext: str = ".jpg") -> list[Path]:
    """`n` distinct images `img<i><ext>` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:04d}{ext}"
        pattern(i).save(path)
        paths.append(path)
    return paths


def damaged(image: Image.Image, fmt: str, refused=None, **save_args) -> bytes:
    """The image saved as `fmt` with 16 bits flipped past its first 64 bytes: the first such damage (by seed) that
    Pillow refuses when it opens and fully loads the file, with an error `refused(error)` accepts (default: any but
    "cannot identify", which means the header itself is gone)."""
    refused = refused or (lambda e: not isinstance(e, UnidentifiedImageError))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    data = buffer.getvalue()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        flipped = bytearray(data)
        for offset, bit in zip(rng.integers(64, len(data), 16), rng.integers(0, 8, 16), strict=True):
            flipped[offset] ^= 1 << int(bit)
        try:
            Image.open(io.BytesIO(flipped)).load()
        except Exception as e:
            if refused(e):
                return bytes(flipped)
    raise AssertionError(f"no damaged {fmt} found that Pillow refuses as asked")


def vectors_by_path(store) -> dict[str, np.ndarray]:
    """Every stored vector keyed by its file's path."""
    ids, vectors = store.all_vectors()
    paths = [r["path"] for r in store.rows(ids, columns=["path"])]
    return dict(zip(paths, vectors, strict=True))


@dataclass(frozen=True)
class FaultyDecoder(Decoder):
    """A decoder that misbehaves on chosen file names: "poison" kills its process as a codec segfault would,
    "hang" never returns, "vanish" deletes the file just before reading it."""

    def __call__(self, task: DecodeTask):
        name = os.path.basename(task.path)
        if "poison" in name:
            os.kill(os.getpid(), signal.SIGSEGV)
        if "hang" in name:
            time.sleep(3600)
        if "vanish" in name:
            os.unlink(task.path)
        return super().__call__(task)


@dataclass(frozen=True)
class NicenessDecoder(Decoder):
    """A decoder that only reports the niceness of the process it runs in (as a `Failed` reason)."""

    def __call__(self, task: DecodeTask):
        return Failed("worker", f"niceness {os.nice(0)}")
