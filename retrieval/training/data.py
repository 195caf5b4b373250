"""Captioned image sets for training: read from a manifest or a folder, or rendered by `retrieval.shapes`.

Every set is decoded once into memory as the exact pixels CLIP's preprocessing produces (stored as uint8,
normalised per batch), plus its token ids, so an epoch costs no decoding and batches are cheap to draw.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from retrieval.errors import ImageLoadError, TrainingError
from retrieval.model.preprocess import Preprocess
from retrieval.model.tokenizer import tokenize
from retrieval.shapes import SHAPES

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SHAPES_PATTERN = re.compile(r"^shapes:(\d+)(?::(\d+))?(?::(shape|colour|mixed)-groups=(\d+))?$")
# Generated scenes are drawn at this side and then preprocessed like files, so the model sees resampled
# pixels as it will at search time; 96 px is the smallest side `retrieval.shapes.generate` writes by default.
SHAPES_RENDER_SIZE = 96
# Share of generated training scenes passed through a JPEG round trip, as most files of a generated gallery are.
_SHAPES_JPEG_P = 0.6


class CaptionedImage(NamedTuple):
    """One training pair as listed by a manifest or a caption folder."""

    image: Path  # the image file
    caption: str  # its caption


@dataclass(frozen=True)
class ShapesSource:
    """Scenes rendered in memory by `retrieval.shapes` (no files): images 0..n-1 of the set `seed`."""

    n: int  # number of scenes
    seed: int  # the set's seed; image i is `retrieval.shapes.example(seed, i, group=group, vary=vary)`
    group: int = 1  # > 1: groups of this many scenes that differ only in `vary`, kept together in batches
    vary: str = "shape"  # what the scenes of a group differ in: "shape", "colour" or "mixed" (alternately)

    def __str__(self) -> str:
        group = f":{self.vary}-groups={self.group}" if self.group > 1 else ""
        return f"shapes:{self.n}:{self.seed}{group}"


def parse_source(text: str | Path) -> Path | ShapesSource:
    """Read a data argument: a manifest (.jsonl/.csv), a folder of images with .txt captions, or generated scenes.

    Generated scenes are `shapes:N[:SEED]`, or `shapes:N:SEED:shape-groups=G` (`colour-groups=G`) for groups of G
    scenes that differ only in the object's shape (colour), or `mixed-groups=G` for both kinds of group in turn;
    see `retrieval.shapes.example`. Training keeps each group in one batch.

    Raises:
        TrainingError: the path does not exist, or the group size is out of range.
    """
    match = SHAPES_PATTERN.match(str(text))
    if match:
        vary, group = match.group(3) or "shape", int(match.group(4) or 1)
        if not 1 <= group <= len(SHAPES):  # as many shapes as colours
            raise TrainingError(f"{text}: {vary}-groups must be 1..{len(SHAPES)} (one value per scene of a group)")
        return ShapesSource(n=int(match.group(1)), seed=int(match.group(2) or 0), group=group, vary=vary)
    path = Path(text)
    if not path.exists():
        raise TrainingError(
            f"{path}: no such manifest or folder; give a .jsonl/.csv manifest, a folder of images with .txt "
            "captions beside them, or shapes:N[:SEED] to generate N scenes in memory"
        )
    return path


def read_pairs(path: str | Path) -> list[CaptionedImage]:
    """List the (image, caption) pairs of a manifest or a caption folder.

    Args:
        path: a JSONL manifest (one `{"image": ..., "caption": ...}` per line), a CSV manifest with `image`
            and `caption` columns (image paths relative to the manifest's folder), or a folder in which each
            image has a caption file of the same name with `.txt` (images without one are skipped).

    Raises:
        TrainingError: the manifest is malformed (naming file and line) or lists nothing.
    """
    path = Path(path)
    if path.is_dir():
        pairs = _read_caption_folder(path)
    elif path.suffix.lower() == ".csv":
        pairs = _read_csv(path)
    else:
        pairs = _read_jsonl(path)
    if not pairs:
        raise TrainingError(f"{path}: no captioned images found; see `clipsearch train --help` for the input forms")
    return pairs


def _read_jsonl(path: Path) -> list[CaptionedImage]:
    """Pairs of a JSONL manifest."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pairs.append(_pair(path.parent, record["image"], record["caption"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TrainingError(
                f'{path}:{number}: expected a JSON object with "image" and "caption" ({e!r}); fix or remove the line'
            ) from e
    return pairs


def _read_csv(path: Path) -> list[CaptionedImage]:
    """Pairs of a CSV manifest with a header naming `image` and `caption` columns."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"image", "caption"} <= set(reader.fieldnames or ()):
            raise TrainingError(
                f"{path}: the CSV header must name 'image' and 'caption' columns, got {reader.fieldnames}"
            )
        return [_pair(path.parent, row["image"], row["caption"]) for row in reader]


def _pair(root: Path, image: object, caption: object) -> CaptionedImage:
    """A pair with the image path resolved against the manifest's folder."""
    if not isinstance(image, str) or not isinstance(caption, str) or not image or not caption.strip():
        raise TypeError(f"image and caption must be non-empty strings, got {image!r} and {caption!r}")
    return CaptionedImage(root / image, caption.strip())


