"""Run a model's encoders in ONNX Runtime on the CPU, from an export `onnx_export.ensure_export` made.

Imports numpy and onnxruntime, never torch: a process that only encodes (a text query, an index run on the CPU)
starts in a fraction of torch's import time, and ONNX Runtime runs the same graph faster on a CPU.

An export is a folder per model identity and precision in the cache dir, with one sub-folder per tower: the
`model.onnx` and an `export.json` record (the identity, precision, export format, opset, the torch and
onnxruntime versions, the file's size and SHA-256). A tower whose record does not match what is asked for, or
whose file does not match its record, is stale and never run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from retrieval.errors import ExportError
from retrieval.model.download import cache_dir, file_sha256
from retrieval.model.identity import ModelInfo
from retrieval.types import Embeddings

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when what an export holds, or how it is made, changes: older exports become stale
PRECISIONS = ("float32", "int8")
TOWER_NAMES = ("image", "text")
MODEL_FILE = "model.onnx"
RECORD_FILE = "export.json"
# Texts or images per session run: bounds the activations' memory when many are encoded at once.
RUN_BATCH = 64


def export_root(info: ModelInfo | dict[str, Any], precision: str = "float32") -> Path:
    """The folder an export of this model at this precision lives in (whether or not it exists yet)."""
    identity = _space(info)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{identity['weights_sha256'][:12]}-{digest}-{_check_precision(precision)}-v{EXPORT_FORMAT}"
    return exports_dir() / name


def exports_dir() -> Path:
    """Where exports live: `$CLIPSEARCH_EXPORTS`, else `onnx/` in the cache dir."""
    return Path(os.environ.get("CLIPSEARCH_EXPORTS") or cache_dir() / "onnx").expanduser()


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
    """Why the export in `tower_dir` must not be used for this model, precision and tower; None when it is fresh."""
    try:
        record = json.loads((tower_dir / RECORD_FILE).read_text())
    except FileNotFoundError:
        return "it has not been exported"
    except (OSError, ValueError) as e:
        return f"its record is unreadable ({e})"
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        return f"it was made by another export format ({record.get('format') if isinstance(record, dict) else '?'})"
    if record.get("tower") != tower or record.get("precision") != precision:
        return f"it holds the {record.get('tower')} tower at {record.get('precision')}"
    try:
        if _space(record.get("identity") or {}) != _space(info):
            return "it was exported from other weights"
    except (KeyError, TypeError, ValueError) as e:
        return f"its recorded identity is unreadable ({e!r})"
    if _minor(record.get("onnxruntime", "")) != _minor(ort.__version__):
        return f"it was made for onnxruntime {record.get('onnxruntime')}, this is {ort.__version__}"
    model = tower_dir / MODEL_FILE
    expected = record.get("file") or {}
    try:
        if model.stat().st_size != expected.get("size") or file_sha256(model) != expected.get("sha256"):
            return f"{model} does not match its record (changed or truncated)"
    except OSError as e:
        return f"{model} cannot be read ({e})"
    return None


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
        """Run one tower over the inputs in chunks of `RUN_BATCH`, then normalise each row."""
        session = self.sessions.get(tower)
        if session is None:
            raise ValueError(f"this encoder has no {tower} tower; open the export with towers={tower!r} or 'both'")
        out = np.empty((len(inputs), self.info.embed_dim), dtype=np.float32)
        name = session.get_inputs()[0].name
        for start in range(0, len(inputs), RUN_BATCH):
            out[start : start + RUN_BATCH] = session.run(None, {name: inputs[start : start + RUN_BATCH]})[0]
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


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _space(info: ModelInfo | dict[str, Any]) -> dict[str, Any]:
    """What of an identity decides the vectors, as JSON-able values: all but the name and the precision."""
    d = info.to_dict() if isinstance(info, ModelInfo) else ModelInfo.from_dict(info).to_dict()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if k not in ("name", "precision")}


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def _tower_names(towers: str) -> tuple[str, ...]:
    if towers == "both":
        return TOWER_NAMES
    if towers not in TOWER_NAMES:
        raise ValueError(f"towers must be 'both', 'image' or 'text', got {towers!r}")
    return (towers,)


def _minor(version: str) -> str:
    """ "1.32.0" -> "1.32": exports are checked against onnxruntime's minor version."""
    return ".".join(str(version).split(".")[:2])
