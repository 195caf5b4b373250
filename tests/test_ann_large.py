"""The on-disk IVF-PQ (`ivfpq-disk`) over 200k vectors in a real LanceDB store: built in parallel shard processes,
merged into memory-mapped inverted lists, re-ranked with exact vectors taken from the store; recall@10 against
exact search, the memory of a query process, incremental updates and the saved-index protocol.

The vectors are clustered like real embeddings: 2,000 Gaussian clusters on the 512-d unit sphere (uniformly
random vectors have no neighbourhoods, the pathological case of any IVF).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from retrieval.ann import index_path, load_index, open_index
from retrieval.model.identity import ModelInfo
from retrieval.model.preprocess import CLIP_MEAN, CLIP_STD
from retrieval.ondisk import DiskIndex
from retrieval.store import ImageRow, Store, utc_now
from retrieval.types import ImageMetadata

DIM = 512
N = 200_000
RAW_BYTES = N * DIM * 4  # 400 MB: the vector matrix a query process must never hold
_CENTRES = np.random.default_rng(0).standard_normal((2_000, DIM)).astype(np.float32)
_CENTRES /= np.linalg.norm(_CENTRES, axis=1, keepdims=True)


def clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors around shared random centres on the sphere (cosine ~0.8 to their centre)."""
    rng = np.random.default_rng(seed)
    x = _CENTRES[rng.integers(0, len(_CENTRES), n)] + rng.standard_normal((n, DIM), np.float32) * (0.75 / DIM**0.5)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(ids: np.ndarray, vectors: np.ndarray) -> list[ImageRow]:
    metadata = ImageMetadata("0" * 64, None, None, None, None, None, None)
    now = utc_now()
    return [ImageRow(int(i), f"/planted/{i}.jpg", 1, 0, metadata, now, v) for i, v in zip(ids, vectors, strict=True)]


def exact_top(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors.T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist(), strict=True)]))


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """A store of 200k clustered vectors (ids with gaps) and its on-disk index, built in two shard processes."""
    db = tmp_path_factory.mktemp("large") / "db"
    store = Store.open(db, ModelInfo("planted", "cd" * 32, DIM, 32, CLIP_MEAN, CLIP_STD), create=True)
    vectors = clustered(N, seed=1)
    ids = np.arange(N, dtype=np.int64) * 3 + 5
    for start in range(0, N, 50_000):
        store.apply(rows(ids[start : start + 50_000], vectors[start : start + 50_000]))
    index = open_index(store, kind="ivfpq-disk")
    return store, index, ids, vectors


def test_sharded_build_is_saved_as_memory_mapped_lists(large):
    store, index, ids, _ = large
    assert isinstance(index, DiskIndex) and index.kind == "ivfpq-disk"
    meta = json.loads(index_path(store).read_text())
    ondisk = meta["ondisk"]
    ivfdata = store.path / ondisk["ivfdata"]
    # 64-byte PQ codes and 8-byte ids per vector: a fifth of the raw vectors
    assert N * 72 <= ivfdata.stat().st_size < RAW_BYTES / 4
    assert (store.path / ondisk["index"]).stat().st_size < RAW_BYTES / 4
    assert not list(store.path.glob(f".{ondisk['index'].removesuffix('.faiss')}*"))  # shard scratch removed
    np.testing.assert_array_equal(index.ids(), ids)
    assert 0 < index.params.nprobe <= index.params.nlist and index.params.pq_m == DIM // 8


