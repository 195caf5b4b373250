"""Run a model's encoders for inference: in ONNX Runtime on a CPU, in torch elsewhere (no autograd, inputs moved
to the model's device, fp16 autocast on CUDA); float32 numpy rows out.

Imports torch only where a torch model runs: an index run on the CPU with a fresh export (`open_export_of`) encodes
without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

from retrieval.errors import ExportError
from retrieval.model.export_files import identity_from_exports
from retrieval.model.onnx_runtime import PRECISIONS, OnnxEncoder, find_export
from retrieval.types import Embeddings

if TYPE_CHECKING:
    import torch

    from retrieval.model.family import EmbeddingModel

# What `encode_images` and `encode_texts` run: a torch model, or its towers in ONNX Runtime.
Encoder = Union["EmbeddingModel", OnnxEncoder]  # noqa: UP007  # a runtime alias
RUNTIMES = ("auto", "onnx", "torch")

logger = logging.getLogger(__name__)


def choose_encoder(
    model: EmbeddingModel,
    towers: str = "both",
    precision: str = "float32",
    runtime: str = "auto",
    threads: int | None = None,
) -> Encoder:
    """The encoder to run a loaded model with: its ONNX Runtime export on a CPU, the torch model on a GPU.

    ONNX Runtime runs the same graph ~1.4x faster than torch on a CPU (ViT-B/32, measured on this project's
    2-core machine); torch stays for GPUs and for anything that needs gradients. The export is made on first
    use and cached (`onnx_export.ensure_export`).

    Args:
        model: a loaded model with `.info`.
        towers: the towers that will be run: "both", "image" or "text".
        precision: "float32", or "int8" (dynamically quantised encoders; ONNX Runtime only).
        runtime: "auto" (ONNX Runtime when the model is on the CPU), "onnx" or "torch".
        threads: ONNX Runtime's intra-op threads; None: one per core.

    Returns:
        The model itself, or an `OnnxEncoder` whose `.info` records the precision.

    Raises:
        ExportError: int8 asked for where it cannot run, or the export failed.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    on_cpu = model_device(model).type == "cpu"
    if runtime == "torch" or (runtime == "auto" and not on_cpu):
        if precision != "float32":
            raise ExportError(
                f"{precision} encoders run in ONNX Runtime on the CPU only: drop --precision {precision}, or use "
                "--device cpu (and not --runtime torch)"
            )
        return model
    from retrieval.model.onnx_export import ensure_export  # the exporter imports torch.onnx: only when needed

    try:
        export = ensure_export(model, precision, towers)
    except OSError as e:  # an unwritable cache: "auto" float32 only loses speed, so it runs the model in torch
        if runtime == "onnx" or precision != "float32":
            raise ExportError(
                f"cannot write the ONNX export of {model.info.name} ({e}); check $CLIPSEARCH_CACHE"
            ) from e
        logger.info("cannot write the ONNX export of %s (%s); encoding with torch", model.info.name, e)
        return model
    encoder = OnnxEncoder.open(export, towers=towers, threads=threads)
    # An export is shared by every model with these weights (its folder is keyed by the embedding space), so its
    # record may carry another name; the store's table is named after this model.
    encoder.info = dataclasses.replace(model.info, precision=precision)
    return encoder


def open_export_of(
    name: str, towers: str = "image", precision: str = "float32", threads: int | None = None
) -> OnnxEncoder | None:
    """ONNX Runtime encoders of a named model from a fresh export, without loading the model or importing torch.

    Only for a model whose (name, weights SHA-256) is known before it loads (`registry.known_identity`) and whose
    exports of that precision in the cache record one embedding space for those weights
    (`export_files.identity_from_exports`); the export is then checked as `find_export` checks any (a stale or
    changed file is never run).

    Args:
        name: a registry name or a checkpoint path, as `load_model` takes it.
        towers: "both", "image" or "text".
        precision: "float32" or "int8".
        threads: ONNX Runtime's intra-op threads; None: one per core.

    Returns:
        The encoder, whose `.info` is what `choose_encoder(load_model(name)[0], ...)` records; None when the model
        has to be loaded (and exported) first.
    """
    from retrieval.model.registry import known_identity

    identity = known_identity(name)
    info = identity_from_exports(identity, precision) if identity is not None else None
    export = find_export(info, precision, towers) if info is not None else None
    if export is None:
        return None
    encoder = OnnxEncoder.open(export, towers=towers, threads=threads)
    encoder.info = info  # the name `load_model` gives, not the one the export was first made under
    logger.info("encoding with the ONNX export of %s without loading the model", identity[0])
    return encoder


def no_gpu_visible() -> bool:
    """Whether this machine shows no GPU torch could use ("auto" devices then resolve to the CPU), told without
    importing torch: no NVIDIA driver, no ROCm device and not an Apple-silicon Mac. A machine that shows one may
    still have no usable GPU; it is only ever sent the way torch decides."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return False
    return not any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd"))


def runs_on_cpu(encoder: Encoder) -> bool:
    """Whether the encoder computes on the CPU (then it takes every core while it runs)."""
    return isinstance(encoder, OnnxEncoder) or model_device(encoder).type == "cpu"


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
        import torch

        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def encode_images(model: Encoder, pixels: torch.Tensor | np.ndarray) -> Embeddings:
    """Embed a batch of preprocessed images.

    Args:
        model: a CLIP with an image tower, or an `OnnxEncoder` opened with one.
        pixels: [B, 3, S, S] float32 from `Preprocess`: a tensor on any device, or a numpy array.

    Returns:
        [B, embed_dim] float32, rows L2-normalised.
    """
    if isinstance(model, OnnxEncoder):
        return model.encode_images(pixels if isinstance(pixels, np.ndarray) else pixels.cpu().numpy())
    import torch

    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(pixels)
    device = model_device(model)
    with torch.inference_mode(), _autocast(device):
        embeddings = model.encode_image(_to_device(pixels, device))
    return embeddings.float().cpu().numpy()


def encode_texts(
    model: EmbeddingModel, texts: str | Sequence[str], batch_size: int = 256, encoder: Encoder | None = None
) -> Embeddings:
    """Embed texts, tokenized for the model's context length (over-long texts are truncated).

    Texts are batched by token length, so a batch runs only as far as its longest text.

    Args:
        model: a CLIP with a text tower (its tokenizer is used in any case).
        texts: one text or a sequence of texts.
        batch_size: texts per forward pass.
        encoder: what runs the text tower instead of `model`, e.g. `choose_encoder(model, "text", "int8")`.

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
    import torch

    order = torch.argsort(tokens.argmax(dim=-1))
    if isinstance(encoder, OnnxEncoder):
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            out[rows.numpy()] = encoder.encode_texts(tokens[rows].numpy())
        return out
    device = model_device(model)
    with torch.inference_mode(), _autocast(device):
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            embeddings = model.encode_text(_to_device(tokens[rows], device))
            out[rows.numpy()] = embeddings.float().cpu().numpy()
    return out
