"""The embedding half of the public API: images and texts in, L2-normalised float32 rows out.

Example:
    import clipsearch
    image_vectors = clipsearch.embed_images(["cat.jpg", "dog.png"], model="shapes-mini")   # [2, D]
    text_vectors = clipsearch.embed_texts(["a cat", "a dog"], model="shapes-mini")         # [2, D]
    similarity = image_vectors @ text_vectors.T                                            # cosine
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from retrieval.model.clip import Towers
from retrieval.model.encode import encode_images, encode_texts
from retrieval.model.family import MODEL_CLASSES, EmbeddingModel
from retrieval.model.loading import load_model
from retrieval.model.preprocess import Preprocess
from retrieval.types import Embeddings

# A registry name or checkpoint path, a loaded model (CLIP or SigLIP), or what `load_model` returns; None: the
# default model.
ModelArg = str | os.PathLike | EmbeddingModel | tuple[EmbeddingModel, Preprocess] | None
ImageArg = str | os.PathLike | Image.Image


def _resolve(model: ModelArg, towers: Towers) -> tuple[EmbeddingModel, Preprocess]:
    """A loaded model and its preprocessing for any accepted `model` argument."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model, towers=towers)
    if isinstance(model, MODEL_CLASSES):
        return model, Preprocess.from_config(model.config)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], MODEL_CLASSES):
        return model
    raise TypeError(f"model must be a name, a path, a CLIP or a (model, preprocess) pair, not {type(model).__name__}")


def embed_images(
    images_or_paths: ImageArg | Iterable[ImageArg],
    model: ModelArg = None,
    batch_size: int = 32,
    progress: bool = False,
) -> Embeddings:
    """Embed images given as file paths or PIL images.

    Args:
        images_or_paths: one image or path, or an iterable of them.
        model: a registry name or checkpoint path, a loaded CLIP, or a (model, preprocess) pair from
            `load_model`; None uses `$CLIPSEARCH_MODEL`, else "MobileCLIP2-S0".
        batch_size: images per forward pass.
        progress: show a tqdm bar on stderr.

    Returns:
        float32 array [N, D], rows L2-normalised, in input order.

    Raises:
        ImageLoadError: an image cannot be opened or decoded (the message names the file).

    Example:
        vectors = embed_images(["photos/beach.jpg", "photos/dog.png"], model="shapes-mini")  # [2, D]
    """
    if isinstance(images_or_paths, (str, os.PathLike, Image.Image)):
        images_or_paths = [images_or_paths]
    images = list(images_or_paths)
    clip, preprocess = _resolve(model, towers="image")
    out = np.empty((len(images), clip.config.embed_dim), dtype=np.float32)
    with tqdm(total=len(images), unit="img", desc="embedding images", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pixels = torch.stack([preprocess(image) for image in batch])  # [B, 3, S, S]
            out[start : start + len(batch)] = encode_images(clip, pixels)
            bar.update(len(batch))
    return out


def embed_texts(texts: str | Sequence[str], model: ModelArg = None, batch_size: int = 256) -> Embeddings:
    """Embed texts (over-long ones are truncated to the model's context length).

    Args:
        texts: one text or a sequence of texts.
        model: as for `embed_images`.
        batch_size: texts per forward pass.

    Returns:
        float32 array [N, D], rows L2-normalised, in input order.

    Example:
        vectors = embed_texts(["a red circle", "a blue square"], model="shapes-mini")  # [2, D]
    """
    clip, _ = _resolve(model, towers="text")
    return encode_texts(clip, texts, batch_size=batch_size)
