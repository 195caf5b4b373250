"""The numpy text tower (`retrieval.model.numpy_text`): parity with the torch tower (OpenAI's causal one and
MobileCLIP2's without the mask), its export beside the ONNX export (refused when stale or of an unknown layout), and a
library that exports the text tower once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_index_support import tiny_model

from retrieval.errors import ExportError
from retrieval.model import numpy_text, onnx_export
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS, TextConfig
from retrieval.model.family import build_towers
from retrieval.model.identity import ModelInfo
from retrieval.model.loading import load_model
from retrieval.model.numpy_text import TOWER, WEIGHTS_FILE, NumpyTextEncoder, find_numpy_text
from retrieval.model.onnx_export import ensure_export
from retrieval.model.onnx_runtime import find_export


@pytest.fixture(autouse=True)
def _own_exports(tmp_path, monkeypatch):
    """Exports of this test's own (conftest shares one folder across the session, where shapes-mini's may be)."""
    monkeypatch.setenv("CLIPSEARCH_EXPORTS", str(tmp_path / "exports"))


# The reduced MobileCLIP2-S0 of tests/test_mobileclip.py (2-layer text tower), with open_clip's outputs.
MOBILECLIP = Path(__file__).resolve().parent / "data" / "families" / "mobileclip2-s0-tiny"


def _random_text_tower(preset: str, quick_gelu: bool) -> CLIP:
    """A text tower of the preset's shape with seeded random weights and the activation asked for."""
    torch.manual_seed(0)
    model = CLIP(dataclasses.replace(PRESETS[preset], quick_gelu=quick_gelu), towers="text").eval()
    model.info = ModelInfo.for_model(model, f"random-{preset}")
    return model


def _random_mobileclip_text(text: TextConfig):
    """A MobileCLIP2-S0 text tower of the given shape with seeded random weights."""
    torch.manual_seed(0)
    model = build_towers(dataclasses.replace(PRESETS["MobileCLIP2-S0"], text=text), towers="text").eval()
    model.info = ModelInfo.for_model(model, "random-mobileclip")
    return model


def _tokens(model: CLIP, rows: int = 5) -> torch.Tensor:
    """Random token ids with the end-of-text (largest) id at varied places, the last one filling every position."""
    text = model.config.text
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, text.vocab_size - 1, (rows, text.context_length), generator=generator)
    ends = [1, 4, text.context_length // 2, 9, text.context_length - 1][:rows]
    for row, end in enumerate(ends):
        tokens[row, end] = text.vocab_size - 1
        tokens[row, end + 1 :] = 0
    return tokens


def _as_numpy(model: CLIP, folder) -> NumpyTextEncoder:
    """The model's text tower written with `write_weights` and mapped back."""
    text = model.config.text
    state = model.state_dict()
    names = numpy_text.state_dict_names(model.config.family, text.layers)
    tensors = {name: state[key].numpy() for name, key in names.items()}
    config = {
        "width": text.width,
        "heads": text.heads,
        "layers": text.layers,
        "context_length": text.context_length,
        "vocab_size": text.vocab_size,
        "embed_dim": model.config.embed_dim,
        "quick_gelu": model.config.quick_gelu,
        "causal": numpy_text.FAMILIES[model.config.family][1],
    }
    layout = numpy_text.write_weights(folder, tensors, config)
    return NumpyTextEncoder.map(model.info, layout, folder / WEIGHTS_FILE)


@pytest.mark.parametrize(
    "which",
    [
        "tiny-vit quick_gelu",
        "tiny-vit gelu",
        "shapes-mini",
        "ViT-B/32 quick_gelu",
        "ViT-B/32 gelu",
        "mobileclip2-s0-tiny",
        "mobileclip tiny",
        "mobileclip S0",
    ],
)
def test_the_numpy_tower_gives_the_torch_towers_vectors(tmp_path, which):
    if which == "shapes-mini":
        model = load_model("shapes-mini", device="cpu", towers="text")[0]
    elif which == "mobileclip2-s0-tiny":
        model = load_model(MOBILECLIP, device="cpu", towers="text")[0]
    elif which == "mobileclip tiny":
        model = _random_mobileclip_text(TextConfig(width=64, heads=2, layers=2))
    elif which == "mobileclip S0":
        model = _random_mobileclip_text(PRESETS["MobileCLIP2-S0"].text)
    else:
        preset, activation = which.split()
        model = _random_text_tower(preset, activation == "quick_gelu")
    tokens = _tokens(model)
    with torch.inference_mode():
        want = model.encode_text(tokens).numpy()
    encoder = _as_numpy(model, tmp_path)
    for rows in (slice(None), slice(2, 3), slice(4, 5)):  # a batch, and texts one at a time (one BLAS thread)
        got = encoder.encode_texts(tokens[rows].numpy())
        expected = want[rows]
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.min(np.sum(got * expected, axis=1)) >= 0.9999
        assert np.max(np.abs(got - expected)) <= 1e-5


def test_the_numpy_mobileclip_tower_gives_open_clips_vectors(tmp_path):
    model = load_model(MOBILECLIP, device="cpu", towers="text")[0]
    with np.load(MOBILECLIP / "reference.npz") as reference:
        tokens, want = reference["tokens"], reference["text_features"]
    got = _as_numpy(model, tmp_path).encode_texts(tokens)
    assert np.min(np.sum(got * want, axis=1)) >= 0.9999
    assert np.max(np.abs(got - want)) <= 1e-5


def test_tokens_of_another_length_are_refused(tmp_path):
    encoder = _as_numpy(tiny_model()[0], tmp_path)
    with pytest.raises(ValueError, match="context length"):
        encoder.encode_texts(np.zeros((1, 5), np.int64))


def test_ensure_export_writes_the_numpy_tower_and_a_changed_file_is_never_used(tmp_path):
    model = load_model("shapes-mini", device="cpu", towers="text")[0]
    root = ensure_export(model)
    folder = find_numpy_text(model.info)
    assert folder == root / TOWER
    record = json.loads((folder / "export.json").read_text())
    assert record["check"]["cosine_min"] >= 0.9999 and record["tower"] == TOWER
    tokens = _tokens(model, rows=3)
    with torch.inference_mode():
        want = model.encode_text(tokens).numpy()
    np.testing.assert_allclose(NumpyTextEncoder.open(folder).encode_texts(tokens.numpy()), want, atol=1e-5, rtol=0)

    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(data))
    assert find_numpy_text(model.info) is None
    with pytest.raises(ExportError, match="stale.*does not match its record"):
        NumpyTextEncoder.open(folder)

    other = dataclasses.replace(model.info, weights_sha256="0" * 64)
    assert find_numpy_text(other) is None  # another model's weights are never found under its identity
    ensure_export(model)  # made again in place
    assert find_numpy_text(model.info) == folder


