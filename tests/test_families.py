"""Parity with the reference implementations for every model family, through stored fixtures.

`benchmarks/make_family_fixtures.py` (run where open_clip, timm and torchvision are installed) built tiny
models of each family with open_clip, saved them in open_clip's hub layout (`open_clip_model.safetensors`,
`open_clip_config.json`, and for SigLIP2 the Gemma-style `tokenizer.json`), and stored open_clip's
preprocessed pixels, embeddings and token ids in `reference.npz`. Here `load_model` reads those files with
no reference code at hand. Tolerance: 1e-5 max abs difference (float32) for embeddings, 1e-6 for pixels.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.errors import TokenizerError
from retrieval.model.hub_tokenizer import HubTokenizer
from retrieval.model.loading import load_model

FIXTURES = Path(__file__).resolve().parent / "data" / "families"
FAMILIES = ["siglip2-b32-tiny", "siglip2-b16-tiny", "openclip-b32-256-tiny", "openclip-b16-quickgelu-tiny"]
TOL = 1e-5


def _reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def _check_embeddings(model, ref: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(ref["pixels"]))
        if ref["texts"].size:
            tokens = model.tokenize([str(t) for t in ref["texts"]])
            assert tokens.tolist() == ref["tokens"].tolist()
        else:
            tokens = torch.from_numpy(ref["tokens"])
        text = model.encode_text(tokens)
    assert torch.allclose(image, torch.from_numpy(ref["image_features"]), atol=TOL, rtol=0)
    assert torch.allclose(text, torch.from_numpy(ref["text_features"]), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_hub_folder_matches_open_clip(name):
    ref = _reference(name)
    model, preprocess = load_model(FIXTURES / name)
    _check_embeddings(model, ref)
    image = Image.open(io.BytesIO(ref["image_png"].tobytes()))
    assert torch.allclose(preprocess(image), torch.from_numpy(ref["pixels"][0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_weights_file_with_its_open_clip_config_matches_open_clip(name):
    model, _ = load_model(FIXTURES / name / "open_clip_model.safetensors")
    _check_embeddings(model, _reference(name))


def test_siglip_architecture_is_inferred_from_the_tensors_alone(tmp_path):
    # B/16 SigLIP towers use exact GELU, the default when no open_clip_config.json says otherwise.
    for file in ("open_clip_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "siglip2-b16-tiny" / file, tmp_path / file)
    model, preprocess = load_model(tmp_path / "open_clip_model.safetensors")
    assert model.config.family == "siglip"
    assert (preprocess.mean, preprocess.resize_mode) == ((0.5, 0.5, 0.5), "squash")
    _check_embeddings(model, _reference("siglip2-b16-tiny"))


def test_siglip_identity_records_its_preprocessing_and_tokenizer():
    model, _ = load_model(FIXTURES / "siglip2-b32-tiny", towers="image")
    info = model.info
    assert (info.mean, info.std, info.resize_mode) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash")
    assert info.tokenizer.startswith("hf:") and len(info.tokenizer) == 3 + 16
    clip, _ = load_model(FIXTURES / "openclip-b32-256-tiny")
    assert (clip.info.resize_mode, clip.info.tokenizer) == ("shortest", "clip-bpe")


def test_siglip_without_its_tokenizer_says_where_to_put_it(tmp_path):
    shutil.copy(FIXTURES / "siglip2-b16-tiny" / "open_clip_model.safetensors", tmp_path / "weights.safetensors")
    model, _ = load_model(tmp_path / "weights.safetensors")
    assert model.info.tokenizer == "none"
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        model.tokenize(["a cat"])


def test_tokenizer_ids_match_open_clip_on_the_corpus():
    lines = (FIXTURES / "tokenizer_golden.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    assert len({r["text"] for r in records}) >= 300
    assert any(r["text"] == "" for r in records) and any(len(r["text"]) > 500 for r in records)
    tokenizers = {}
    for record in records:
        length = record["context_length"]
        if length not in tokenizers:
            tokenizers[length] = HubTokenizer(FIXTURES / "siglip2-b32-tiny" / "tokenizer.json", length)
        assert tokenizers[length]([record["text"]])[0].tolist() == record["ids"], record["text"]


def test_index_and_query_through_the_cli_with_siglip(tmp_path):
    from click.testing import CliRunner

    from clipsearch.cli import cli
    from retrieval.model.encode import encode_images, encode_texts

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        coarse = (rng.random((3, 3, 3)) * 255).astype(np.uint8)
        Image.fromarray(coarse).resize((80, 60), Image.Resampling.BICUBIC).save(photos / f"p{i}.png")
    model_dir, db = FIXTURES / "siglip2-b32-tiny", tmp_path / "db"
    indexed = CliRunner().invoke(
        cli, ["index", str(photos), "--model", str(model_dir), "--db", str(db), "--workers", "0"]
    )
    assert indexed.exit_code == 0, indexed.output
    result = CliRunner().invoke(
        cli, ["query", "a red square", "--model", str(model_dir), "--db", str(db), "--json", "-t", "4"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]

    model, preprocess = load_model(model_dir)
    paths = sorted(photos.iterdir())
    images = encode_images(model, torch.stack([preprocess(p) for p in paths]))
    scores = images @ encode_texts(model, ["a red square"])[0]
    expected = sorted(zip(scores.tolist(), [str(p) for p in paths], strict=True), reverse=True)
    assert [Path(r["path"]).name for r in rows] == [Path(p).name for _, p in expected]
    assert np.allclose([r["score"] for r in rows], [s for s, _ in expected], atol=1e-5)


def test_benchmarks_run_with_siglip(tmp_path, capsys):
    from benchmarks import recall_at_k, zero_shot
    from retrieval import shapes

    model = str(FIXTURES / "siglip2-b32-tiny")  # the CLIP fixtures' vocabularies are too small for real text
    assert zero_shot.main(["--model", model, "--generated", "shape", "--n-per-class", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["images"] == 8
    shapes.generate(tmp_path / "set", 6, seed=21, size_range=(32, 64))
    assert (
        recall_at_k.main([str(tmp_path / "set" / "manifest.jsonl"), "--model", model, "--workers", "0", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["images"] == 6


def test_fine_tuning_a_siglip_model_is_refused_with_a_clear_error(tmp_path):
    from retrieval.errors import TrainingError
    from retrieval.training.trainer import TrainConfig, train

    siglip = str(FIXTURES / "siglip2-b32-tiny")
    config = TrainConfig(data="shapes:8:1", out_dir=str(tmp_path / "run"), init_from=siglip, epochs=1, batch_size=4)
    with pytest.raises(TrainingError, match="siglip model; fine-tuning works for CLIP models only"):
        train(config, progress=False)


def test_old_store_identities_are_unchanged_and_new_fields_keep_stores_apart(tmp_path):
    import dataclasses

    from retrieval.errors import ModelMismatchError
    from retrieval.model.identity import ModelInfo
    from retrieval.model.preprocess import CLIP_MEAN, CLIP_STD
    from retrieval.store import Store

    written_before_siglip = {
        "name": "ViT-B/32",
        "weights_sha256": "ab" * 32,
        "embed_dim": 512,
        "image_size": 224,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
    }
    info = ModelInfo.from_dict(written_before_siglip)
    assert (info.resize_mode, info.tokenizer) == ("shortest", "clip-bpe")
    assert info.table_name == "images_vit_b_32_abababababab"

    Store.open(tmp_path / "db", info, create=True)
    squashed = dataclasses.replace(info, resize_mode="squash")
    with pytest.raises(ModelMismatchError):
        Store.open(tmp_path / "db", squashed, create=True)
