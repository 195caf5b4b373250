"""Incremental sync: new, unchanged, changed, touched, deleted, moved, copied, and duplicates within a run.

A tiny random CLIP, a real LanceDB store in tmp_path, real JPEG/PNG files; decoding in-process (workers=0)
for speed, except where the worker processes are the subject.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from test_index_support import pattern, tiny_model, vectors_by_path, write_images

from indexer.pipeline import IndexOptions, index_folders
from retrieval.model.encode import encode_images
from retrieval.store import Store
from retrieval.store_state import KEEP_RUNS, StoreState

OPTIONS = IndexOptions(workers=0, batch_size=4, commit_every=8, progress=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def lib(tmp_path, model):
    """A folder of 10 images, indexed once."""
    photos = tmp_path / "photos"
    paths = write_images(photos, 10)
    store = Store.open(tmp_path / "db", model[0].info, create=True)
    summary = run(model, store, photos)
    assert (summary.indexed, summary.new, summary.encoded, summary.failed) == (10, 10, 10, 0)
    return photos, paths, store


def run(model, store, *roots, **changes):
    options = OPTIONS if not changes else IndexOptions(**{**OPTIONS.__dict__, **changes})
    return index_folders(roots, model[0], model[1], store, options)


def counts(summary) -> dict[str, int]:
    keys = ("indexed", "new", "changed", "unchanged", "moved", "removed", "duplicates", "encoded", "failed")
    return {k: getattr(summary, k) for k in keys}


def expected(**nonzero) -> dict[str, int]:
    keys = ("indexed", "new", "changed", "unchanged", "moved", "removed", "duplicates", "encoded", "failed")
    return {k: nonzero.get(k, 0) for k in keys}


def test_first_run_stores_the_encoders_vectors(lib, model):
    photos, paths, store = lib
    stored = vectors_by_path(store)
    assert sorted(stored) == sorted(str(p) for p in paths)
    pixels = np.stack([model[1](p).numpy() for p in paths[:3]])
    import torch

    direct = encode_images(model[0], torch.from_numpy(pixels))
    np.testing.assert_allclose(np.stack([stored[str(p)] for p in paths[:3]]), direct, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(direct, axis=1), 1.0, atol=1e-6)
    [first] = store.rows([store.id_for_path(paths[0])])
    assert (first["width"], first["height"], first["format"], first["size"]) == (
        48,
        40,
        "JPEG",
        paths[0].stat().st_size,
    )


def test_unchanged_files_are_skipped_without_being_read(lib, model):
    photos, paths, store = lib
    before = vectors_by_path(store)
    version = store.version
    # Same size and mtime, different bytes: a run that read the file would notice the new content.
    stat = paths[0].stat()
    paths[0].write_bytes(b"\0" * stat.st_size)
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    summary = run(model, store, photos)
    assert counts(summary) == expected(unchanged=10)
    assert store.version == version  # nothing committed
    after = vectors_by_path(store)
    np.testing.assert_array_equal(after[str(paths[0])], before[str(paths[0])])


def test_changed_file_is_re_embedded_under_a_new_id(lib, model):
    photos, paths, store = lib
    old_id = store.id_for_path(paths[3])
    old_vector = vectors_by_path(store)[str(paths[3])]
    pattern(1000).save(paths[3])
    os.utime(paths[3], ns=(1, 1_000_000_000))  # the mtime surely differs
    summary = run(model, store, photos)
    assert counts(summary) == expected(indexed=1, changed=1, unchanged=9, encoded=1)
    new_id = store.id_for_path(paths[3])
    assert new_id != old_id and old_id not in store.ids() and store.count() == 10
    assert not np.allclose(vectors_by_path(store)[str(paths[3])], old_vector)


def test_touched_file_keeps_its_row(lib, model):
    photos, paths, store = lib
    row_id = store.id_for_path(paths[2])
    os.utime(paths[2], ns=(5, 5_000_000_000))
    summary = run(model, store, photos)
    assert counts(summary) == expected(unchanged=10)  # read and hashed, not decoded or encoded
    assert store.id_for_path(paths[2]) == row_id
    assert store.catalog().mtimes_ns[store.catalog().ids.tolist().index(row_id)] == 5_000_000_000
    assert counts(run(model, store, photos)) == expected(unchanged=10)


def test_deleted_files_leave_only_under_the_indexed_folders(tmp_path, lib, model):
    photos, paths, store = lib
    elsewhere = tmp_path / "elsewhere"
    [other] = write_images(elsewhere, 1, start=500)
    run(model, store, elsewhere)
    other.unlink()
    paths[0].unlink()
    summary = run(model, store, photos)  # `elsewhere` is not being indexed: its row stays
    assert counts(summary) == expected(unchanged=9, removed=1)
    assert store.id_for_path(paths[0]) is None and store.id_for_path(other) is not None
    assert counts(run(model, store, elsewhere)) == expected(removed=1)
    assert store.count() == 9


def test_missing_root_removes_nothing(tmp_path, lib, model):
    photos, paths, store = lib
    shutil.move(photos, tmp_path / "unmounted")
    summary = run(model, store, photos)
    assert summary.removed == 0 and store.count() == 10
    assert [f.stage for f in summary.failures] == ["walk"]


def test_moved_and_renamed_files_keep_id_and_vector(lib, model):
    photos, paths, store = lib
    before = vectors_by_path(store)
    ids = {p: store.id_for_path(p) for p in paths[:2]}
    (photos / "2024").mkdir()
    moved = photos / "2024" / "moved.jpg"
    renamed = photos / "renamed.jpg"
    os.rename(paths[0], moved)
    os.rename(paths[1], renamed)
    summary = run(model, store, photos)
    assert counts(summary) == expected(unchanged=8, moved=2)
    assert store.id_for_path(moved) == ids[paths[0]] and store.id_for_path(renamed) == ids[paths[1]]
    after = vectors_by_path(store)
    np.testing.assert_array_equal(after[str(moved)], before[str(paths[0])])
    assert store.count() == 10 and store.id_for_path(paths[0]) is None
    [row] = store.rows([ids[paths[0]]])
    assert (row["width"], row["height"], row["format"]) == (48, 40, "JPEG")  # metadata kept from the old row


def test_copies_reuse_vectors_and_identical_new_files_are_encoded_once(lib, model):
    photos, paths, store = lib
    shutil.copy(paths[4], photos / "copy_of_4.jpg")  # content already stored
    fresh = pattern(777)
    fresh.save(photos / "new_a.png")
    shutil.copy(photos / "new_a.png", photos / "new_b.png")  # identical new content at two paths
    shutil.copy(photos / "new_a.png", photos / "new_c.png")
    summary = run(model, store, photos)
    assert counts(summary) == expected(indexed=4, new=4, unchanged=10, duplicates=3, encoded=1)
    stored = vectors_by_path(store)
    np.testing.assert_array_equal(stored[str(photos / "copy_of_4.jpg")], stored[str(paths[4])])
    np.testing.assert_array_equal(stored[str(photos / "new_b.png")], stored[str(photos / "new_a.png")])
    np.testing.assert_array_equal(stored[str(photos / "new_c.png")], stored[str(photos / "new_a.png")])
    assert len(set(store.ids().tolist())) == store.count() == 14
    assert counts(run(model, store, photos)) == expected(unchanged=14)


def test_swap_of_two_files_and_a_move_over_a_changed_file(lib, model):
    photos, paths, store = lib
    before = vectors_by_path(store)
    a, b, c = paths[5], paths[6], paths[7]
    tmp = photos / "swap.tmp"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    os.replace(c, paths[8])  # c moved over 8: 8's old content is gone
    summary = run(model, store, photos)
    after = vectors_by_path(store)
    np.testing.assert_array_equal(after[str(a)], before[str(b)])
    np.testing.assert_array_equal(after[str(b)], before[str(a)])
    np.testing.assert_array_equal(after[str(paths[8])], before[str(c)])
    assert summary.encoded == 0 and store.count() == 9 == len(after)


def test_workers_give_the_same_vectors_as_in_process(tmp_path, lib, model):
    photos, paths, store = lib
    other = Store.open(tmp_path / "db2", model[0].info, create=True)
    summary = run(model, other, photos, workers=2)
    assert summary.indexed == 10 and summary.failed == 0
    a, b = vectors_by_path(store), vectors_by_path(other)
    assert sorted(a) == sorted(b)
    for path in a:
        np.testing.assert_allclose(a[path], b[path], atol=1e-6)


def test_the_state_keeps_every_root_ever_indexed(tmp_path, model):
    first, second = tmp_path / "first", tmp_path / "second"
    write_images(first, 2)
    write_images(second, 2, start=100)
    store = Store.open(tmp_path / "db", model[0].info, create=True)
    run(model, store, first)
    for _ in range(KEEP_RUNS + 1):  # more runs than the history keeps: `first` leaves the run list
        run(model, store, second)
    assert all(str(first) not in r["roots"] for r in store.state.runs())
    assert store.state.roots() == [str(first), str(second)]


def test_a_state_from_before_roots_were_kept_falls_back_to_its_runs(tmp_path):
    state = StoreState(tmp_path / "t.state.json")
    runs = [{"run_id": "a", "roots": ["/p/one"]}, {"run_id": "b", "roots": ["/p/two", "/p/one"]}]
    state.save({"next_id": 5, "runs": runs, "failures": []})
    assert state.roots() == ["/p/one", "/p/two"]
    state.record({"run_id": "c", "roots": ["/p/three"]}, [])
    assert state.roots() == ["/p/one", "/p/two", "/p/three"]
