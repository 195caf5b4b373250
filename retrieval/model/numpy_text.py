"""CLIP's text tower in numpy (OpenAI's causal one, and MobileCLIP2's without the mask), over float32 weights
memory-mapped from one raw file: what a cold text query encodes with, importing neither torch nor onnxruntime.

A cold query process pays for loading the text tower, not for its FLOPs: ONNX Runtime took ~2 s to build a
session over the 254 MB float32 ViT-B/32 text graph, torch ~1.5 s to import. Here the weights are one raw
little-endian float32 file (each tensor at a 64-byte aligned offset) mapped with `np.memmap`: opening it reads
nothing, the token embedding (100 MB of ViT-B/32's 150) is paged in only at the rows a query's tokens touch, and
a causal tower runs only up to each text's end-of-text token, as `CLIP.encode_text` does (MobileCLIP2's attends
to the padding too, so it runs every position).

The weights are written beside the model's ONNX export, in the tower folder `text-numpy` (`onnx_export.ensure_export`
writes them with the float32 text export, after checking them against the torch tower), with an `export.json` record
checked exactly as the ONNX towers' are (`export_files.stale_reason`): a file of other weights, another export
format, or changed since it was written, is never used.

The "clip" and "mobileclip" families with CLIP's BPE tokenizer are covered (`supports`); SigLIP's text tower
keeps its ONNX export.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ExportError
from retrieval.model.export_files import RECORD_FILE, export_root, stale_reason
from retrieval.model.identity import ModelInfo
from retrieval.model.query_text import FEW_TEXTS
from retrieval.types import Embeddings

logger = logging.getLogger(__name__)

TOWER = "text-numpy"  # the tower folder in an export
WEIGHTS_FILE = "weights.f32"
DTYPE = "<f4"  # little-endian float32, whatever the machine
ALIGN = 64  # bytes: each tensor starts at a multiple, so every view is aligned for SIMD loads
EPS = 1e-5  # CLIP's LayerNorm epsilon
# The weights file's layout version, in its config ("format"): 1 (written without the field) is OpenAI's causal
# tower; 2 records `causal`. A record of a version this module does not know is stale (`numpy_stale_reason`).
FORMAT = 2
# Per family: the prefix of the text tower's keys in the model's state dict (the file keeps OpenAI's names) and
# whether its attention is causal. MobileCLIP2's is open_clip's `no_causal_mask` tower under `text.`.
FAMILIES = {"clip": ("", True), "mobileclip": ("text.", False)}
_BLOCK_KEYS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
# Abramowitz & Stegun 7.1.26: erf to within 1.5e-7 (numpy has no erf), for the exact GELU of open_clip's LAION models.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
# Up to `FEW_TEXTS` texts run on one BLAS thread (torch's query encoder adds a second only on an idle core,
# `query_threads`; not measured here): a query's matrices are a few rows tall, and on 2 busy cores OpenBLAS's thread
# hand-offs cost more than the product (measured: [6, 512] x [512, 1536], 71 ms on numpy's default threads against
# 2.7 ms on one, at load 19).
# numpy's bundled OpenBLAS (scipy-openblas in its wheels, plain OpenBLAS elsewhere): (set, get) thread count names.
_OPENBLAS_THREADS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


def tensor_names(layers: int) -> list[str]:
    """The text tower's state-dict keys (OpenAI's names), in the order they are written."""
    blocks = [f"transformer.resblocks.{i}.{key}" for i in range(layers) for key in _BLOCK_KEYS]
    return ["token_embedding.weight", "positional_embedding", *blocks, "ln_final.weight", "ln_final.bias",
            "text_projection"]  # fmt: skip


def state_dict_names(family: str, layers: int) -> dict[str, str]:
    """Each name of `tensor_names` -> the model's state-dict key it is written from (`FAMILIES`' prefix)."""
    prefix = FAMILIES[family][0]
    return {name: prefix + name for name in tensor_names(layers)}


def supports(family: str, info: ModelInfo) -> bool:
    """Whether the numpy tower computes this model's text vectors: a family of `FAMILIES` (OpenAI's CLIP text tower,
    MobileCLIP2's) with CLIP's BPE tokenizer."""
    return family in FAMILIES and info.tokenizer == "clip-bpe"


def write_weights(folder: Path, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> dict[str, Any]:
    """Write the text tower's tensors as one raw float32 file in `folder`.

    Args:
        folder: where `weights.f32` goes (a staging folder: `onnx_export` renames it into place).
        tensors: every key of `tensor_names(config["layers"])`, float32 arrays.
        config: the tower's shape: width, heads, layers, context_length, vocab_size, embed_dim, quick_gelu, causal
            (True when missing).

    Returns:
        The record's description of the file: the config (with "format": `FORMAT`) and each tensor's [offset, shape].
    """
    table: dict[str, list[Any]] = {}
    offset = 0
    with (folder / WEIGHTS_FILE).open("wb") as f:
        for name in tensor_names(int(config["layers"])):
            array = np.ascontiguousarray(tensors[name], dtype=DTYPE)
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            table[name] = [offset, list(array.shape)]
            f.write(array.tobytes())
            offset += array.nbytes
    return {"text": {"causal": True, **config, "format": FORMAT}, "tensors": table}


def find_numpy_text(info: ModelInfo | dict[str, Any]) -> Path | None:
    """The tower folder of a fresh numpy text export of this model (float32), or None when it is missing or stale."""
    folder = export_root(info, "float32") / TOWER
    return folder if numpy_stale_reason(folder, info) is None else None


def numpy_stale_reason(folder: Path, info: ModelInfo | dict[str, Any]) -> str | None:
    """Why the numpy text export in `folder` must not be used for this model (`export_files.stale_reason`); None
    when it is fresh."""
    reason = stale_reason(folder, info, "float32", TOWER, WEIGHTS_FILE)
    if reason is None:
        try:
            reason = _format_reason(json.loads((folder / RECORD_FILE).read_text())["text"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = f"its record has no readable text config ({e!r})"
    return reason


def _format_reason(config: Mapping[str, Any]) -> str | None:
    """Why a weights file of this config cannot be read here (another layout version); None when it can."""
    version = config.get("format", 1)
    return None if version in (1, FORMAT) else f"it was written in numpy format {version!r}, this reads 1 and {FORMAT}"


class NumpyTextEncoder:
    """A CLIP text tower run in numpy from a `text-numpy` export: `encode_texts` as `OnnxEncoder`'s.

    Use `NumpyTextEncoder.open(find_numpy_text(info))`; `info` is then the identity it was exported from,
    `context_length` the token positions it takes.
    """

    def __init__(self, info: ModelInfo, config: Mapping[str, Any], weights: dict[str, np.ndarray]) -> None:
        self.info = info
        self.context_length = int(config["context_length"])
        self.heads = int(config["heads"])
        self.layers = int(config["layers"])
        self.quick_gelu = bool(config["quick_gelu"])
        self.causal = bool(config.get("causal", True))  # format 1 has no field: OpenAI's causal tower
        self.weights = weights

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> NumpyTextEncoder:
        """Map a `text-numpy` tower folder's weights (nothing is read until a text is encoded).

        Raises:
            ExportError: the folder holds no fresh export, or its record does not describe its file.
        """
        folder = Path(folder)
        try:
            record = json.loads((folder / RECORD_FILE).read_text())
            info = ModelInfo.from_dict(record["identity"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"no usable numpy text export in {folder} ({e}); delete the folder") from e
        reason = numpy_stale_reason(folder, info)
        if reason is None and export_root(info, "float32").name != folder.parent.name:
            reason = "it was exported from other weights than the folder is named for"
        if reason is not None:
            raise ExportError(
                f"the numpy text export in {folder} is stale: {reason}; it is re-made when the model is next loaded "
                "in torch (`clipsearch index`, or `onnx_export.ensure_export(model)`), or delete the folder"
            )
        encoder = cls.map(info, record, folder / WEIGHTS_FILE)
        logger.info("opened the numpy text tower of %s from %s", info.name, folder)
        return encoder

    @classmethod
    def map(cls, info: ModelInfo, layout: Mapping[str, Any], path: Path) -> NumpyTextEncoder:
        """Map a weights file as `write_weights` described it (`layout`: its "text" config and "tensors" table),
        without checking it against a record: for `open`, and for the exporter's check before it is published.

        Raises:
            ExportError: the table does not fit the file.
        """
        weights = {}
        try:
            config, table = layout["text"], layout["tensors"]
            reason = _format_reason(config)
            if reason is not None:
                raise ValueError(reason)
            raw = np.memmap(path, dtype=np.uint8, mode="r")
            for name in tensor_names(int(config["layers"])):
                offset, shape = table[name]
                # a plain ndarray over the mapping (a memmap subclass would make every result a memmap too)
                weights[name] = np.ndarray(shape, DTYPE, buffer=raw, offset=offset)
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ExportError(f"the numpy text weights {path} do not match their record ({e}); delete them") from e
        return cls(info, config, weights)

    def encode_texts(self, tokens: np.ndarray) -> Embeddings:
        """Embed token ids: int64 [B, context_length] -> [B, embed_dim] float32, rows L2-normalised.

        The end-of-text token is the largest id of each row (CLIP's vocabulary). In a causal tower positions after
        the batch's last one are not run, which the mask makes exact; a tower without the mask runs them all.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must be [B, {self.context_length}] (the context length), got {tokens.shape}")
        if not len(tokens):
            return np.empty((0, self.weights["text_projection"].shape[1]), np.float32)
        eot = tokens.argmax(axis=1)  # [B]
        with _one_blas_thread() if len(tokens) <= FEW_TEXTS else contextlib.nullcontext():
            out = self._features(tokens[:, : int(eot.max()) + 1] if self.causal else tokens, eot)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        return out

    def _features(self, tokens: np.ndarray, eot: np.ndarray) -> np.ndarray:
        """The projected features at each row's end-of-text position: [B, L] ids -> [B, embed_dim]."""
        w = self.weights
        batch, length = tokens.shape
        x = w["token_embedding.weight"][tokens] + w["positional_embedding"][:length]  # [B, L, width]
        width = x.shape[-1]
        head = width // self.heads
        # causal: -inf above the diagonal, position i attends to positions <= i only; else every position to every one
        mask = np.triu(np.full((length, length), -np.inf, np.float32), k=1) if self.causal else None  # [L, L]
        scale = np.float32(head**-0.5)
        for i in range(self.layers):
            p = f"transformer.resblocks.{i}."
            h = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
            qkv = h @ w[p + "attn.in_proj_weight"].T + w[p + "attn.in_proj_bias"]  # [B, L, 3*width]
            q, k, v = qkv.reshape(batch, length, 3, self.heads, head).transpose(2, 0, 3, 1, 4)  # 3 x [B, H, L, head]
            scores = (q * scale) @ k.transpose(0, 1, 3, 2)  # [B, H, L, L]
            if mask is not None:
                scores += mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            attended = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)  # [B, L, width]
            x = x + (attended @ w[p + "attn.out_proj.weight"].T + w[p + "attn.out_proj.bias"])
            h = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
            h = h @ w[p + "mlp.c_fc.weight"].T + w[p + "mlp.c_fc.bias"]  # [B, L, 4*width]
            h = _quick_gelu(h) if self.quick_gelu else _gelu(h)
            x = x + (h @ w[p + "mlp.c_proj.weight"].T + w[p + "mlp.c_proj.bias"])
        x = x[np.arange(batch), eot]  # [B, width]
        return _layer_norm(x, w["ln_final.weight"], w["ln_final.bias"]) @ w["text_projection"]  # [B, embed_dim]


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, as torch's)."""
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(variance + np.float32(EPS)) * weight + bias


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    """OpenAI's x * sigmoid(1.702 x)."""
    return x / (np.float32(1) + np.exp(np.float32(-1.702) * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x * Phi(x), through an erf accurate to 1.5e-7 (`_ERF_A`)."""
    z = np.abs(x) * np.float32(0.5**0.5)
    t = np.float32(1) / (np.float32(1) + np.float32(_ERF_P) * z)
    poly = t * (_ERF_A[0] + t * (_ERF_A[1] + t * (_ERF_A[2] + t * (_ERF_A[3] + t * _ERF_A[4]))))
    erf = np.float32(1) - poly * np.exp(-z * z)
    return np.float32(0.5) * x * (np.float32(1) + np.copysign(erf, x))


@functools.cache
def _openblas_threads() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None:
    """(set, get) of the thread count of the OpenBLAS numpy loaded, or None where it cannot be found (another BLAS,
    another layout): then numpy's threads stay as they are."""
    package = Path(np.__file__).parent
    for library in [*package.parent.glob("numpy.libs/*openblas*"), *package.glob(".dylibs/*openblas*")]:
        try:
            lib = ctypes.CDLL(str(library))  # already loaded by numpy: the same handle, no second copy
        except OSError:
            continue
        for set_name, get_name in _OPENBLAS_THREADS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                return getattr(lib, set_name), getattr(lib, get_name)
    return None


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run numpy's matrix products on one thread inside the block (`FEW_TEXTS`)."""
    functions = _openblas_threads()
    if functions is None:
        yield
        return
    set_threads, get_threads = functions
    previous = int(get_threads())
    set_threads(1)
    try:
        yield
    finally:
        set_threads(previous)
