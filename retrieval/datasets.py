"""Evaluation sets: captioned images (for recall@k) and labelled class folders (for zero-shot accuracy).

Captioned sets come in four layouts, all read into one `CaptionedSet` (distinct images, every caption,
and which image each caption belongs to; an image may have several captions):

- a JSONL manifest, one `{"image": path, "caption": text}` per line, paths relative to the manifest's
  folder (what `python -m retrieval.shapes` writes; several lines may name the same image);
- a CSV manifest with `image` and `caption` columns;
- a Karpathy-split JSON (`dataset_flickr30k.json`, `dataset_coco.json`): `images[]` with `filename`,
  optional `filepath` (COCO's `val2014`), `split` (`train`/`restval`/`val`/`test`) and `sentences[].raw`;
  image files are looked up under an image root folder;
- a folder in which each image has a `.txt` caption file beside it (one caption per non-empty line).

A labelled set is a folder with one sub-folder per class (`cifar10/test/airplane/0001.png`, ImageNet's
`val/n01440764/...`); class names default to the folder names and can be given by a class-names file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from retrieval.errors import DatasetError
from retrieval.query import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "restval", "val", "test")


class CaptionedSet(NamedTuple):
    """Images with one or more captions each."""

    images: list[Path]  # the N distinct image files, in first-seen order
    captions: list[str]  # the M captions
    caption_image: npt.NDArray[np.int64]  # [M] index into `images` of each caption's image

    def image_captions(self) -> npt.NDArray[np.bool_]:
        """[N, M] mask: True where caption m describes image n (image->text relevance)."""
        mask = np.zeros((len(self.images), len(self.captions)), dtype=bool)
        mask[self.caption_image, np.arange(len(self.captions))] = True
        return mask

    def limit(self, n_images: int | None) -> CaptionedSet:
        """The first `n_images` images with all their captions (the whole set for None)."""
        if n_images is None or n_images >= len(self.images):
            return self
        keep = self.caption_image < n_images
        return CaptionedSet(
            self.images[:n_images],
            [c for c, k in zip(self.captions, keep, strict=True) if k],
            self.caption_image[keep],
        )


class LabelledSet(NamedTuple):
    """Images sorted into classes."""

    classes: list[str]  # class names, in class-index order
    images: list[Path]  # every image file
    targets: npt.NDArray[np.int64]  # [N] class index of each image


def _is_image(path: Path) -> bool:
    """An image file by extension (case-insensitive), hidden and AppleDouble files excluded."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _from_pairs(pairs: Iterable[tuple[Path, str]], source: Path) -> CaptionedSet:
    """Group (image, caption) pairs by image; pairs naming the same file join one image."""
    index: dict[Path, int] = {}
    captions: list[str] = []
    owners: list[int] = []
    for image, text in pairs:
        text = " ".join(text.split())
        if not text:
            continue
        owners.append(index.setdefault(image, len(index)))
        captions.append(text)
    if not captions:
        raise DatasetError(f"{source}: no captioned images found; see `python -m benchmarks.recall_at_k --help`")
    return CaptionedSet(list(index), captions, np.asarray(owners, dtype=np.int64))


