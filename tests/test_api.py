"""The public embedding API (`clipsearch.embed_images`, `embed_texts`, `load_model`) and `clipsearch models`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import clipsearch
from clipsearch.cli import cli
from retrieval.errors import ImageLoadError
from retrieval.model.checkpoint import save_checkpoint
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS
from retrieval.model.download import cache_dir
from retrieval.model.encode import encode_images, encode_texts
from retrieval.model.registry import ModelSpec, available_models

TEXTS = ["a red circle", "a large blue square on the left of a very busy grey striped background", "a"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model saved in our format, and the in-memory original."""
    torch.manual_seed(0)
    model = CLIP(PRESETS["tiny-vit"]).eval()
    folder = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", name="tiny")
    return folder, model


@pytest.fixture
def photos(tmp_path):
    """Five real image files of different formats, sizes and modes."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (suffix, size, mode) in enumerate(
        [(".jpg", (50, 40), "RGB"), (".png", (33, 61), "RGBA"), (".webp", (40, 40), "RGB"), (".png", (20, 30), "L")]
        + [(".tif", (64, 48), "RGB")]
    ):
        pixels = rng.integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
        path = tmp_path / f"photo{i}{suffix}"
        image.save(path)
        paths.append(path)
    return paths


def test_embed_images_from_paths_and_pil_images(checkpoint, photos):
    folder, original = checkpoint
    preprocess = clipsearch.load_model(folder)[1]

    from_paths = clipsearch.embed_images(photos, model=str(folder), batch_size=2)
    from_images = clipsearch.embed_images([Image.open(p) for p in photos], model=folder)

    assert from_paths.dtype == np.float32 and from_paths.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1.0, atol=1e-6)
    expected = encode_images(original, torch.stack([preprocess(p) for p in photos]))
    np.testing.assert_allclose(from_paths, expected, atol=1e-6)  # batches of 2 keep the input order
    np.testing.assert_allclose(from_images, expected, atol=1e-6)


def test_embed_images_takes_a_model_a_pair_or_one_image(checkpoint, photos):
    folder, original = checkpoint
    loaded = clipsearch.load_model(folder)

    by_model = clipsearch.embed_images(photos[:2], model=original)
    by_pair = clipsearch.embed_images(photos[:2], model=loaded)
    single = clipsearch.embed_images(photos[0], model=loaded)

    np.testing.assert_array_equal(by_model, by_pair)  # same batch, same threads: the same arithmetic
    # One image alone and the same image in a batch of two take different kernels (and thread splits).
    np.testing.assert_allclose(single, by_pair[:1], rtol=0, atol=1e-6)


def test_embed_images_shows_progress_on_stderr(checkpoint, photos, capsys):
    clipsearch.embed_images(photos, model=checkpoint[1], progress=True)
    assert "embedding images" in capsys.readouterr().err


def test_a_bad_image_names_the_file(checkpoint, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not really a jpeg")
    with pytest.raises(ImageLoadError, match=r"broken\.jpg"):
        clipsearch.embed_images([photos[0], broken], model=checkpoint[1])


def test_embed_texts(checkpoint):
    folder, original = checkpoint

    vectors = clipsearch.embed_texts(TEXTS, model=folder)
    one_by_one = np.concatenate([clipsearch.embed_texts(t, model=folder, batch_size=1) for t in TEXTS])

    assert vectors.dtype == np.float32 and vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-6)  # length-sorted batching keeps the order
    np.testing.assert_allclose(vectors, encode_texts(original, TEXTS), atol=1e-6)
    assert clipsearch.embed_texts([], model=folder).shape == (0, 64)


def test_over_long_text_is_truncated_not_refused(checkpoint):
    long_text = "a photo of " + "a very big dog and " * 40
    assert clipsearch.embed_texts([long_text], model=checkpoint[1]).shape == (1, 64)


def test_default_model_comes_from_clipsearch_model(checkpoint, monkeypatch):
    folder, original = checkpoint
    monkeypatch.setenv("CLIPSEARCH_MODEL", str(folder))
    np.testing.assert_array_equal(clipsearch.embed_texts(TEXTS), clipsearch.embed_texts(TEXTS, model=folder))


def test_a_wrong_model_argument_is_a_type_error():
    with pytest.raises(TypeError, match="model must be a name, a path, a CLIP"):
        clipsearch.embed_texts(["x"], model=42)


def test_public_names_resolve():
    assert clipsearch.available_models() == available_models()
    assert "ViT-B/32" in clipsearch.available_models()
    assert callable(clipsearch.load_model) and callable(clipsearch.embed_images) and callable(clipsearch.embed_texts)


def test_models_command_table():
    cache_dir().mkdir(parents=True)
    (cache_dir() / "ViT-B-16.pt").write_bytes(b"\0" * 2_500_000)

    result = CliRunner().invoke(cli, ["models"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "DIM", "DOWNLOAD", "FLICKR_T2I_R@1", "SPEED", "STATUS"]
    table = lines[1 : lines.index("")]
    rows = {line[1:].split()[0]: line[1:].split() for line in table}
    assert set(rows) == set(available_models())
    assert table[available_models().index("MobileCLIP2-S0")].startswith("*MobileCLIP2-S0")
    assert rows["ViT-B/32"] == ["ViT-B/32", "CLIP", "512", "338", "MB", "58.8", "1.00", "not", "cached"]
    assert rows["ViT-B/16"][-1] == "cached" and rows["RN50"][-2:] == ["not", "cached"]
    assert rows["ViT-B-32/laion2b_s34b_b79k"][1:6] == ["OpenCLIP", "512", "605", "MB", "66.8"]
    assert rows["ViT-B-16-SigLIP2-256"][1:3] == ["SigLIP2", "768"] and rows["ViT-B-16-SigLIP2-256"][5] == "-"
    assert rows["MobileCLIP2-S0"][1:6] == ["MobileCLIP2", "512", "300", "MB", "69.2"]
    assert rows["shapes-mini"][-1] in ("bundled", "missing")
    dim_end = lines[0].index("DIM") + len("DIM")  # the columns stay aligned whatever the family's name
    assert all(line[dim_end - 5 : dim_end].strip().isdigit() and line[dim_end] == " " for line in table)
    assert "openclip_retrieval_results.csv" in result.output and "--bench" in result.output
    assert lines[-1] == f"downloads go to {cache_dir()}"


def test_models_command_json(monkeypatch):
    monkeypatch.setenv("CLIPSEARCH_MODEL", "RN50")

    result = CliRunner().invoke(cli, ["models", "--json"])

    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [row["name"] for row in rows] == available_models()
    by_name = {row["name"]: row for row in rows}
    assert by_name["RN50"]["default"] and not by_name["ViT-B/32"]["default"]
    assert by_name["ViT-L/14"] == {
        "name": "ViT-L/14",
        "status": "not cached",
        "size_bytes": None,
        "path": str(cache_dir() / "ViT-L-14.pt"),
        "default": False,
        "description": "OpenAI CLIP ViT-L/14, 224 px, 768-d",
        "family": "CLIP",
        "embed_dim": 768,
        "download_mb": 890,
        "flickr_t2i_r1": 64.96,
        "flickr_source": "open_clip docs/openclip_retrieval_results.csv (Flickr image retr. R@1)",
        "speed_vs_vit_b32": None,
        "speed_measured_here": False,
    }
    siglip = by_name["ViT-B-32-SigLIP2-256"]
    assert siglip["path"] == str(cache_dir() / "hub" / "timm--ViT-B-32-SigLIP2-256" / "main")
    assert siglip["flickr_t2i_r1"] is None and siglip["status"] == "not cached"


def test_models_command_help_has_examples():
    result = CliRunner().invoke(cli, ["models", "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "clipsearch models --json" in result.output


def test_models_bench_fills_the_speed_column(monkeypatch):
    from retrieval.model import registry, speed

    # Small architectures keep the run short; the measurement and the table are the real ones.
    monkeypatch.setattr(speed, "REFERENCE", "tiny-vit")
    specs = [ModelSpec(n, "", path=Path("/nonexistent"), arch=a) for n, a in (("a", "tiny-vit"), ("b", "tiny-rn"))]
    monkeypatch.setattr(registry, "_REGISTRY", {s.name: s for s in specs})

    result = CliRunner().invoke(cli, ["models", "--bench", "--json"])

    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == ["a", "b"]
    assert all(isinstance(r["speed_vs_vit_b32"], float) and r["speed_vs_vit_b32"] > 0 for r in rows)
    table = CliRunner().invoke(cli, ["models"])
    assert "measure with --bench" in table.output
