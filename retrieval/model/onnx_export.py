"""Export a loaded model's encoders to ONNX once, for `onnx_runtime.OnnxEncoder`: float32, or int8 by dynamic
quantisation of the float32 export's MatMul/Gemm weights.

Each tower goes through the family-independent seam (`encode_image`, `encode_text`), traced by the TorchScript
exporter (`dynamo=False`: it needs nothing beyond torch and onnx, and traces these graphs in seconds), with a
dynamic batch axis; the text tower takes exactly the model's context length. Every export is checked against
the torch model on fresh inputs before it is put in place, and written to a temporary folder renamed into
place, so concurrent processes and crashes never leave a half-written tower under its final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from retrieval.errors import ExportError
from retrieval.model.download import _remember_hash, file_sha256
from retrieval.model.family import EmbeddingModel
from retrieval.model.onnx_runtime import (
    EXPORT_FORMAT,
    MODEL_FILE,
    RECORD_FILE,
    OnnxEncoder,
    export_root,
    stale_reason,
)

logger = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is one op from 17 on; onnxruntime >= 1.14 runs it
# An export whose vectors fall below this cosine to the torch model's on the check inputs is refused. int8 is
# another embedding space on purpose (measured >= 0.99 on random and trained weights), so only gross breakage
# fails it.
MIN_COSINE = {"float32": 0.9999, "int8": 0.95}


class _Tower(nn.Module):
    """One tower of a model as a module of its own: what the exporter traces."""

    def __init__(self, model: EmbeddingModel, tower: str) -> None:
        super().__init__()
        self.model = model
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x) if self.tower == "image" else self.model.encode_text(x)


def model_towers(model: EmbeddingModel) -> tuple[str, ...]:
    """The towers a loaded model has."""
    return {"both": ("image", "text"), "image": ("image",), "text": ("text",)}[model.towers]


def ensure_export(model: EmbeddingModel, precision: str = "float32", towers: str = "both") -> Path:
    """Export the towers of `model` at `precision` unless a fresh export is in the cache already.

    Args:
        model: a loaded model with `.info` (`load_model`, or `ModelInfo.for_model`), float32 weights.
        precision: "float32", or "int8" (dynamically quantised from the float32 export, made first if missing).
        towers: "both" (the towers the model has), "image" or "text".

    Returns:
        The export folder, for `OnnxEncoder.open`.

    Raises:
        ExportError: the model cannot be exported, or its export does not reproduce the torch model.
    """
    info = getattr(model, "info", None)
    if info is None:
        raise ExportError("the model has no `.info`: load it with `load_model`, or set `ModelInfo.for_model`")
    root = export_root(info, precision)
    for tower in model_towers(model) if towers == "both" else (towers,):
        if tower not in model_towers(model):
            raise ExportError(f"the model was loaded without its {tower} tower; load it with towers={tower!r}")
        reason = stale_reason(root / tower, info, precision, tower)
        if reason is None:
            continue
        logger.info("exporting the %s encoder of %s to ONNX (%s): %s", tower, info.name, precision, reason)
        _publish(root, tower, lambda staging, t=tower: _make(model, t, precision, staging))
    if "text" in (model_towers(model) if towers == "both" else (towers,)) and precision == "float32":
        _ensure_numpy_text(model, root)
    return root


def _ensure_numpy_text(model: EmbeddingModel, root: Path) -> None:
    """Write the text tower's weights for `numpy_text` beside its ONNX export, unless fresh ones are there: what a
    cold text query encodes with. A model it does not cover, or weights it does not reproduce, only leave that
    query on the ONNX export (logged)."""
    from retrieval.model import numpy_text

    if not numpy_text.supports(model.config.family, model.info):
        return
    reason = numpy_text.numpy_stale_reason(root / numpy_text.TOWER, model.info)
    if reason is None:
        return
    logger.info("writing the text encoder of %s for numpy: %s", model.info.name, reason)
    try:
        _publish(root, numpy_text.TOWER, lambda staging: _make_numpy_text(model, staging), numpy_text.WEIGHTS_FILE)
    except ExportError as e:
        logger.warning("%s; cold text queries use the ONNX export instead", e)


def _make_numpy_text(model: EmbeddingModel, staging: Path) -> dict:
    """Write the text tower's float32 weights into `staging` and check them against the torch model; returns the
    record (less the file's hash)."""
    from retrieval.model import numpy_text

    info = dataclasses.replace(model.info, precision="float32")
    config, text = model.config, model.config.text
    state = model.state_dict()
    keys = numpy_text.state_dict_names(config.family, text.layers)  # the file's names -> the model's
    dtype = state[keys["token_embedding.weight"]].dtype
    if dtype != torch.float32:
        raise ExportError(f"only float32 models are written for numpy, this one is {dtype}")
    tensors = {name: state[key].detach().cpu().numpy() for name, key in keys.items()}
    shape = {
        "width": text.width,
        "heads": text.heads,
        "layers": text.layers,
        "context_length": text.context_length,
        "vocab_size": text.vocab_size,
        "embed_dim": config.embed_dim,
        "quick_gelu": config.quick_gelu,
        "causal": numpy_text.FAMILIES[config.family][1],
    }
    layout = numpy_text.write_weights(staging, tensors, shape)
    encoder = numpy_text.NumpyTextEncoder.map(info, layout, staging / numpy_text.WEIGHTS_FILE)
    cosine, max_abs = _check(model, "text", encoder.encode_texts)
    if cosine < MIN_COSINE["float32"]:
        raise ExportError(
            f"the numpy text encoder of {info.name} does not reproduce the torch model (cosine {cosine:.6f})"
        )
    return {
        "format": EXPORT_FORMAT,
        "identity": info.to_dict(),
        "precision": "float32",
        "tower": numpy_text.TOWER,
        "context_length": text.context_length,
        "torch": torch.__version__,
        "check": {"cosine_min": cosine, "max_abs_diff": max_abs},
        **layout,
    }


def _make(model: EmbeddingModel, tower: str, precision: str, staging: Path) -> dict:
    """Write one tower's `model.onnx` into `staging`; returns its record (less the file's hash)."""
    info = dataclasses.replace(model.info, precision=precision)
    weights = next(p for n, p in model.named_parameters() if n.startswith("visual" if tower == "image" else "t"))
    if weights.dtype != torch.float32:
        raise ExportError(f"only float32 models are exported, this one is {weights.dtype}: load it with load_model")
    start = time.perf_counter()
    if precision == "float32":
        _trace(model, tower, staging / MODEL_FILE)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        source = ensure_export(model, "float32", tower) / tower / MODEL_FILE
        # Only the MatMul/Gemm weights (~all of a ViT's FLOPs) become int8; the patch convolution, LayerNorms,
        # softmax and activations stay float32. Per-channel scales keep each output's own weight range.
        with _quiet_quantizer():
            quantize_dynamic(
                source,
                staging / MODEL_FILE,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=True,
                extra_options={"MatMulConstBOnly": True},
            )
    session = ort.InferenceSession(str(staging / MODEL_FILE), providers=["CPUExecutionProvider"])
    cosine, max_abs = _check(model, tower, lambda x: session.run(None, {session.get_inputs()[0].name: x})[0])
    if cosine < MIN_COSINE[precision]:
        raise ExportError(
            f"the {precision} ONNX export of the {tower} encoder of {info.name} does not reproduce the torch model "
            f"(cosine {cosine:.6f}, max abs diff {max_abs:.2e}); use the torch encoders (--runtime torch)"
        )
    logger.info(
        "exported the %s encoder (%s) in %.1f s, cosine to torch %.7f",
        tower,
        precision,
        time.perf_counter() - start,
        cosine,
    )
    return {
        "format": EXPORT_FORMAT,
        "identity": info.to_dict(),
        "precision": precision,
        "tower": tower,
        "context_length": model.config.text.context_length,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "check": {"cosine_min": cosine, "max_abs_diff": max_abs},
    }


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop the quantiser's notices, which it logs on the root logger (one per tensor at INFO, and a WARNING
    suggesting a pre-processing pass that only matters for static quantisation)."""

    def from_quantizer(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(from_quantizer)
    try:
        yield
    finally:
        root.removeFilter(from_quantizer)


def _trace(model: EmbeddingModel, tower: str, path: Path) -> None:
    """Export one tower in float32 with a dynamic batch axis."""
    example = _inputs(model, tower, batch=2, seed=0, trace=True)
    name = "pixels" if tower == "image" else "tokens"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about the constant above, and the exporter's notices
        torch.onnx.export(
            _Tower(model, tower).eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=[name],
            output_names=["embeddings"],
            dynamic_axes={name: {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )


def _inputs(model: EmbeddingModel, tower: str, batch: int, seed: int, trace: bool = False) -> torch.Tensor:
    """Inputs for tracing and checking: random pixels, or random token ids with the largest id at varied ends.

    For tracing, the largest id is the last token of every row: CLIP's `encode_text` runs the first max(eot)+1
    positions, which the trace fixes, and with the end-of-text last that is every position (exact for any input,
    the causal mask hides the padding).
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    if tower == "image":
        size = config.vision.image_size
        return torch.randn(batch, 3, size, size, generator=generator)
    length, vocab = config.text.context_length, config.text.vocab_size
    tokens = torch.randint(1, vocab - 1, (batch, length), generator=generator)
    if trace:
        tokens[:, -1] = vocab - 1
    elif config.family == "clip":  # end-of-text (the largest id) at varied places, padding after it
        for row, end in enumerate(torch.randint(1, length, (batch,), generator=generator).tolist()):
            tokens[row, end] = vocab - 1
            tokens[row, end + 1 :] = 0
    return tokens


