"""Query building blocks of the web app, in `retrieval`: boxes and crops, roots and the paths shown under them,
and paging through a ranking (a real store with planted vectors and a real FAISS index)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from test_index_support import tiny_model

from retrieval.ann import open_index
from retrieval.errors import QueryError
from retrieval.query import as_terms, search, search_page
from retrieval.regions import Box, Region, StoredImage, crop
from retrieval.roots import Roots
from retrieval.row_cache import RowCache
from retrieval.store import ImageRow, Store, utc_now
from retrieval.types import ImageMetadata


@pytest.mark.parametrize(
    "text",
    ["", "0.1,0.2,0.3", "0.1,0.2,0.3,0.4,0.5", "a,b,c,d", "0.5,0,0.5,1", "0.6,0,0.5,1", "-0.1,0,1,1", "0,0,1,1.5",
     "nan,0,1,1", "inf,0,1,1"],
)  # fmt: skip
def test_bad_boxes_are_refused_with_an_example(text):
    with pytest.raises(QueryError, match="e.g."):
        Box.parse(text)


def test_boxes_parse_from_text_and_lists():
    assert Box.parse("0,0.25,0.5,1") == Box(0.0, 0.25, 0.5, 1.0)
    assert Box.parse([0.1, 0.2, 0.3, 0.4]) == Box(0.1, 0.2, 0.3, 0.4)
    with pytest.raises(QueryError):
        Box.parse([True, 0, 1, 1])
    with pytest.raises(QueryError):
        Box.parse({"x0": 0})


def test_crop_takes_the_boxed_pixels_widened_to_whole_pixels():
    image = Image.new("RGB", (100, 50))
    image.paste((255, 0, 0), (0, 0, 50, 50))
    left = crop(image, Box(0, 0, 0.5, 1))
    assert left.size == (50, 50) and left.getcolors() == [(2500, (255, 0, 0))]
    assert crop(image, Box(0.333, 0.0, 0.3331, 0.01)).size == (1, 1)  # never empty
    assert crop(image, Box(0.101, 0.1, 0.299, 0.5)).size == (20, 20)  # 10.1..29.9 px -> 10..30


def test_stored_images_and_regions_are_image_terms():
    terms = as_terms([(2, StoredImage(5)), (-1, Region(Image.new("RGB", (4, 4)), Box(0, 0, 1, 1))), "a dog"])
    assert [(t.weight, t.kind) for t in terms] == [(2.0, "image"), (-1.0, "image"), (1.0, "text")]
    assert terms[0].value == StoredImage(5)


def test_roots_name_locate_and_map_folders(tmp_path):
    a, b, inner = tmp_path / "x" / "photos", tmp_path / "y" / "photos", tmp_path / "x" / "photos" / "trips"
    roots = Roots([str(a), str(b), str(inner)])
    assert roots.names == ["photos", "photos (2)", "trips"]
    assert roots.locate(str(a / "2023" / "beach.jpg")) == ("photos", "2023/beach.jpg")
    assert roots.locate(str(b / "cat.png")) == ("photos (2)", "cat.png")
    assert roots.locate(str(inner / "rome" / "1.jpg")) == ("trips", "rome/1.jpg")  # the innermost root
    assert roots.locate(str(tmp_path / "elsewhere.jpg")) is None
    assert roots.locate(str(a) + "-other/1.jpg") is None  # a sibling sharing the prefix is not inside
    odd = os.fsdecode(b"caf\xe9.jpg")  # a name that is not UTF-8 is shown with an escape, never as a surrogate
    assert roots.locate(str(a / odd)) == ("photos", "caf\\xe9.jpg")
    assert roots.folder("photos") == str(a)
    assert roots.folder("photos (2)/2023/summer/") == str(b / "2023" / "summer")
    for bad in ("photos/../../etc", "nope/2023", "/etc", "", "photos/a/../../.."):
        with pytest.raises(QueryError):
            roots.folder(bad)


def test_holds_real_follows_symlinks_of_files_and_roots(tmp_path):
    real_root = tmp_path / "real"
    real_root.mkdir()
    (real_root / "a.jpg").write_bytes(b"x")
    link_root = tmp_path / "link"
    link_root.symlink_to(real_root)  # an indexed root that is itself a link
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (real_root / "evil.jpg").symlink_to(outside)
    roots = Roots([str(link_root)])
    assert roots.holds_real(str(link_root / "a.jpg"))
    assert not roots.holds_real(str(link_root / "evil.jpg"))
    assert not roots.holds_real(str(link_root / ".." / "secret.txt"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A real store of 40 planted vectors in 4 dimensions with many exact ties, and its FAISS index."""
    model, _ = tiny_model()
    store = Store.open(tmp_path_factory.mktemp("pages") / "db", model.info, create=True)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((10, model.info.embed_dim)).astype(np.float32)
    vectors = np.repeat(base, 4, axis=0)  # every vector four times: scores tie in groups of four
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = store.allocate_ids(len(vectors))
    now = utc_now()
    metadata = ImageMetadata("0" * 64, 8, 8, "PNG", None, None, None)
    store.apply([ImageRow(int(i), f"/p/{i}.png", 1, 0, metadata, now, v) for i, v in zip(ids, vectors, strict=True)])
    return store, open_index(store), vectors


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_pages_make_up_the_whole_ranking_without_duplicates_or_gaps(planted, k):
    store, index, vectors = planted
    query = vectors[0] + 0.5 * vectors[7]
    query /= np.linalg.norm(query)
    ids, offset = [], 0
    while offset is not None:
        page = search_page(store, index, query, k=k, offset=offset)
        assert [r.rank for r in page.results] == list(range(offset + 1, offset + 1 + len(page.results)))
        assert page.total == 40 and (page.next_offset is None or len(page.results) == k)
        ids += [r.metadata["id"] for r in page.results]
        offset = page.next_offset
    assert len(ids) == 40 and len(set(ids)) == 40
    everything = search_page(store, index, query, k=40)
    assert [r.metadata["id"] for r in everything.results] == ids and everything.next_offset is None
    scores = [r.score for r in everything.results]
    assert scores == sorted(scores, reverse=True)
    assert {r.metadata["id"] for r in search(store, index, query, k=4)} == set(ids[:4])  # the same ranking


