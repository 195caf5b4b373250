"""The Python API: `clipsearch.Library` over a real store, with a tiny random model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipsearch
from clipsearch.library import Embedded, Library
from retrieval.ann import index_state
from retrieval.errors import ImageLoadError, NotFoundError, QueryError
from retrieval.model.checkpoint import save_checkpoint
from retrieval.model.clip import CLIP
from retrieval.model.config import CLIPConfig, TextConfig, VisionConfig
from retrieval.regions import Box, Region, StoredImage, crop
from retrieval.store_state import StoreState

README = Path(__file__).resolve().parent.parent / "README.md"

TINY = CLIPConfig(
    embed_dim=32,
    vision=VisionConfig(image_size=32, width=64, layers=2, heads=2, patch_size=8),
    text=TextConfig(width=64, heads=2, layers=2),
)


def pattern(seed: int, size: int = 96) -> Image.Image:
    """A smooth random colour pattern, distinct per seed."""
    coarse = (np.random.default_rng(seed).random((3, 3, 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


@pytest.fixture
def library(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_checkpoint(CLIP(TINY), tmp_path / "tiny", name="tiny")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        pattern(i).save(photos / f"{i}.png")
    library = clipsearch.Library(db=tmp_path / "db", model=checkpoint)
    summary = library.index(photos, workers=0, progress=False)
    assert summary.indexed == 6
    return library, photos


def test_search_forms_agree(library):
    library, photos = library
    by_path = library.search(str(photos / "2.png"), k=6)
    assert isinstance(by_path[0], clipsearch.SearchResult)
    assert by_path[0].path == str(photos / "2.png") and by_path[0].score == pytest.approx(1.0, abs=1e-5)
    assert [r.rank for r in by_path] == list(range(1, 7))
    with Image.open(photos / "2.png") as image:
        assert [r.path for r in library.search(image, k=6)] == [r.path for r in by_path]
    vector = library.encode(photos / "2.png")
    assert [r.path for r in library.search(vector, k=6)] == [r.path for r in by_path]
    assert [r.path for r in library.search([(3.0, vector), (1.0, "noise")], k=6)] == [
        r.path for r in library.search(library.encode([(3.0, vector), (1.0, "noise")]), k=6)
    ]
    assert library.search("anything", k=3, where="format = 'JPEG'") == []
    with pytest.raises(QueryError):
        library.search([(1.0, "x"), (-1.0, "x")])
    with pytest.raises(ImageLoadError):
        library.search(photos / "missing.png")


def test_in_dir_is_a_folder_under_the_home_too_and_a_missing_one_is_an_error(library, monkeypatch):
    library, photos = library
    monkeypatch.setenv("HOME", str(photos.parent))
    assert len(library.search("x", k=10, in_dir="~/photos")) == 6
    with pytest.raises(QueryError, match=r"^--in ~/nothing: no such folder, and no indexed image is under it"):
        library.search("x", in_dir="~/nothing")
    with pytest.raises(QueryError, match=r"^--in /nothing: no such folder"):
        library.similar(photos / "1.png", in_dir="/nothing")


def test_similar_embeddings_and_status(library):
    library, photos = library
    hits = library.similar(photos / "0.png", k=10)
    assert len(hits) == 5 and str(photos / "0.png") not in {h.path for h in hits}
    assert hits[0].metadata["format"] == "PNG" and isinstance(hits[0].metadata["id"], int)

    embedded = library.embeddings()
    assert isinstance(embedded, Embedded) and embedded.vectors.shape == (6, TINY.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(embedded.vectors, axis=1), 1.0, rtol=1e-5)
    assert sorted(embedded.paths) == sorted(str(p) for p in photos.iterdir())
    first = embedded.paths.index(str(photos / "0.png"))
    scores = embedded.vectors @ embedded.vectors[first]
    others = [embedded.paths[i] for i in np.argsort(-scores) if i != first]
    assert [h.path for h in hits] == others

    status = library.status()
    assert status["images"] == 6 and status["model"]["name"] == "tiny" and status["models"] == ["tiny"]
    assert status["index"]["built"] and status["index"]["up_to_date"] and status["index"]["type"] == "flat"


def test_index_changes_reach_an_open_library(library):
    library, photos = library
    assert len(library.search("x", k=50)) == 6
    pattern(42).save(photos / "new.png")
    (photos / "1.png").unlink()
    Library(db=library.db, model=library.model_name).index(photos, workers=0, progress=False)  # another handle
    paths = {r.path for r in library.search("x", k=50)}
    assert str(photos / "new.png") in paths and str(photos / "1.png") not in paths and len(paths) == 6
    assert index_state(library.store())["up_to_date"]


def test_a_loaded_model_can_be_passed_in(library):
    from retrieval.model.loading import load_model

    library, photos = library
    model, _ = load_model(library.model_name)
    same = Library(db=library.db, model=model)
    assert [r.path for r in same.search("x", k=6)] == [r.path for r in library.search("x", k=6)]
    with pytest.raises(ValueError, match="needs `.info`"):
        Library(db=library.db, model=CLIP(TINY))


def test_search_without_metadata_runs_on_the_saved_index_while_the_store_is_unchanged(library):
    library, photos = library
    full = library.search("x", k=6)
    fresh = Library(db=library.db, model=library.model_name)
    quick = fresh.search("x", k=6, metadata=False)
    assert [(r.path, r.rank) for r in quick] == [(r.path, r.rank) for r in full]
    assert [r.score for r in quick] == pytest.approx([r.score for r in full], abs=1e-5)
    assert quick[0].metadata == {"id": full[0].metadata["id"]}
    assert fresh._store is None  # answered without opening the store

    gone = str(photos / "3.png")
    store = library.store()
    store.delete([store.id_for_path(gone)])  # a commit that no index saw: the saved one is stale now
    after = fresh.search("x", k=6, metadata=False)
    assert gone not in {r.path for r in after} and len(after) == 5


def test_query_texts_encode_within_bfloat16_rounding_of_float32(library):
    from clipsearch.library import encode_query_texts, query_text_model
    from retrieval.model.encode import encode_texts

    library, _ = library
    model = library._model("text")[0]
    fast = query_text_model(model)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert next(fast.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    assert fast.info == model.info and fast.visual is None
    texts = ["a red circle", "two blue squares on a white background", "x"]
    exact = encode_texts(model, texts)
    approx = encode_query_texts(fast, texts)
    assert approx.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(approx, axis=1), 1.0, rtol=1e-5)
    assert (np.sum(exact * approx, axis=1) > 0.999).all()

    one_shot = Library(db=library.db, model=library.model_name, text_precision="float32")
    # one text on one thread against three texts on all threads: different kernels, the same float32 maths
    np.testing.assert_allclose(one_shot.encode(texts[1]), exact[1], rtol=0, atol=1e-6)
    assert float(library.encode(texts[1]) @ exact[1]) > 0.999
    with pytest.raises(ValueError, match="text_precision"):
        Library(db=library.db, text_precision="bf16")


def test_the_pages_of_a_text_query_encode_it_once(library):
    from clipsearch.library_encoders import TEXT_CACHE

    library, _ = library
    first = library.search_page("a red circle", k=2, threshold=None)
    encoded = []
    encode_now = library._encode_texts_now
    library._encode_texts_now = lambda batch: encoded.append(list(batch)) or encode_now(batch)
    second = library.search_page("a red circle", k=2, offset=2, threshold=None)
    assert encoded == []  # the next page took the kept vector
    assert {r.path for r in first.results}.isdisjoint(r.path for r in second.results)
    kept = library.encode("a red circle")
    np.testing.assert_array_equal(kept, Library(db=library.db, model=library.model_name).encode("a red circle"))
    kept += 1  # a caller's array is its own
    np.testing.assert_array_equal(library.encode("a red circle") + 1, kept)
    assert encoded == []
    library.encode(["a blue square", "a red circle"])  # one text new: the query is encoded
    assert encoded == [["a blue square", "a red circle"]]
    for i in range(TEXT_CACHE):  # the oldest texts make room for new ones
        library.encode(f"text {i}")
    encoded.clear()
    library.encode(f"text {TEXT_CACHE - 1}")
    library.encode("a red circle")
    assert encoded == [["a red circle"]]


def test_pages_by_stored_id_leave_the_image_out_and_need_no_image_tower(library):
    library, photos = library
    fresh = Library(db=library.db, model=library.model_name)
    row_id = fresh.store().id_for_path(photos / "0.png")
    page = fresh.similar_to_id(row_id, k=3)
    assert "image" not in fresh._models  # the stored vector was used
    assert [h.path for h in page.results] == [h.path for h in library.similar(photos / "0.png", k=3)]
    assert (page.offset, page.next_offset, page.total) == (0, 3, 5)
    rest = fresh.similar_to_id(row_id, k=3, offset=3)
    assert [r.rank for r in rest.results] == [4, 5] and rest.next_offset is None
    assert {h.path for h in page.results + rest.results} == {str(p) for p in photos.iterdir()} - {str(photos / "0.png")}
    combined = fresh.search_page([(1.0, StoredImage(row_id)), (0.5, "noise")], k=6)
    assert len(combined.results) == 5 and row_id not in {r.metadata["id"] for r in combined.results}
    with pytest.raises(NotFoundError, match="no image 999"):
        fresh.similar_to_id(999)


def test_a_box_embeds_the_crop_of_a_stored_or_given_image(library):
    library, photos = library
    row_id = library.store().id_for_path(photos / "2.png")
    box = Box(0.5, 0.0, 1.0, 0.5)
    with Image.open(photos / "2.png") as image:
        upright = image.convert("RGB")
    expected = library.encode(crop(upright, box))
    np.testing.assert_allclose(library.encode(StoredImage(row_id, box)), expected, atol=1e-5)
    np.testing.assert_allclose(library.encode(Region(upright, box)), expected, atol=1e-5)
    np.testing.assert_allclose(library.encode(Region(photos / "2.png", box)), expected, atol=1e-5)
    assert float(library.encode(StoredImage(row_id)) @ library.encode(photos / "2.png")) > 0.9999


def test_image_file_serves_only_unchanged_files_inside_the_indexed_folders(library, tmp_path):
    library, photos = library
    store = library.store()
    ids = {name: store.id_for_path(photos / name) for name in ("0.png", "1.png", "2.png", "3.png", "4.png")}
    found = library.image_file(ids["0.png"])
    assert found.path == photos / "0.png" and found.format == "PNG" and len(found.content_hash) == 64
    os.utime(photos / "1.png", ns=(1, 1))  # touched, same bytes: still the indexed content
    assert library.image_file(ids["1.png"]).path == photos / "1.png"
    with pytest.raises(NotFoundError, match="no image 12345"):
        library.image_file(12345)
    (photos / "2.png").unlink()
    with pytest.raises(NotFoundError, match="gone"):
        library.image_file(ids["2.png"])
    secret = tmp_path / "secret.png"
    pattern(3).save(secret)
    (photos / "3.png").unlink()
    (photos / "3.png").symlink_to(secret)  # a link to a file outside the indexed folder swapped in
    with pytest.raises(NotFoundError, match="no longer inside an indexed folder"):
        library.image_file(ids["3.png"])
    pattern(77).save(photos / "4.png")
    with pytest.raises(NotFoundError, match="changed since it was indexed"):
        library.image_file(ids["4.png"])


def test_an_open_library_follows_commits_in_memory_without_rewriting_the_saved_index(library):
    from retrieval.ann import index_path

    library, photos = library
    assert len(library.search("x", k=10)) == 6  # the index is loaded now
    pattern(50).save(photos / "new.png")
    Library(db=library.db, model=library.model_name).index(photos, workers=0, progress=False)  # saves its index
    store = library.store()
    saved = index_path(store).read_bytes()
    gone = store.id_for_path(photos / "1.png")
    store.delete([gone])  # a commit after the saved index, as another process's indexer would make it
    index = library.ann_index()
    assert store.id_for_path(photos / "new.png") in index.ids() and gone not in index.ids() and len(index) == 6
    assert index_path(store).read_bytes() == saved  # a reader keeps its index in step in memory
    assert str(photos / "1.png") not in {r.path for r in library.search("x", k=10)}


def test_the_readme_example_runs_as_a_script_without_a_main_guard(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    example = next(block for block in blocks if "clipsearch.Library(" in block)
    assert 'model="ViT-B/32"' in example and "__main__" not in example
    script = tmp_path / "example.py"
    script.write_text(example.replace('model="ViT-B/32"', 'model="shapes-mini"'))  # bundled: no download
    (tmp_path / "photos").mkdir()
    for i in range(8):
        pattern(i).save(tmp_path / "photos" / f"{i}.png")

    # the library's default: decoding in worker processes, which must not run the script again
    run = subprocess.run([sys.executable, script.name], cwd=tmp_path, capture_output=True, text=True, timeout=600)

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3", "4", "5"]
    assert all(line.split()[2].startswith(str(tmp_path / "photos")) for line in lines)
    (state,) = (tmp_path / "store").glob("*.state.json")
    runs = StoreState(state).runs()
    assert [(r["state"], r["indexed"]) for r in runs] == [("complete", 8)]  # indexed once, by the script itself