def read_manifest(path: str | os.PathLike[str]) -> CaptionedSet:
    """Read a JSONL manifest (`{"image": ..., "caption": ...}` per line) or a CSV one with those columns.

    Raises:
        DatasetError: a line or row without an image and a caption (the message names file and line).
    """
    path = Path(path)
    pairs = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"image", "caption"} <= set(reader.fieldnames or ()):
                raise DatasetError(f"{path}: the CSV header must name 'image' and 'caption', got {reader.fieldnames}")
            pairs = [(path.parent / row["image"], row["caption"] or "") for row in reader]
        return _from_pairs(pairs, path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, text = record["image"], record["caption"]
            if not isinstance(image, str) or not isinstance(text, str):
                raise TypeError(f"image and caption must be strings, got {image!r} and {text!r}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetError(
                f'{path}:{number}: expected a JSON object with "image" and "caption" ({e}); fix or remove the line'
            ) from e
        pairs.append((path.parent / image, text))
    return _from_pairs(pairs, path)


def read_karpathy(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, split: str = "test"
) -> CaptionedSet:
    """Read one split of a Karpathy-split JSON (Flickr30k, Flickr8k or MSCOCO).

    Args:
        path: `dataset_flickr30k.json`, `dataset_coco.json`, ...
        image_root: the folder holding the images (COCO: the folder above `val2014/`); default: an `images`
            folder beside the JSON, else the JSON's folder.
        split: `test` (Flickr30k: 1,000 images / 5,000 captions; COCO: 5,000 / 25,000), `val`, `train` or
            `restval`.

    Raises:
        DatasetError: not a Karpathy JSON, an unknown split, or images missing from `image_root`.
    """
    path = Path(path)
    if split not in KARPATHY_SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(KARPATHY_SPLITS)}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["images"]
        selected = [e for e in entries if e["split"] == split]
        pairs = [(Path(e.get("filepath", "")) / e["filename"], s["raw"]) for e in selected for s in e["sentences"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(
            f"{path}: not a Karpathy-split JSON ({e!r}); expected images[] with filename, split and sentences[].raw"
        ) from e
    if image_root is None:
        image_root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    root = Path(image_root)
    dataset = _from_pairs(((root / rel, text) for rel, text in pairs), path)
    missing = [p for p in dataset.images if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(dataset.images)} {split} images are not under {root} (e.g. {missing[0]}); "
            "pass the folder holding them as the image root"
        )
    return dataset


def read_caption_folder(folder: str | os.PathLike[str]) -> CaptionedSet:
    """Read a folder (recursively) whose images each have a `.txt` file beside them, one caption per line.

    Images without a caption file are skipped, with a warning.
    """
    folder = Path(folder)
    pairs, uncaptioned = [], 0
    for image in sorted(p for p in folder.rglob("*") if _is_image(p)):
        text_file = image.with_suffix(".txt")
        lines = text_file.read_text(encoding="utf-8").splitlines() if text_file.is_file() else []
        lines = [line for line in lines if line.strip()]
        uncaptioned += not lines
        pairs.extend((image, line) for line in lines)
    if uncaptioned:
        logger.warning("%s: skipped %d images without a .txt caption beside them", folder, uncaptioned)
    return _from_pairs(pairs, folder)


def read_captioned(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, split: str = "test"
) -> CaptionedSet:
    """Read a captioned set in any layout: a folder, a `.json` Karpathy file, or a `.jsonl`/`.csv` manifest.

    Args:
        path: the set.
        image_root: Karpathy JSON only: the image folder (see `read_karpathy`).
        split: Karpathy JSON only: the split.

    Raises:
        DatasetError: the path does not exist or cannot be read as a captioned set.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"{path}: no such file or folder; give a .jsonl/.csv manifest, a Karpathy-split .json, or a folder "
            "of images with .txt captions"
        )
    if path.is_dir():
        return read_caption_folder(path)
    if path.suffix.lower() == ".json":
        return read_karpathy(path, image_root, split)
    return read_manifest(path)


def read_class_names(path: str | os.PathLike[str], folders: Sequence[str]) -> list[str]:
    """Class names for class folders from a file: `folder<TAB>name` lines, or one name per line in folder order.

    Raises:
        DatasetError: the file does not name every folder.
    """
    lines = [line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and all("\t" in line for line in lines):
        names = dict(line.split("\t", 1) for line in lines)
        missing = [f for f in folders if f not in names]
        if missing:
            raise DatasetError(f"{path} names no class for folder(s) {missing[:5]}; add `folder<TAB>name` lines")
        return [names[f].strip() for f in folders]
    if len(lines) != len(folders):
        raise DatasetError(
            f"{path} has {len(lines)} names for {len(folders)} class folders; give one per folder, in sorted "
            "folder order, or `folder<TAB>name` lines"
        )
    return [line.strip() for line in lines]


def read_class_folders(
    root: str | os.PathLike[str],
    class_names: str | os.PathLike[str] | None = None,
    per_class: int | None = None,
) -> LabelledSet:
    """Read a labelled set: one sub-folder per class, images anywhere below it.

    Args:
        root: the folder of class folders.
        class_names: optional class-names file (see `read_class_names`); default: the folder names with `_`
            as spaces (ImageNet's `n01440764` folders need one).
        per_class: keep at most this many images per class (the first, sorted by path).

    Raises:
        DatasetError: no class folder with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; give a folder with one sub-folder of images per class")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = read_class_names(class_names, folders) if class_names else [f.replace("_", " ") for f in folders]
    images: list[Path] = []
    targets: list[int] = []
    kept: list[str] = []
    for folder, name in zip(folders, names, strict=True):
        files = sorted(p for p in (root / folder).rglob("*") if _is_image(p))[:per_class]
        if not files:
            logger.warning("%s: class folder %r has no images; left out", root, folder)
            continue
        targets.extend([len(kept)] * len(files))
        images.extend(files)
        kept.append(name)
    if not kept:
        raise DatasetError(f"{root}: no class folders with images; expected {root}/<class>/<image files>")
    return LabelledSet(kept, images, np.asarray(targets, dtype=np.int64))