def test_recall_after_reranking_and_query_memory_in_a_separate_process(large, tmp_path):
    """A fresh process maps the saved index and searches: recall@10 >= 0.95 against exact search, scores exact,
    and its peak RSS stays below the raw vectors' size (their 400 MB never enter it).

    The peak is the child's VmHWM, not `getrusage(...).ru_maxrss`: Linux carries ru_maxrss over an exec from the
    forked image, so a child of this test process would report the test's own RSS (the 400 MB it generated)."""
    store, _, ids, vectors = large
    queries = clustered(200, seed=2)
    np.save(tmp_path / "queries.npy", queries)
    child = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from pathlib import Path
        from retrieval.ann import load_index
        index, _ = load_index(Path({str(index_path(store))!r}))
        queries = np.load({str(tmp_path / "queries.npy")!r})
        found = [index.search(queries[i : i + 1], 10) for i in range(len(queries))]  # one query at a time
        np.save({str(tmp_path / "scores.npy")!r}, np.concatenate([f[0] for f in found]))
        np.save({str(tmp_path / "found.npy")!r}, np.concatenate([f[1] for f in found]))
        status = Path("/proc/self/status").read_text()
        peak_kb = int(status.split("VmHWM:")[1].split()[0])
        loaded = sorted(m for m in ("torch", "lancedb") if m in sys.modules)
        print(json.dumps({{"peak_rss_kb": peak_kb, "modules": loaded}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    found, scores = np.load(tmp_path / "found.npy"), np.load(tmp_path / "scores.npy")
    truth = exact_top(queries, vectors, ids, 10)
    assert recall(found, truth) >= 0.95
    by_id = {int(i): j for j, i in enumerate(ids)}
    exact = np.einsum("qd,qkd->qk", queries, vectors[np.vectorize(by_id.__getitem__)(found)])
    np.testing.assert_allclose(scores, exact, atol=1e-5)  # re-ranked with the stored vectors, not PQ estimates
    assert report["peak_rss_kb"] * 1024 < RAW_BYTES, report
    assert report["modules"] == []  # no torch, no LanceDB client: only the index files and Lance's take


def test_incremental_update_uses_a_delta_and_keeps_the_merged_files(large):
    store, index, ids, vectors = large
    before = json.loads(index_path(store).read_text())["ondisk"]
    added = clustered(1_000, seed=3)
    new_ids = store.allocate_ids(len(added))
    store.apply(rows(new_ids, added))
    gone = ids[:: N // 500][:500]
    store.delete(gone)
    updated = open_index(store)
    after = json.loads(index_path(store).read_text())
    assert (after["ondisk"]["index"], after["ondisk"]["ivfdata"]) == (before["index"], before["ivfdata"])
    assert after["ondisk"]["row_map"] != before["row_map"] and not (store.path / before["row_map"]).exists()
    assert after["store_version"] == store.version
    assert isinstance(updated, DiskIndex) and updated.delta_size == len(added)

    reloaded, _ = load_index(index_path(store))
    _, found = reloaded.search(added[:50], 10)
    assert (found[:, 0] == new_ids[:50]).mean() >= 0.95  # each added vector finds itself first
    _, found = reloaded.search(vectors[: N // 500 * 500 : N // 500][:200], 10)
    assert not np.isin(found, gone).any()  # deleted rows never come back
    allowed = new_ids[::2]
    _, found = reloaded.search(added[:20], 5, allowed=allowed)
    assert np.isin(found, allowed).all()


def test_a_one_shot_query_reads_only_the_paths_of_its_hits(tmp_path):
    """The saved id -> path map of 1M rows (~170 MB; ~8 GB at 100M) is mapped, not read whole: a fresh process that
    looks up a few ids holds none of it in its own memory, and maps far less than the file of the page cache (the
    kernel maps a whole page-cache folio, up to 2 MB, per fault); a damaged file is an error the caller handles."""
    from retrieval.ann import PathMap

    n = 1_000_000
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    folder = "/photos/" + "a-folder-name-as-long-as-a-real-one/" * 3
    paths = [f"{folder}{i % 997:03d}/an-image-file-name-long-enough-to-count-{i:09d}.jpg".encode() for i in range(n)]
    saved = tmp_path / "table.paths.npz"
    PathMap.from_paths(ids[::-1].copy(), paths[::-1]).save(saved)
    size = saved.stat().st_size
    assert size > 150_000_000
    wanted = [3, 7 * 123_456 + 3, 7 * (n - 1) + 3, 5]  # the first, one inside, the last, and an id not stored
    child = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from retrieval.ann import PathMap

        def rss_kb():  # (anonymous: the process's own memory, file: pages of mapped files)
            status = Path("/proc/self/status").read_text()
            return [int(status.split(f"{{kind}}:")[1].split()[0]) for kind in ("RssAnon", "RssFile")]

        before = rss_kb()
        paths = PathMap.load(Path({str(saved)!r}))
        found = [paths.get(i) for i in {wanted!r}]
        anon, file = (after - was for after, was in zip(rss_kb(), before))
        print(json.dumps({{"anon_kb": anon, "file_kb": file, "found": found}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["found"] == [os.fsdecode(paths[0]), os.fsdecode(paths[123_456]), os.fsdecode(paths[-1]), None]
    assert report["anon_kb"] * 1024 < size / 20, report  # read whole, it grew by the file's size
    assert report["file_kb"] * 1024 < size / 4, report

    saved.write_bytes(saved.read_bytes()[: size // 2])  # cut short: no central directory
    with pytest.raises(ValueError, match="not a paths file"):
        PathMap.load(saved)
