"""MobileCLIP2 (FastViT-MCi image tower, non-causal CLIP text tower) against open_clip + timm, through fixtures.

`benchmarks/make_family_fixtures.py --only mobileclip` (run where open_clip, timm and torchvision are installed)
wrote `tests/data/families/mobileclip2-s0-tiny/`: a reduced MobileCLIP2-S0 (FastViT-MCi0's layout at stem width 8,
64 px, 2-layer text tower) saved by open_clip in its train-time form with non-trivial BatchNorm statistics,
open_clip's outputs before and after timm's `reparameterize_model`, and timm's re-parameterised state dict; and
`mobileclip2-full-shapes.json`: the full-size S0/S2 tensor shapes and parameter counts of both forms.
Tolerances: embeddings 1e-5 max abs difference and cosine >= 0.99999 (float32); pixels 1e-6; fused tensors 1e-5.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from retrieval.errors import CheckpointError, ModelMismatchError
from retrieval.model.checkpoint import read_checkpoint
from retrieval.model.config import PRESETS, CLIPConfig
from retrieval.model.convert_mobileclip import reparameterize_state_dict
from retrieval.model.family import build_towers
from retrieval.model.loading import load_model

FAMILIES = Path(__file__).resolve().parent / "data" / "families"
FIXTURE = FAMILIES / "mobileclip2-s0-tiny"
TOL = 1e-5


def _reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def _embed(model, ref: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(torch.from_numpy(ref["pixels"])), model.encode_text(torch.from_numpy(ref["tokens"]))


def _assert_close(ours: torch.Tensor, reference: np.ndarray) -> None:
    expected = torch.from_numpy(reference)
    assert (ours - expected).abs().max() <= TOL
    assert torch.nn.functional.cosine_similarity(ours, expected).min() >= 0.99999


@pytest.mark.parametrize("source", ["folder", "weights file"])
def test_train_time_checkpoint_matches_open_clip(source):
    ref = _reference()
    path = FIXTURE if source == "folder" else FIXTURE / "open_clip_model.safetensors"
    model, preprocess = load_model(path)
    assert model.config.family == "mobileclip" and model.config.vision.layers == (2, 1, 1, 2)
    image, text = _embed(model, ref)
    _assert_close(image, ref["image_features"])
    _assert_close(text, ref["text_features"])
    pixels = preprocess(Image.open(io.BytesIO(ref["image_png"].tobytes())))
    assert torch.allclose(pixels, torch.from_numpy(ref["pixels"][0]), atol=1e-6, rtol=0)


def test_reparameterised_tower_equals_the_train_time_form():
    ref = _reference()
    # The reference's own two forms agree: the train-time outputs are what our fused tower must give.
    assert np.abs(ref["image_features"] - ref["image_features_reparam"]).max() <= TOL
    checkpoint = read_checkpoint(FIXTURE)
    timm_fused = load_file(FIXTURE / "timm_reparameterized.safetensors")
    fused_keys = {k for k in checkpoint.state_dict if ".reparam_conv." in k}
    assert len(fused_keys) == 2 * 15  # 3 stem + 3x2 patch embedding + 4 mixer + 1 positional + 1 final conv
    for key, tensor in checkpoint.state_dict.items():
        assert torch.allclose(tensor, timm_fused[key].float(), atol=TOL, rtol=0), key
    assert {k for k in timm_fused if not k.endswith("num_batches_tracked")} == set(checkpoint.state_dict)

    model, _ = load_model(FIXTURE, towers="image")
    _assert_close(_embed_image(model, ref), ref["image_features"])
    timm_model, _ = load_model(FIXTURE / "timm_reparameterized.safetensors", towers="image")
    _assert_close(_embed_image(timm_model, ref), ref["image_features_reparam"])


def _embed_image(model, ref: dict[str, np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image(torch.from_numpy(ref["pixels"]))


@pytest.mark.parametrize("name", ["MobileCLIP2-S0", "MobileCLIP2-S2"])
def test_full_size_towers_have_the_references_shapes_and_parameter_counts(name):
    reference = json.loads((FAMILIES / "mobileclip2-full-shapes.json").read_text())[name]
    with torch.device("meta"):
        model = build_towers(PRESETS[name])
    assert sum(p.numel() for p in model.visual.parameters()) == reference["visual_params_reparam"]
    assert sum(p.numel() for p in model.text.parameters()) == reference["text_params"]
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if k.startswith("visual.")}
    fused = {k: v for k, v in reference["reparam_shapes"].items() if not k.endswith("num_batches_tracked")}
    assert ours == fused

    # The published (train-time) layout converts to exactly these shapes, and gives back the preset's config.
    train = {k: torch.empty(shape, device="meta") for k, shape in reference["train_shapes"].items()}
    train |= {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    assert CLIPConfig.from_state_dict(train) == PRESETS[name]
    converted = reparameterize_state_dict(train, PRESETS[name], "both")
    assert {k: list(v.shape) for k, v in converted.items() if k.startswith("visual.")} == ours


def test_a_checkpoint_missing_a_branch_or_with_a_wrong_shape_is_refused_in_one_line(tmp_path):
    tensors = load_file(FIXTURE / "open_clip_model.safetensors")
    shutil.copy(FIXTURE / "open_clip_config.json", tmp_path / "open_clip_config.json")
    broken = dict(tensors)
    del broken["visual.trunk.stages.1.downsample.proj.0.large_conv.bn.running_var"]
    save_file(broken, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(CheckpointError, match="stages.1.downsample.proj.0 lacks its branch 'running_var'") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)

    broken = dict(tensors)
    broken["visual.trunk.head.fc.weight"] = broken["visual.trunk.head.fc.weight"][:, :-1].contiguous()
    save_file(broken, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"visual.trunk.head.fc.weight: shape \(64, 127\), expected \(64, 128\)"):
        load_model(tmp_path)


def test_text_tower_reads_every_position_and_needs_full_length_tokens():
    model, _ = load_model(FIXTURE, towers="text")
    tokens = torch.from_numpy(_reference()["tokens"][:1])
    with torch.no_grad():
        before = model.encode_text(tokens)
        padded = tokens.clone()
        padded[0, -1] = 7  # a token after the end-of-text one changes the result: there is no causal mask
        assert not torch.allclose(before, model.encode_text(padded), atol=1e-4)
    with pytest.raises(ValueError, match="padded to its context length 77"):
        model.encode_text(tokens[:, :20])


def test_saved_and_reloaded_in_our_format_gives_the_same_embeddings(tmp_path):
    from retrieval.model.checkpoint import save_checkpoint

    model, _ = load_model(FIXTURE)
    save_checkpoint(model, tmp_path / "ours")
    again, preprocess = load_model(tmp_path / "ours")
    ref = _reference()
    _assert_close(_embed(again, ref)[0], ref["image_features"])
    assert (preprocess.interpolation, preprocess.mean) == ("bilinear", (0.0, 0.0, 0.0))


def test_identity_records_bilinear_resizing_and_keeps_stores_apart(tmp_path):
    from retrieval.model.identity import ModelInfo
    from retrieval.store import Store

    model, _ = load_model(FIXTURE, towers="image")
    info = model.info
    assert (info.interpolation, info.resize_mode, info.tokenizer) == ("bilinear", "shortest", "clip-bpe")
    written_before = {k: v for k, v in info.to_dict().items() if k != "interpolation"}
    assert ModelInfo.from_dict(written_before).interpolation == "bicubic"  # what every model used before

    Store.open(tmp_path / "db", info, create=True)
    with pytest.raises(ModelMismatchError):
        Store.open(tmp_path / "db", dataclasses.replace(info, interpolation="bicubic"), create=True)


def test_onnx_export_matches_torch_and_open_clip():
    from retrieval.model.onnx_export import ensure_export
    from retrieval.model.onnx_runtime import OnnxEncoder

    ref = _reference()
    model, _ = load_model(FIXTURE, device="cpu")
    encoder = OnnxEncoder.open(ensure_export(model))  # what `index` and `query` run on a CPU
    rng = np.random.default_rng(3)
    for batch in (1, 3):
        pixels = np.concatenate([ref["pixels"], rng.standard_normal((batch, *ref["pixels"].shape[1:]))])
        pixels = pixels[:batch].astype(np.float32)
        with torch.inference_mode():
            expected = model.encode_image(torch.from_numpy(pixels))
        _assert_onnx_close(encoder.encode_images(pixels), expected)
    _assert_close(torch.from_numpy(encoder.encode_images(ref["pixels"])), ref["image_features"])
    with torch.inference_mode():
        expected = model.encode_text(torch.from_numpy(ref["tokens"]))
    got = encoder.encode_texts(ref["tokens"])
    _assert_onnx_close(got, expected)
    _assert_close(torch.from_numpy(got), ref["text_features"])


def _assert_onnx_close(got: np.ndarray, expected: torch.Tensor) -> None:
    """The export's bar (`onnx_export.MIN_COSINE` for float32), and 1e-4 as test_onnx holds the other families."""
    expected = expected.numpy()
    cosines = np.sum(got * expected, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert got.shape == expected.shape and cosines.min() >= 0.9999 and np.abs(got - expected).max() <= 1e-4


def test_registry_lists_mobileclip2_from_its_hub_repositories():
    from retrieval.model.registry import get_spec

    for name in ("MobileCLIP2-S0", "MobileCLIP2-S2"):
        spec = get_spec(name)
        repo = f"timm/{name}-OpenCLIP"
        assert (spec.hub_repo, spec.revision, spec.arch, spec.family) == (repo, "main", name, "MobileCLIP2")
        assert "open_clip_model.safetensors" in spec.files and "open_clip_config.json" in spec.files


def test_index_and_query_through_the_cli_with_mobileclip(tmp_path, caplog):
    from click.testing import CliRunner

    from clipsearch.cli import cli
    from retrieval.model.checkpoint import save_checkpoint
    from retrieval.model.config import TextConfig
    from retrieval.model.encode import encode_images, encode_texts

    # The fixture's image tower (random, but well-conditioned like trained weights) with a random text tower over
    # CLIP's whole vocabulary, so real queries tokenize.
    fixture, _ = load_model(FIXTURE)
    config = dataclasses.replace(fixture.config, text=TextConfig(width=64, heads=1, layers=1))
    torch.manual_seed(0)
    model = build_towers(config).eval()
    model.visual.load_state_dict(fixture.visual.state_dict())
    save_checkpoint(model, tmp_path / "model", name="tiny-mobileclip")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        coarse = (rng.random((3, 3, 3)) * 255).astype(np.uint8)
        Image.fromarray(coarse).resize((80, 60), Image.Resampling.BICUBIC).save(photos / f"p{i}.png")
    model_dir, db = tmp_path / "model", tmp_path / "db"
    runner = CliRunner()
    indexed = runner.invoke(cli, ["index", str(photos), "--model", str(model_dir), "--db", str(db), "--workers", "0"])
    assert indexed.exit_code == 0, indexed.output
    query = "a red square " * 30  # longer than 77 tokens: said once, then searched with its start
    result = runner.invoke(cli, ["query", query, "--model", str(model_dir), "--db", str(db), "--json", "-t", "4"])
    assert result.exit_code == 0, result.output
    assert [r.message for r in caplog.records if "longer than the model's 77 tokens" in r.message]
    rows = [json.loads(line) for line in result.stdout.splitlines()]

    model, preprocess = load_model(model_dir)
    paths = sorted(photos.iterdir())
    scores = encode_images(model, torch.stack([preprocess(p) for p in paths])) @ encode_texts(model, [query])[0]
    expected = sorted(zip(scores.tolist(), [p.name for p in paths], strict=True), reverse=True)
    assert [Path(r["path"]).name for r in rows] == [name for _, name in expected]
    assert np.allclose([r["score"] for r in rows], [s for s, _ in expected], atol=1e-5)