def test_pages_honour_filters_exclusions_and_thresholds(planted):
    store, index, vectors = planted
    first = search_page(store, index, vectors[0], k=3, where="id > 20", exclude=[21, 22])
    assert first.total == 18 and all(r.metadata["id"] > 22 for r in first.results) and first.next_offset == 3
    kept = search_page(store, index, vectors[0], k=10, threshold=0.999)
    assert len(kept.results) == 4 and kept.next_offset is None  # only the four copies score 1
    beyond = search_page(store, index, vectors[0], k=10, offset=100)
    assert beyond.results == [] and beyond.next_offset is None
    for k, offset in ((0, 0), (5, -1)):
        with pytest.raises(QueryError):
            search_page(store, index, vectors[0], k=k, offset=offset)


def test_the_row_cache_answers_as_the_store_does_and_follows_its_commits(tmp_path):
    model, _ = tiny_model()
    store = Store.open(tmp_path / "db", model.info, create=True)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((6, model.info.embed_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    odd = os.fsdecode(b"/p/caf\xe9.png")

    def rows_for(ids, start):
        metadata = ImageMetadata("ab" * 32, 8, 6, "PNG", None, "Canon", None)
        return [ImageRow(int(i), odd if i == 2 else f"/p/{i}.png", 10 + int(i), 123_456_789, metadata, utc_now(),
                         vectors[start + j]) for j, i in enumerate(ids)]  # fmt: skip

    store.apply(rows_for(store.allocate_ids(4), 0))
    cache = RowCache(store)
    assert cache.rows([3, 2, 99]) == {r["id"]: r for r in store.rows([3, 2])}
    assert cache.rows([2])[2]["path"] == odd
    index = open_index(store)
    fresh = search_page(store, index, vectors[0], k=3)
    assert search_page(store, index, vectors[0], k=3, row_cache=cache) == fresh

    store.apply(rows_for(store.allocate_ids(2), 4), delete_ids=[1])  # as another process's indexer would
    assert sorted(cache.rows(range(10))) == [2, 3, 4, 5, 6]
    assert cache.rows([6]) == {6: store.rows([6])[0]}