def _check(model: EmbeddingModel, tower: str, run: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    """An export (`run`: its inputs -> embeddings) against the torch model on inputs it was not traced with:
    (min cosine, max abs diff)."""
    inputs = _inputs(model, tower, batch=3, seed=1)
    device = next(model.parameters()).device
    with torch.inference_mode():
        expected = _Tower(model, tower)(inputs.to(device)).float().cpu().numpy()
    got = run(inputs.numpy())
    cosine = float(
        np.min(np.sum(got * expected, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1))
    )
    return cosine, float(np.max(np.abs(got - expected)))


def _publish(root: Path, tower: str, make, model_file: str = MODEL_FILE) -> None:
    """Make a tower (its `model_file`) in a staging folder, then rename it into place (another process's fresh one
    wins)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{tower}.", suffix=".part"))
    try:
        record = make(staging)
        made = (staging / model_file).stat()
        record["file"] = {"size": made.st_size, "sha256": file_sha256(staging / model_file)}
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        final = root / tower
        if final.exists():  # stale (or made meanwhile by another process: then either copy is as good)
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{tower}.", suffix=".old"))
            try:
                os.replace(final, old / tower)
            except FileNotFoundError:
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(staging, final)
        except OSError:
            if not (final / RECORD_FILE).is_file():  # not another process's finished export
                raise
            file_sha256(final / model_file)  # that export's file, remembered so opening it does not hash it again
        else:
            # Renaming keeps the file's size, mtime and inode, so its hash is remembered under the final path
            # without reading the file again (~1 s for ViT-B/32's 350 MB); were the folder replaced meanwhile,
            # the other file's inode would not match this stamp and it would be hashed when opened.
            _remember_hash(final / model_file, record["file"]["sha256"], [made.st_size, made.st_mtime_ns, made.st_ino])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["OnnxEncoder", "ensure_export", "model_towers"]
