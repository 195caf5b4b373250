"""The FAISS index on planted vectors: exact and approximate search, filters, persistence beside a real
LanceDB store, incremental updates, and removed ids never coming back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval import faiss_index
from retrieval.ann import index_path, index_state, open_index, open_saved_index, save_index, saved_models
from retrieval.faiss_index import AnnIndex
from retrieval.model.identity import ModelInfo
from retrieval.model.preprocess import CLIP_MEAN, CLIP_STD
from retrieval.store import ImageRow, Store, utc_now
from retrieval.types import ImageMetadata

DIM = 64


def clustered(n: int, seed: int, centres: int = 200, rank: int = 16) -> np.ndarray:
    """Unit vectors around shared cluster centres, spread in a shared low-rank subspace plus isotropic noise."""
    shared = np.random.default_rng(0)
    centre = shared.standard_normal((centres, DIM)).astype(np.float32)
    basis = np.linalg.qr(shared.standard_normal((DIM, rank)))[0].astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centre[rng.integers(0, centres, n)] / np.sqrt(DIM) * 4
    x += rng.standard_normal((n, rank)).astype(np.float32) @ basis.T / np.sqrt(rank)
    x += 0.3 * rng.standard_normal((n, DIM)).astype(np.float32) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k ids."""
    return ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]]


