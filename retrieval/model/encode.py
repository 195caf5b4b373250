"""Run a model's encoders for inference: no autograd, inputs moved to the model's device, fp16 autocast on
CUDA, float32 numpy rows out."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from retrieval.model.family import EmbeddingModel
from retrieval.types import Embeddings


def model_device(model: EmbeddingModel) -> torch.device:
    """The device the model's weights are on."""
    return next(model.parameters()).device


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to the device; from pinned memory on CUDA so the copy is asynchronous."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA (tensor cores, half the memory traffic); exact fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def encode_images(model: EmbeddingModel, pixels: torch.Tensor) -> Embeddings:
    """Embed a batch of preprocessed images.

    Args:
        model: a CLIP with an image tower.
        pixels: [B, 3, S, S] float tensor from `Preprocess`, on any device.

    Returns:
        [B, embed_dim] float32, rows L2-normalised.
    """
    device = model_device(model)
    with torch.inference_mode(), _autocast(device):
        embeddings = model.encode_image(_to_device(pixels, device))
    return embeddings.float().cpu().numpy()


def encode_texts(model: EmbeddingModel, texts: str | Sequence[str], batch_size: int = 256) -> Embeddings:
    """Embed texts, tokenized for the model's context length (over-long texts are truncated).

    Texts are batched by token length, so a batch runs only as far as its longest text.

    Args:
        model: a CLIP with a text tower.
        texts: one text or a sequence of texts.
        batch_size: texts per forward pass.

    Returns:
        [N, embed_dim] float32, rows L2-normalised, in the order of `texts`.
    """
    if isinstance(texts, str):
        texts = [texts]
    out = np.empty((len(texts), model.config.embed_dim), dtype=np.float32)
    if not texts:
        return out
    tokens = model.tokenize(list(texts))  # [N, L], over-long texts truncated
    # CLIP: by end-of-text position (the largest id), i.e. by length, so a batch stops at its longest text.
    # SigLIP always runs all L positions, and any order does.
    order = torch.argsort(tokens.argmax(dim=-1))
    device = model_device(model)
    with torch.inference_mode(), _autocast(device):
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            embeddings = model.encode_text(_to_device(tokens[rows], device))
            out[rows.numpy()] = embeddings.float().cpu().numpy()
    return out
