"""The cache of exported encoders, shared by ONNX Runtime (`onnx_runtime`) and the numpy text tower
(`numpy_text`): where an export lives and when its record says it must not be used.

Imports neither torch nor onnxruntime: a cold text query checks its export with this module alone.

An export is a folder per model identity and precision in the cache dir, with one sub-folder per tower: the
tower's file and an `export.json` record (the identity, precision, export format, the versions the file depends
on, the file's size and SHA-256). A tower whose record does not match what is asked for, or whose file does not
match its record, is stale and never run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from retrieval.model.download import cache_dir, file_sha256
from retrieval.model.identity import ModelInfo

EXPORT_FORMAT = 1  # bump when what an export holds, or how it is made, changes: older exports become stale
PRECISIONS = ("float32", "int8")
MODEL_FILE = "model.onnx"
RECORD_FILE = "export.json"


def export_root(info: ModelInfo | dict[str, Any], precision: str = "float32") -> Path:
    """The folder an export of this model at this precision lives in (whether or not it exists yet)."""
    identity = space(info)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{identity['weights_sha256'][:12]}-{digest}-{check_precision(precision)}-v{EXPORT_FORMAT}"
    return exports_dir() / name


def exports_dir() -> Path:
    """Where exports live: `$CLIPSEARCH_EXPORTS`, else `onnx/` in the cache dir."""
    return Path(os.environ.get("CLIPSEARCH_EXPORTS") or cache_dir() / "onnx").expanduser()


def stale_reason(
    tower_dir: Path,
    info: ModelInfo | dict[str, Any],
    precision: str,
    tower: str,
    model_file: str = MODEL_FILE,
    runtime: tuple[str, str] | None = None,
) -> str | None:
    """Why the export in `tower_dir` must not be used for this model, precision and tower; None when it is fresh.

    Args:
        tower_dir: the tower's folder in an export.
        info: the model's identity; its name and precision are ignored.
        precision: "float32" or "int8".
        tower: the name the record must carry ("image", "text", "text-numpy").
        model_file: the tower's file in `tower_dir`, checked against the size and SHA-256 its record holds.
        runtime: (record key, version) of the library that reads the file, e.g. ("onnxruntime", "1.32.0"): the
            record must name the same minor version.
    """
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
        if space(record.get("identity") or {}) != space(info):
            return "it was exported from other weights"
    except (KeyError, TypeError, ValueError) as e:
        return f"its recorded identity is unreadable ({e!r})"
    if runtime is not None and minor_version(record.get(runtime[0], "")) != minor_version(runtime[1]):
        return f"it was made for {runtime[0]} {record.get(runtime[0])}, this is {runtime[1]}"
    model = tower_dir / model_file
    expected = record.get("file") or {}
    try:
        if model.stat().st_size != expected.get("size") or file_sha256(model) != expected.get("sha256"):
            return f"{model} does not match its record (changed or truncated)"
    except OSError as e:
        return f"{model} cannot be read ({e})"
    return None


def identity_from_exports(identity: tuple[str, str], precision: str = "float32") -> ModelInfo | None:
    """The full identity of a model known by (name, weights SHA-256), read from the records of its exports at this
    precision: what lets an export be found without loading the model. None when there is none, or when the
    exports of these weights record more than one embedding space (e.g. the same weights with other preprocessing):
    then only the loaded model can tell which is its own.

    Records are only read here; whether an export may be run is `stale_reason`'s to say.
    """
    name, sha256 = identity
    spaces: dict[str, ModelInfo] = {}
    try:
        folders = list(exports_dir().glob(f"{sha256[:12]}-*-{check_precision(precision)}-v{EXPORT_FORMAT}"))
    except OSError:
        return None
    for folder in folders:
        for record_file in folder.glob(f"*/{RECORD_FILE}"):
            try:
                recorded = ModelInfo.from_dict(json.loads(record_file.read_text())["identity"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable record is stale_reason's business, should this export be asked for
            if recorded.weights_sha256 == sha256:
                spaces[json.dumps(space(recorded), sort_keys=True)] = recorded
    if len(spaces) != 1:
        return None
    (info,) = spaces.values()
    return ModelInfo.from_dict({**info.to_dict(), "name": name, "precision": precision})


def space(info: ModelInfo | dict[str, Any]) -> dict[str, Any]:
    """What of an identity decides the vectors, as JSON-able values: all but the name and the precision."""
    d = info.to_dict() if isinstance(info, ModelInfo) else ModelInfo.from_dict(info).to_dict()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if k not in ("name", "precision")}


def check_precision(precision: str) -> str:
    """The precision, if it is one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def minor_version(version: str) -> str:
    """ "1.32.0" -> "1.32": exports are checked against their runtime's minor version."""
    return ".".join(str(version).split(".")[:2])
