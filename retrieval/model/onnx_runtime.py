"""Run a model's encoders in ONNX Runtime on the CPU, from an export `onnx_export.ensure_export` made.

Imports numpy and onnxruntime, never torch: a process that only encodes (a text query, an index run on the CPU)
starts in a fraction of torch's import time, and ONNX Runtime runs the same graph faster on a CPU.

Exports live in the cache `export_files` describes: per tower, the `model.onnx` and an `export.json` record (the
identity, precision, export format, opset, the torch and onnxruntime versions, the file's size and SHA-256).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from retrieval.cores import available_cores  # noqa: F401  # re-exported: benchmarks import it here
from retrieval.errors import ExportError
from retrieval.model import export_files
from retrieval.model.export_files import (  # noqa: F401  # re-exported: the exporter and tests import them here
    EXPORT_FORMAT,
    MODEL_FILE,
    PRECISIONS,
    RECORD_FILE,
    export_root,
    exports_dir,
)
from retrieval.model.identity import ModelInfo
from retrieval.types import Embeddings

logger = logging.getLogger(__name__)

TOWER_NAMES = ("image", "text")
# Inputs per session run, by tower: bounds the activations' memory when many are encoded at once. ONNX Runtime keeps
# the largest run's activations in its arena for the session's life: ViT-B/32's image tower in float32 held 739 MB
# (PSS) after runs of 32 images against 441 MB after runs of 8, at the same speed (24.5 and 23.8 images/s, medians
# of 8 interleaved rounds on the 2-core Xeon; int8: 60.3 and 61.6). Texts' activations are small.
RUN_BATCH = {"image": 8, "text": 64}


def find_export(info: ModelInfo | dict[str, Any], precision: str = "float32", towers: str = "both") -> Path | None:
    """Where a fresh export of the model's towers lives, or None when one is missing or stale.

    Args:
        info: the model's identity (a `ModelInfo`, or its `to_dict()`); its `precision` field is ignored.
        precision: "float32" or "int8".
        towers: "both", "image" or "text": the towers that must be there.

    Returns:
        The export folder, to pass to `OnnxEncoder.open`; None if any tower asked for is missing or stale.
    """
    root = export_root(info, precision)
    for tower in _tower_names(towers):
        if stale_reason(root / tower, info, precision, tower) is not None:
            return None
    return root


def stale_reason(tower_dir: Path, info: ModelInfo | dict[str, Any], precision: str, tower: str) -> str | None:
    """Why the ONNX export in `tower_dir` must not be used for this model, precision and tower (made for another
    onnxruntime minor version, among `export_files.stale_reason`'s reasons); None when it is fresh."""
    return export_files.stale_reason(tower_dir, info, precision, tower, runtime=("onnxruntime", ort.__version__))


class OnnxEncoder:
    """A model's image and/or text encoders as ONNX Runtime sessions on the CPU.

    Use `OnnxEncoder.open(find_export(info))`; `info` is then the identity the export was made from (with its
    precision), `context_length` the token positions the text encoder takes.
    """

    def __init__(self, info: ModelInfo, sessions: dict[str, ort.InferenceSession], context_length: int | None):
        self.info = info
        self.sessions = sessions
        self.context_length = context_length

    @classmethod
    def open(cls, export_dir: str | os.PathLike[str], towers: str = "both", threads: int | None = None) -> OnnxEncoder:
        """Open the towers of an export for inference.

        Args:
            export_dir: an export folder (`find_export`, `onnx_export.ensure_export`).
            towers: "both", "image" or "text".
            threads: intra-op threads; None: one per core this process may run on.

        Raises:
            ExportError: a tower is missing or stale (says how to make it again).
        """
        root = Path(export_dir)
        map_large_allocations()
        sessions: dict[str, ort.InferenceSession] = {}
        info: ModelInfo | None = None
        context_length = None
        for tower in _tower_names(towers):
            try:
                record = json.loads((root / tower / RECORD_FILE).read_text())
                recorded = ModelInfo.from_dict(record["identity"])
                precision = str(record["precision"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ExportError(
                    f"no usable {tower} encoder export in {root} ({e}); make one with a model loaded in torch "
                    "(`onnx_export.ensure_export(model)`, which `clipsearch index` does), or delete the folder"
                ) from e
            reason = stale_reason(root / tower, recorded, precision, tower)
            if reason is None and export_root(recorded, precision).name != root.name:
                reason = "it was exported from other weights than the folder is named for"
            if reason is not None:
                raise ExportError(
                    f"the {tower} encoder export in {root} is stale: {reason}; it is re-made when the model is next "
                    "loaded in torch (`clipsearch index`, or `onnx_export.ensure_export(model)`), or delete the folder"
                )
            if info is not None and recorded != info:
                raise ExportError(f"the towers in {root} were exported from different models; delete the folder")
            info = recorded
            if tower == "text":
                context_length = int(record["context_length"])
            sessions[tower] = ort.InferenceSession(
                str(root / tower / MODEL_FILE), session_options(threads), providers=["CPUExecutionProvider"]
            )
        assert info is not None
        logger.info("opened %s encoders of %s (%s) from %s", towers, info.name, info.precision, root)
        return cls(info, sessions, context_length)

    def encode_images(self, pixels: np.ndarray) -> Embeddings:
        """Embed preprocessed images: float32 [B, 3, S, S] -> [B, embed_dim] float32, rows L2-normalised."""
        return self._run("image", np.ascontiguousarray(pixels, dtype=np.float32))

    def encode_texts(self, tokens: np.ndarray) -> Embeddings:
        """Embed token ids: int64 [B, context_length] -> [B, embed_dim] float32, rows L2-normalised."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must be [B, {self.context_length}] (the context length), got {tokens.shape}")
        return self._run("text", tokens)

    def _run(self, tower: str, inputs: np.ndarray) -> Embeddings:
        """Run one tower over the inputs in chunks of its `RUN_BATCH`, then normalise each row."""
        session = self.sessions.get(tower)
        if session is None:
            raise ValueError(f"this encoder has no {tower} tower; open the export with towers={tower!r} or 'both'")
        out = np.empty((len(inputs), self.info.embed_dim), dtype=np.float32)
        name = session.get_inputs()[0].name
        chunk = RUN_BATCH[tower]
        for start in range(0, len(inputs), chunk):
            out[start : start + chunk] = session.run(None, {name: inputs[start : start + chunk]})[0]
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        return out


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options for encoder inference on this machine's CPU cores."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1  # the encoder graphs are one chain of ops: nothing to run side by side
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep instead of spinning: spinning bought no speed on this project's 2 shared cores
    # (ViT-B/32 image tower, batch 8: 1.15x faster without it, and 0.089 against 0.114 CPU-s per image), and the
    # cores it burns are the ones the decoders and other processes need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


# Allocations from this size up get pages of their own from the kernel, which go back to it when freed (glibc).
MMAP_THRESHOLD = 1 << 20


@functools.cache
def map_large_allocations() -> bool:
    """Have glibc's malloc give allocations of `MMAP_THRESHOLD` or more pages of their own, returned to the kernel
    when freed, for the rest of the process; once, before the first session. Returns whether it could (glibc only).

    Building a session parses the whole model file and copies its weights (several MB a matrix) before dropping the
    parsed copy. With glibc's default, whose threshold rises to each freed block's size, those frees mostly stayed in
    the heap, and by chance: the same `clipsearch index` run (ViT-B/32, 160 photos) peaked at 707-903 MB RSS over
    three runs, and at 675-684 MB with this, in 11.6-11.9 s against 10.7-13.1 (interleaved on the 2-core Xeon).
    Blocks this large are few (weights, batches, ONNX Runtime's arena chunks), so their page faults cost little.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        return False


_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def _tower_names(towers: str) -> tuple[str, ...]:
    if towers == "both":
        return TOWER_NAMES
    if towers not in TOWER_NAMES:
        raise ValueError(f"towers must be 'both', 'image' or 'text', got {towers!r}")
    return (towers,)
