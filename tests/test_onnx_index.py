"""Indexing and querying through ONNX Runtime on a real store: the vectors the torch path would store, and int8
encoders kept in a table of their own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clipsearch.cli import cli
from clipsearch.library import Library
from retrieval.model.identity import ModelInfo
from retrieval.model.loading import load_model
from retrieval.model.onnx_runtime import find_export
from retrieval.store import Store


@pytest.fixture(autouse=True)
def _own_exports(tmp_path, monkeypatch):
    """Each test starts without exports, so what a run exports is its own doing."""
    monkeypatch.setenv("CLIPSEARCH_EXPORTS", str(tmp_path / "exports"))


def _photos(folder: Path, n: int = 6) -> Path:
    folder.mkdir()
    for i in range(n):
        coarse = (np.random.default_rng(i).random((3, 3, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(coarse).resize((120, 90), Image.Resampling.BICUBIC)
        image.save(folder / f"{i}.jpg" if i % 2 else folder / f"{i}.png")
    return folder


def _vectors_by_name(store: Store) -> dict[str, np.ndarray]:
    ids = store.ids()
    rows = store.rows(ids, columns=["id", "path"])
    vectors = store.vectors_for(ids)
    by_id = {int(row["id"]): Path(row["path"]).name for row in rows}
    return {by_id[int(i)]: v for i, v in zip(ids, vectors, strict=True)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_default_cpu_index_runs_onnx_and_stores_the_torch_vectors(tmp_path, tiny):
    photos = _photos(tmp_path / "photos")
    default = Library(db=tmp_path / "onnx", model=tiny, device="cpu")
    torch_path = Library(db=tmp_path / "torch", model=tiny, device="cpu", runtime="torch", text_precision="float32")
    model, _ = load_model(tiny, device="cpu", towers="image")
    assert torch_path.index(photos, workers=0, progress=False).indexed == 6
    assert find_export(model.info, towers="image") is None  # the torch runtime exports nothing
    assert default.index(photos, workers=1, progress=False, batch_size=4).indexed == 6
    assert find_export(model.info, towers="image") is not None  # the default run on a CPU made (and used) it
    got, expected = _vectors_by_name(default.store()), _vectors_by_name(torch_path.store())
    assert sorted(got) == sorted(expected) == sorted(p.name for p in photos.iterdir())
    cosines = [_cosine(got[name], expected[name]) for name in expected]
    assert min(cosines) >= 0.9999
    # Queries encode the same way: a text and an unindexed image.
    for query in ("a red circle", Path(photos / "1.jpg")):
        assert _cosine(default.encode(query), torch_path.encode(query)) >= 0.9999
    assert [r.path for r in default.search("a red circle", k=6)] == [
        r.path for r in torch_path.search("a red circle", k=6)
    ]


def _index(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["index", *args, "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_int8_indexes_into_a_table_of_its_own_and_queries_name_it(tmp_path, tiny):
    photos, db = _photos(tmp_path / "photos"), str(tmp_path / "db")
    int8 = _index(str(photos), "--model", str(tiny), "--db", db, "--precision", "int8")
    float32 = _index(str(photos), "--model", str(tiny), "--db", db)
    assert int8["table"].endswith("_int8") and int8["table"] == float32["table"] + "_int8"
    assert int8["indexed"] == float32["indexed"] == 6
    assert {m.model.precision for m in Store.models(db)} == {"float32", "int8"}

    def top(*extra: str) -> list[str]:
        result = CliRunner().invoke(cli, ["query", "a red circle", "--model", str(tiny), "--db", db, "--plain", *extra])
        assert result.exit_code == 0, result.output
        return [line.split("\t")[1] for line in result.output.splitlines()]

    assert sorted(top("--precision", "int8")) == sorted(top()) and len(top()) == 6
    # The int8 vectors are near the float32 ones, in a space of their own.
    model, _ = load_model(tiny, device="cpu", towers="image")
    stores = {p: Store.open(db, ModelInfo(**{**model.info.to_dict(), "precision": p})) for p in ("float32", "int8")}
    got, expected = _vectors_by_name(stores["int8"]), _vectors_by_name(stores["float32"])
    assert min(_cosine(got[n], expected[n]) for n in expected) >= 0.99
    assert any(not np.allclose(got[n], expected[n], atol=1e-6) for n in expected)


def test_int8_only_store_queried_without_precision_says_what_to_pass(tmp_path, tiny):
    photos, db = _photos(tmp_path / "photos"), str(tmp_path / "db")
    _index(str(photos), "--model", str(tiny), "--db", db, "--precision", "int8")
    result = CliRunner().invoke(cli, ["query", "a red circle", "--model", str(tiny), "--db", db])
    assert result.exit_code != 0
    assert "--precision int8" in result.output


def test_int8_in_torch_is_refused_before_anything_is_stored(tmp_path, tiny):
    photos, db = _photos(tmp_path / "photos"), tmp_path / "db"
    args = ["index", str(photos), "--model", str(tiny), "--db", str(db), "--workers", "0", "--precision", "int8"]
    result = CliRunner().invoke(cli, [*args, "--runtime", "torch"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: int8 encoders run in ONNX Runtime on the CPU only: drop --precision int8, or use --device cpu "
        "(and not --runtime torch)"
    )
    assert not db.exists() or not list(Store.models(db))


def test_precision_is_part_of_the_identity_only_when_not_float32():
    before = {"name": "ViT-B/32", "weights_sha256": "ab" * 32, "embed_dim": 512, "image_size": 224}
    before.update(mean=[0.5] * 3, std=[0.5] * 3)
    info = ModelInfo.from_dict(before)
    assert info.precision == "float32" and info.table_name == "images_vit_b_32_abababababab"
    int8 = ModelInfo.from_dict({**info.to_dict(), "precision": "int8"})
    assert int8.table_name == "images_vit_b_32_abababababab_int8" and ModelInfo.from_dict(int8.to_dict()) == int8


@pytest.mark.parametrize("precision", ["int4", ""])
def test_an_unknown_precision_is_refused(tmp_path, tiny, precision):
    with pytest.raises(ValueError, match="precision must be one of float32, int8"):
        Library(db=tmp_path / "db", model=tiny, precision=precision)


def test_an_export_made_for_another_name_indexes_into_this_models_table(tmp_path):
    from test_index_support import tiny_model

    from retrieval.model.encode import choose_encoder
    from retrieval.model.onnx_export import ensure_export

    first, _ = tiny_model(name="first-name")
    ensure_export(first)  # the export's folder is keyed by the weights: a second name with them shares it
    second, _ = tiny_model(name="second-name")
    encoder = choose_encoder(second, "image")
    assert encoder.info == second.info  # not the identity recorded by the first exporter
    assert Store.open(tmp_path / "db", encoder.info, create=True).table_name == second.info.table_name