def assert_exact_top(found: np.ndarray, queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> None:
    """`found` holds a true top-k for every query: its ids' exact scores are the k best, rank by rank, up to float
    rounding (FAISS and numpy multiply in different orders, so near-ties may come out swapped)."""
    by_id = dict(zip(ids.tolist(), range(len(ids)), strict=True))
    scores = queries @ vectors.T
    got = np.take_along_axis(scores, np.vectorize(by_id.__getitem__)(found), axis=1)
    best = -np.sort(-scores, axis=1)[:, :k]
    np.testing.assert_allclose(got, best, rtol=0, atol=1e-5)
    assert all(len(set(row)) == k for row in found.tolist())  # no id twice


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall@k of found against true id lists."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def planted():
    """20k clustered vectors with sparse, non-contiguous ids, and 100 held-out queries."""
    vectors = clustered(20_000, seed=1)
    ids = np.arange(20_000, dtype=np.int64) * 7 + 3
    return ids, vectors, clustered(100, seed=2)


def test_flat_is_exact(planted):
    ids, vectors, queries = planted
    index = AnnIndex.build(ids, vectors, "flat")
    scores, found = index.search(queries, 10)
    assert_exact_top(found, queries, vectors, ids, 10)
    np.testing.assert_allclose(scores[:, 0], np.max(queries @ vectors.T, axis=1), rtol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall(planted, kind):
    ids, vectors, queries = planted
    index = AnnIndex.build(ids, vectors, kind)
    _, found = index.search(queries, 10)
    assert recall(found, exact_top(queries, vectors, ids, 10)) >= 0.95
    assert index.params.kind == kind and (index.params.nprobe or index.params.ef_search) > 0


def test_ivfpq_trades_recall_for_memory(planted):
    ids, vectors, queries = planted
    index = AnnIndex.build(ids[:5000], vectors[:5000], "ivfpq")
    _, found = index.search(queries, 10)
    assert recall(found, exact_top(queries, vectors[:5000], ids[:5000], 10)) >= 0.6
    assert index.params.pq_m == DIM // 4  # 16 bytes a vector instead of 256


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_filter_returns_k_allowed_results(planted, kind):
    ids, vectors, queries = planted
    n = 3000
    index = AnnIndex.build(ids[:n], vectors[:n], kind)
    for allowed in (ids[:n:5], ids[:n][[17, 400, 1234, 2999, 5, 6, 7, 8, 9, 10, 11, 12]]):
        scores, found = index.search(queries[:5], 10, allowed=allowed)
        assert np.isin(found, allowed).all() and (found >= 0).all()
        mask = np.isin(ids[:n], allowed)
        truth = exact_top(queries[:5], vectors[:n][mask], ids[:n][mask], 10)
        if kind == "flat":
            assert_exact_top(found, queries[:5], vectors[:n][mask], ids[:n][mask], 10)
        elif kind != "ivfpq":  # PQ's scores are approximate, so only its count and membership are checked
            assert recall(found, truth) >= 0.95
    scores, found = index.search(queries[:2], 10, allowed=ids[:3])
    assert (found[:, :3] >= 0).all() and (found[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_removed_ids_never_returned(planted, kind):
    ids, vectors, _ = planted
    n = 3000
    index = AnnIndex.build(ids[:n], vectors[:n], kind)
    gone = ids[:n:10]
    index.remove(gone)
    assert len(index) == n - len(gone)
    _, found = index.search(vectors[:n:10], 10)  # the removed vectors themselves as queries
    assert not np.isin(found, gone).any() and (found >= 0).all()
    index.add(ids[n : n + 50], vectors[n : n + 50])
    _, found = index.search(vectors[n : n + 50], 1)
    np.testing.assert_array_equal(found[:, 0], ids[n : n + 50])


# ---- persistence and sync against a real store ---------------------------------------------------


def planted_info() -> ModelInfo:
    """The identity of a made-up model whose vectors the tests plant."""
    return ModelInfo("planted", "ab" * 32, DIM, 32, CLIP_MEAN, CLIP_STD)


def row(i: int, vector: np.ndarray, folder: str = "/planted") -> ImageRow:
    """A stored image row for a planted vector."""
    metadata = ImageMetadata(f"{i:064x}", None, None, None, None, None, None)
    return ImageRow(int(i), f"{folder}/{i}.jpg", 1, 0, metadata, utc_now(), vector)


def put(store: Store, vectors: np.ndarray) -> np.ndarray:
    """Write vectors as rows of the store; returns their ids."""
    ids = store.allocate_ids(len(vectors))
    store.apply([row(i, v) for i, v in zip(ids, vectors, strict=True)])
    return ids


@pytest.fixture
def store(tmp_path):
    return Store.open(tmp_path / "db", planted_info(), create=True)


def index_files(store: Store) -> list[str]:
    return sorted(p.name for p in store.path.glob("*.faiss"))


def test_saved_index_is_reused_until_the_store_changes(store):
    ids = put(store, clustered(1000, seed=3))
    first = open_index(store)
    meta = json.loads(index_path(store).read_text())
    assert first.kind == "flat" and meta["store_version"] == store.version and meta["ntotal"] == 1000
    assert index_files(store) == [meta["index_file"]]
    assert index_state(store) == {
        "built": True,
        "type": "flat",
        "vectors": 1000,
        "up_to_date": True,
        "params": meta["params"],
    }

    again = open_index(store)
    assert json.loads(index_path(store).read_text()) == meta  # loaded as is, not rewritten
    np.testing.assert_array_equal(again.ids(), ids)

    put(store, clustered(10, seed=4))
    assert index_state(store)["up_to_date"] is False
    updated = open_index(store)
    new_meta = json.loads(index_path(store).read_text())
    assert new_meta["store_version"] == store.version and new_meta["ntotal"] == 1010
    assert index_files(store) == [new_meta["index_file"]]  # the old file is gone
    np.testing.assert_array_equal(updated.ids(), store.ids())


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_incremental_update_follows_additions_and_deletions(store, kind):
    vectors = clustered(1500, seed=5)
    ids = put(store, vectors)
    open_index(store, kind=kind)
    built_params = json.loads(index_path(store).read_text())["params"]

    gone = ids[::20]  # 5%: below HNSW's tombstone limit, so every type updates in place
    store.delete(gone)
    added = put(store, clustered(50, seed=6))
    index = open_index(store)  # no kind given: keeps the saved (forced) type
    assert index.kind == kind
    assert json.loads(index_path(store).read_text())["params"] == built_params  # updated, not rebuilt
    np.testing.assert_array_equal(index.ids(), store.ids())
    _, found = index.search(vectors[::20], 10)
    assert not np.isin(found, gone).any()
    _, found = index.search(store.vectors_for(added), 1)
    np.testing.assert_array_equal(found[:, 0], added)

    reopened = open_index(store)  # tombstones (hnsw) survive the round trip through disk
    _, found = reopened.search(vectors[::20], 10)
    assert not np.isin(found, gone).any()


def test_hnsw_rebuilds_past_the_tombstone_limit(store):
    ids = put(store, clustered(1000, seed=7))
    open_index(store, kind="hnsw")
    store.delete(ids[:300])
    index = open_index(store)
    assert index.kind == "hnsw" and len(index.tombstones) == 0 and len(index) == 700


def test_size_chosen_type_changes_as_the_collection_grows(store, monkeypatch):
    monkeypatch.setattr(faiss_index, "FLAT_MAX", 1000)
    put(store, clustered(900, seed=8))
    assert open_index(store).kind == "flat"
    put(store, clustered(200, seed=9))
    index = open_index(store)
    assert index.kind == "ivf" and len(index) == 1100
    assert json.loads(index_path(store).read_text())["auto"] is True


def test_unreadable_index_is_rebuilt(store, caplog):
    put(store, clustered(200, seed=10))
    open_index(store)
    meta = json.loads(index_path(store).read_text())
    (store.path / meta["index_file"]).write_bytes(b"not a faiss index")
    index = open_index(store)
    np.testing.assert_array_equal(index.ids(), store.ids())
    assert "cannot read the FAISS index" in caplog.text


def test_empty_store_gives_an_empty_index(store):
    index = open_index(store)
    scores, found = index.search(np.ones((1, DIM), np.float32), 5)
    assert len(index) == 0 and (found == -1).all()


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_forced_types_on_tiny_collections(store, kind):
    vectors = clustered(20, seed=11)
    ids = put(store, vectors)
    index = open_index(store, kind=kind)
    assert index.kind == (kind if kind != "ivfpq" else "flat")  # PQ cannot train its 256 codes on 20 vectors
    _, found = index.search(vectors, 1)
    np.testing.assert_array_equal(found[:, 0], ids)


def test_saved_index_answers_without_the_store_only_while_the_table_is_unchanged(store):
    vectors = clustered(300, seed=12)
    ids = put(store, vectors)
    info = planted_info()
    assert open_saved_index(store.path, info) is None  # nothing saved yet
    open_index(store)
    saved = open_saved_index(store.path, info)
    assert saved is not None and len(saved.index) == 300
    _, found = saved.index.search(vectors[:5], 1)
    np.testing.assert_array_equal(found[:, 0], ids[:5])
    assert saved.paths.get(int(ids[7])) == f"/planted/{ids[7]}.jpg" and saved.paths.get(-1) is None
    assert open_saved_index(store.path, info, kind="hnsw") is None  # another type asked for
    other_space = ModelInfo("planted", "ab" * 32, DIM, 64, CLIP_MEAN, CLIP_STD)  # same table name, other input size
    assert other_space.table_name == info.table_name and open_saved_index(store.path, other_space) is None

    store.delete(ids[:1])  # any commit makes the saved index stale until `open_index` saves it again
    assert open_saved_index(store.path, info) is None
    open_index(store)
    _, found = open_saved_index(store.path, info).index.search(vectors[:1], 10)
    assert ids[0] not in found

    store.apply([row(ids[1], vectors[1], folder="/moved")])  # a moved file keeps its id and vector
    assert open_saved_index(store.path, info) is None
    open_index(store)
    assert open_saved_index(store.path, info).paths.get(int(ids[1])) == f"/moved/{ids[1]}.jpg"


def test_saved_index_is_refreshed_when_only_its_snapshot_is_missing(store):
    put(store, clustered(50, seed=13))
    save_index(open_index(store, save=False), index_path(store), store.version, auto=True)  # without a snapshot
    index_file = json.loads(index_path(store).read_text())["index_file"]
    assert open_saved_index(store.path, planted_info()) is None
    open_index(store)  # the index is up to date: only the snapshot is written
    meta = json.loads(index_path(store).read_text())
    assert meta["index_file"] == index_file
    open_index(store)  # nothing to do now
    assert json.loads(index_path(store).read_text()) == meta
    paths_files = sorted(p.name for p in store.path.glob("*.paths.npz"))
    assert paths_files == [meta["paths_file"]] and open_saved_index(store.path, planted_info()) is not None


def test_saved_models_answer_only_when_every_table_has_a_current_index(store):
    put(store, clustered(30, seed=14))
    assert saved_models(store.path) is None  # no saved index yet
    open_index(store)
    assert saved_models(store.path) == [planted_info()]

    other_info = ModelInfo("other", "cd" * 32, DIM, 32, CLIP_MEAN, CLIP_STD)
    other = Store.open(store.path, other_info, create=True)
    put(other, clustered(30, seed=15))
    assert saved_models(store.path) is None  # the new table has no index yet
    open_index(other)
    assert sorted(m.name for m in saved_models(store.path)) == ["other", "planted"]
    put(store, clustered(1, seed=16))
    assert saved_models(store.path) is None