def test_ensure_export_writes_mobileclips_numpy_tower_without_the_causal_mask(tmp_path):
    model = load_model(MOBILECLIP, device="cpu", towers="text")[0]
    assert model.info.tokenizer == "clip-bpe" and numpy_text.supports(model.config.family, model.info)
    root = ensure_export(model)
    folder = find_numpy_text(model.info)
    assert folder == root / TOWER
    record = json.loads((folder / "export.json").read_text())
    assert record["text"]["causal"] is False and record["text"]["format"] == numpy_text.FORMAT
    assert record["check"]["cosine_min"] >= 0.9999
    tokens = _tokens(model, rows=5)
    with torch.inference_mode():
        want = model.encode_text(tokens).numpy()
    np.testing.assert_allclose(NumpyTextEncoder.open(folder).encode_texts(tokens.numpy()), want, atol=1e-5, rtol=0)


def test_a_record_of_the_first_layout_is_read_as_causal_and_an_unknown_layout_is_stale(tmp_path):
    model = load_model("shapes-mini", device="cpu", towers="text")[0]
    folder = ensure_export(model) / TOWER
    path = folder / "export.json"
    record = json.loads(path.read_text())
    tokens = _tokens(model, rows=3).numpy()
    want = NumpyTextEncoder.open(folder).encode_texts(tokens)
    for key in ("format", "causal"):  # as written before MobileCLIP2
        del record["text"][key]
    path.write_text(json.dumps(record))
    assert find_numpy_text(model.info) == folder
    np.testing.assert_array_equal(NumpyTextEncoder.open(folder).encode_texts(tokens), want)

    record["text"]["format"] = numpy_text.FORMAT + 1
    path.write_text(json.dumps(record))
    assert find_numpy_text(model.info) is None  # a cold query falls back to the ONNX export
    with pytest.raises(ExportError, match="stale.*numpy format 3"):
        NumpyTextEncoder.open(folder)


def test_a_model_the_numpy_tower_does_not_cover_gets_only_its_onnx_export(tmp_path):
    model = _random_text_tower("tiny-vit", quick_gelu=True)
    model.info = dataclasses.replace(model.info, tokenizer="hf:0123456789abcdef")  # a hub tokenizer's ids
    ensure_export(model)
    assert find_export(model.info, towers="text") is not None
    assert find_numpy_text(model.info) is None


def test_a_one_shot_library_exports_the_text_tower_once(tmp_path, monkeypatch):
    from test_index_support import write_images

    from clipsearch.library import Library

    write_images(tmp_path / "photos", 3)
    Library(db=tmp_path / "db", model="shapes-mini", device="cpu").index([tmp_path / "photos"], workers=0)
    exports = []
    real = onnx_export.ensure_export

    def counting(model, precision="float32", towers="both"):
        exports.append((precision, towers))
        return real(model, precision, towers)

    monkeypatch.setattr(onnx_export, "ensure_export", counting)
    first = Library(db=tmp_path / "db", model="shapes-mini", text_precision="float32")
    assert first._onnx_text_encoder(1) is None  # no text export yet: this query runs in torch and makes one
    vector = first.encode("a red circle")
    assert exports == [("float32", "text")]
    info = load_model("shapes-mini", device="cpu", towers="text")[0].info
    assert find_numpy_text(info) is not None and find_export(info, towers="text") is not None

    second = Library(db=tmp_path / "db", model="shapes-mini", text_precision="float32")
    np.testing.assert_allclose(second.encode("a red circle"), vector, atol=1e-5, rtol=0)
    assert isinstance(second._onnx_text, NumpyTextEncoder) and exports == [("float32", "text")]