def _read_caption_folder(folder: Path) -> list[CaptionedImage]:
    """Pairs of a folder whose images each have a `.txt` caption beside them."""
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    pairs, uncaptioned = [], 0
    for image in images:
        text_file = image.with_suffix(".txt")
        text = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else ""
        if text:
            pairs.append(CaptionedImage(image, text))
        else:
            uncaptioned += 1
    if uncaptioned:
        logger.warning("%s: skipped %d images without a .txt caption beside them", folder, uncaptioned)
    return pairs


@dataclass
class PairSet:
    """A decoded captioned image set held in memory."""

    pixels: torch.Tensor  # [N, 3, S, S] uint8: the preprocessed image before mean/std normalisation
    tokens: torch.Tensor  # [N, context_length] int64 token ids
    captions: list[str]  # the N captions
    preprocess: Preprocess  # gives the image size and the normalisation
    group: int = 1  # pairs g*group .. g*group+group-1 belong together: an epoch's order keeps them adjacent

    def __len__(self) -> int:
        return len(self.captions)

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """A random order of the pairs for one epoch, each group's pairs adjacent (in random order)."""
        if self.group == 1:
            return torch.randperm(len(self), generator=generator)
        n_groups = -(-len(self) // self.group)
        groups = torch.randperm(n_groups, generator=generator)
        within = torch.rand(n_groups, self.group, generator=generator).argsort(dim=1)  # [groups, group]
        order = (groups[:, None] * self.group + within[groups]).flatten()
        return order[order < len(self)]  # the last group may be incomplete

    def subset(self, indices: Sequence[int] | torch.Tensor) -> PairSet:
        """The pairs at `indices`, in that order (groups are not kept: a subset picks pairs, not groups)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return PairSet(
            self.pixels[index], self.tokens[index], [self.captions[i] for i in index.tolist()], self.preprocess
        )

    def batch(
        self, indices: torch.Tensor, max_shift: int = 0, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels [B, 3, S, S] float32 and tokens [B, L] of the pairs at `indices`.

        Args:
            indices: [B] positions in the set.
            max_shift: when > 0, translate each image by up to this many pixels in x and y (edges repeated).
                No flips: captions say left and right.
            generator: the random source of the shifts.
        """
        pixels = self.pixels[indices].float()  # [B, 3, S, S]
        if max_shift > 0:
            pixels = _random_shift(pixels, max_shift, generator)
        mean = torch.tensor(self.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
        # The same operations in the same order as Preprocess.transform, so pixels match it exactly.
        return pixels.div_(255).sub_(mean).div_(std), self.tokens[indices]


def _random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator | None) -> torch.Tensor:
    """Translate each image of [B, 3, S, S] by its own random offset, repeating the edge pixels."""
    batch, _, size, _ = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")  # [B, 3, S + 2m, S + 2m]
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets)])


def load_pair_set(
    source: Path | ShapesSource,
    preprocess: Preprocess,
    context_length: int,
    progress: bool = True,
) -> PairSet:
    """Decode a whole set into memory.

    A file that cannot be decoded is logged and skipped; it never stops a run.

    Args:
        source: from `parse_source`.
        preprocess: the model's preprocessing (its image size).
        context_length: the text tower's context length; longer captions are truncated.
        progress: show a progress bar on stderr.

    Raises:
        TrainingError: no image of the set could be decoded.
    """
    if isinstance(source, ShapesSource):
        images, captions = _render_shapes(source, preprocess, progress)
    else:
        images, captions = _decode_files(read_pairs(source), preprocess, progress)
        if not images:
            raise TrainingError(f"{source}: none of its images could be decoded; see the warnings above")
    pixels = torch.stack(images) if images else torch.zeros(0, 3, preprocess.image_size, preprocess.image_size)
    tokens = torch.from_numpy(tokenize(captions, context_length=context_length, truncate=True))
    group = source.group if isinstance(source, ShapesSource) else 1
    return PairSet(pixels.to(torch.uint8), tokens, captions, preprocess, group)


def _to_uint8(pixels: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Undo Preprocess's normalisation: the exact 8-bit pixels it started from ([3, S, S] uint8)."""
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)
    return (pixels * std + mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def _decode_files(
    pairs: Sequence[CaptionedImage], preprocess: Preprocess, progress: bool
) -> tuple[list[torch.Tensor], list[str]]:
    """Preprocessed uint8 images and captions of the pairs whose image decodes."""
    images, captions, failed = [], [], 0
    for pair in tqdm(pairs, desc="decoding", unit="img", disable=not progress):
        try:
            images.append(_to_uint8(preprocess(pair.image), preprocess))
        except ImageLoadError as e:
            logger.warning("skipping %s", e)
            failed += 1
            continue
        captions.append(pair.caption)
    if failed:
        logger.warning("skipped %d of %d images that could not be decoded", failed, len(pairs))
    return images, captions


def _render_shapes(
    source: ShapesSource, preprocess: Preprocess, progress: bool
) -> tuple[list[torch.Tensor], list[str]]:
    """Render scenes in memory, a JPEG round trip for some as files have, then preprocess them like files."""
    from retrieval import shapes

    images, captions = [], []
    for index in tqdm(range(source.n), desc=f"rendering {source}", unit="img", disable=not progress):
        image, text, _ = shapes.example(source.seed, index, SHAPES_RENDER_SIZE, source.group, source.vary)
        rng = np.random.default_rng([source.seed, index, 7])  # a stream apart from the generator's own
        if rng.random() < _SHAPES_JPEG_P:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
            image = Image.open(buffer)
        images.append(_to_uint8(preprocess(image), preprocess))
        captions.append(text)
    return images, captions
