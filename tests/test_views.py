"""Sub-view indexing (`index --views N`): crops stored beside their image, deleted with it, searched with it,
the setting recorded by the store; and `similar --box`.

A tiny random CLIP, a real LanceDB store and FAISS index in tmp_path, real JPEG files; decoding in-process
(workers=0) except in the CLI runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_index_support import tiny_checkpoint, tiny_model, write_images

from clipsearch.library import Library
from indexer.decode import Decoded, Decoder, DecodeTask
from indexer.pipeline import IndexOptions, index_folders
from retrieval.ann import open_index, open_saved_index
from retrieval.errors import QueryError, StoreError
from retrieval.model.encode import encode_images
from retrieval.query import search, search_page, search_saved
from retrieval.regions import crop, view_boxes
from retrieval.store import Store
from retrieval.views import KEY_STRIDE, ViewStore, open_saved_view_index, open_view_index, views_table_name

OPTIONS = IndexOptions(workers=0, batch_size=4, commit_every=3, progress=False, views=5)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run(model, store, *roots, **changes):
    return index_folders(roots, model[0], model[1], store, IndexOptions(**{**OPTIONS.__dict__, **changes}))


def views_by_image(store) -> dict[int, np.ndarray]:
    table = ViewStore.open(store)
    return {i: vectors for i, (_, vectors) in table.for_images(store.ids().tolist()).items()}


def test_view_boxes_are_a_grid_with_half_overlap_and_a_centre():
    assert view_boxes(0) == []
    boxes = view_boxes(5)
    third = 1 / 3
    assert [tuple(round(c, 6) for c in b) for b in boxes] == [
        (0, 0, round(2 * third, 6), round(2 * third, 6)),
        (round(third, 6), 0, 1, round(2 * third, 6)),
        (0, round(third, 6), round(2 * third, 6), 1),
        (round(third, 6), round(third, 6), 1, 1),
        (round(1 / 6, 6), round(1 / 6, 6), round(5 / 6, 6), round(5 / 6, 6)),
    ]
    assert len(view_boxes(10)) == 10
    for bad in (1, 3, 4, 6):
        with pytest.raises(QueryError, match="give 0 .off., 5"):
            view_boxes(bad)


def test_decoder_cuts_the_views_from_the_one_decoded_image(tmp_path, model):
    preprocess = model[1]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    path = tmp_path / "a.png"
    image.save(path)
    result = Decoder(preprocess, views=5)(DecodeTask(str(path)))
    assert isinstance(result, Decoded)
    size = preprocess.image_size
    assert result.views.shape == (5, size, size, 3) and result.views.dtype == np.uint8  # what workers send
    for box, pixels in zip(view_boxes(5), preprocess.normalize(result.views), strict=True):
        np.testing.assert_array_equal(pixels, preprocess.transform(crop(image, box)).numpy())  # to the bit
    assert Decoder(preprocess)(DecodeTask(str(path))).views is None  # off by default


def test_views_are_stored_copied_kept_on_move_and_deleted_with_their_image(tmp_path, model):
    photos = tmp_path / "photos"
    paths = write_images(photos, 8)
    store = Store.open(tmp_path / "db", model[0].info, create=True)
    summary = run(model, store, photos)
    assert (summary.indexed, summary.encoded) == (8, 8) and summary.commits >= 2  # views written per chunk
    views = views_by_image(store)
    assert sorted(views) == store.ids().tolist()
    # each view's vector is the encoder's vector of that crop
    image = Image.open(paths[0]).convert("RGB")
    crops = np.stack([model[1].transform(crop(image, b)).numpy() for b in view_boxes(5)])
    import torch

    first = store.id_for_path(paths[0])
    np.testing.assert_allclose(views[first], encode_images(model[0], torch.from_numpy(crops)), atol=1e-5)

    moved = photos / "moved.jpg"
    os.rename(paths[1], moved)
    old_id = store.id_for_path(paths[1])
    copy = photos / "copy.jpg"
    shutil.copy(paths[2], copy)
    write_images(photos, 1, start=3)  # img0003 rewritten with other content: a changed file
    Image.new("RGB", (48, 40), (10, 200, 30)).save(paths[3])
    changed_old = store.id_for_path(paths[3])
    paths[4].unlink()
    removed_id = store.id_for_path(paths[4])
    summary = run(model, store, photos)
    assert (summary.moved, summary.duplicates, summary.changed, summary.removed) == (1, 1, 1, 1)
    after = views_by_image(store)
    assert sorted(after) == store.ids().tolist()  # every image has views, no view lacks its image
    assert store.id_for_path(moved) == old_id
    np.testing.assert_array_equal(after[old_id], views[old_id])  # kept with the moved file's id
    np.testing.assert_array_equal(after[store.id_for_path(copy)], views[store.id_for_path(paths[2])])
    assert changed_old not in after and removed_id not in after
    assert ViewStore.open(store).count() == 5 * store.count()


def test_a_run_interrupted_between_views_and_images_is_tidied_by_the_next(tmp_path, model, monkeypatch):
    photos = tmp_path / "photos"
    write_images(photos, 4)
    store = Store.open(tmp_path / "db", model[0].info, create=True)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "apply", crash)  # the views are written, the image rows never land
    with pytest.raises(KeyboardInterrupt):
        run(model, store, photos)
    monkeypatch.undo()
    assert store.count() == 0 and ViewStore.open(store).count() == 20  # orphans of the reserved ids
    summary = run(model, store, photos)
    assert (summary.indexed, summary.encoded) == (4, 4)
    assert ViewStore.open(store).count() == 20
    assert sorted(views_by_image(store)) == store.ids().tolist()


def test_the_store_records_the_views_setting(tmp_path, model):
    photos = tmp_path / "photos"
    write_images(photos, 3)
    store = Store.open(tmp_path / "db", model[0].info, create=True)
    run(model, store, photos)
    with pytest.raises(StoreError, match=r"indexed with --views 5, not 10; run with --views 5, or index into a new"):
        run(model, store, photos, views=10)
    with pytest.raises(StoreError, match="indexed with --views 5, not 0"):
        run(model, store, photos, views=0)
    write_images(photos, 1, start=3)
    summary = run(model, store, photos, views=None)  # the store's own setting
    assert summary.new == 1 and ViewStore.open(store).count() == 20

    plain = Store.open(tmp_path / "db2", model[0].info, create=True)
    run(model, plain, photos, views=None)
    assert ViewStore.open(plain) is None  # off by default: no views table at all
    with pytest.raises(StoreError, match="indexed with --views 0, not 5"):
        run(model, plain, photos, views=5)


def _scene(background: tuple[int, int, int], patch: Image.Image | None, corner: tuple[int, int]) -> Image.Image:
    """A 240x240 flat scene with `patch` pasted at `corner`."""
    scene = Image.new("RGB", (240, 240), background)
    if patch is not None:
        scene.paste(patch, corner)
    return scene


def test_a_query_scores_an_image_by_its_best_view_and_reports_its_box(tmp_path, model):
    photos = tmp_path / "photos"
    photos.mkdir()
    target = Image.fromarray(np.random.default_rng(7).integers(0, 256, (70, 70, 3), dtype=np.uint8))
    _scene((120, 120, 120), target, (5, 5)).save(photos / "small.png")  # inside the top left view only
    for i in range(6):
        _scene((20 * i, 40, 200 - 20 * i), None, (0, 0)).save(photos / f"plain{i}.png")
    store = Store.open(tmp_path / "db", model[0].info, create=True)
    run(model, store, photos)
    index = open_index(store)
    table = ViewStore.open(store)
    small_id = store.id_for_path(photos / "small.png")
    boxes, vectors = table.for_images([small_id])[small_id]
    query = vectors[0]  # exactly the top left view's vector
    results = search(store, index, query, k=3, views=table.matrix())
    assert results[0].metadata["id"] == small_id
    assert results[0].score == pytest.approx(1.0, abs=1e-5)
    assert results[0].metadata["view"] == pytest.approx(list(view_boxes(5)[0]), abs=1e-6)
    whole = search(store, index, query, k=7)  # without views: the whole image's own score
    assert next(r.score for r in whole if r.metadata["id"] == small_id) < 0.9999
    assert "view" not in whole[0].metadata
    # a result whose whole image wins carries no box
    own = search(store, index, store.vectors_for([small_id])[0], k=1, views=table.matrix())[0]
    assert own.metadata["id"] == small_id and "view" not in own.metadata

    # pages of the rescored ranking fit together, and carry the box too
    ranking = [r.metadata["id"] for r in search(store, index, query, k=7, views=table.matrix())]
    first = search_page(store, index, query, k=3, views=table.matrix())
    second = search_page(store, index, query, k=4, offset=3, views=table.matrix())
    assert [r.metadata["id"] for r in first.results + second.results] == ranking
    assert first.results[0].metadata["view"] == pytest.approx(list(view_boxes(5)[0]), abs=1e-6)
    assert (first.next_offset, second.next_offset) == (3, None)

    # the library's searches use the views too, also where no metadata is asked for (the saved indexes)
    library = Library(db=tmp_path / "db", model=model[0])
    best = library.search(query, k=1, metadata=False)[0]
    assert best.path == str(photos / "small.png") and best.metadata["view"] == pytest.approx(list(view_boxes(5)[0]))


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "clipsearch", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_index_and_query_end_to_end_with_views(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    photos = tmp_path / "photos"
    paths = write_images(photos, 6)
    db = tmp_path / "db"
    common = ("--db", str(db), "--model", str(checkpoint))
    done = _cli("index", str(photos), *common, "--views", "5", "--workers", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["indexed"] == 6

    found = _cli("query", "anything", *common, "--json")
    assert found.returncode == 0, found.stderr
    assert sorted(json.loads(line)["path"] for line in found.stdout.splitlines()) == sorted(map(str, paths))

    # a region of a file outside the store: the stored view holding the same pixels comes first, with its box
    outside = tmp_path / "outside.jpg"
    shutil.copy(paths[0], outside)
    box = view_boxes(5)[3]
    region = _cli("similar", str(outside), "--box", ",".join(map(str, box)), *common, "--json", "-n", "2")
    assert region.returncode == 0, region.stderr
    best = json.loads(region.stdout.splitlines()[0])
    assert best["path"] == str(paths[0]) and best["score"] == pytest.approx(1.0, abs=1e-4)
    assert best["view"] == pytest.approx(list(box), abs=1e-6)

    again = _cli("index", str(photos), *common, "--views", "10", "--workers", "0")
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        "Error: this store's table was indexed with --views 5, not 10; run with --views 5, or index into a new "
        "store (--db NEW_DIR) with --views 10 to re-embed every image"
    ]
    bad = _cli("index", str(photos), *common, "--views", "4")
    assert bad.returncode == 1 and "give 0 (off), 5 (2x2 grid + centre)" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ("0.1,0.2,0.3", "a box is four numbers x0,y0,x1,y1"),
        ("0.5,0.5,0.2,0.9", "x0 must be less than x1"),
        ("0,0,1.5,1", "every coordinate must be between 0 and 1"),
        ("a,b,c,d", "a box is four numbers"),
    ],
)
def test_similar_box_errors_are_one_line(tmp_path, box, message):
    photos = tmp_path / "photos"
    paths = write_images(photos, 2)
    result = _cli("similar", str(paths[0]), "--box", box, "--db", str(tmp_path / "db"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


@pytest.fixture
def viewed(tmp_path, model):
    """Seven images indexed with five views each (one holds a small patch in its top left view). Noise, so that no
    two views of an image tie (a tie may go either way: flat crops of a flat background all score alike)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(11)
    paths = [photos / f"noise{i}.png" for i in range(6)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)
    scene = Image.fromarray(rng.integers(0, 256, (240, 240, 3), dtype=np.uint8))
    scene.paste(Image.new("RGB", (70, 70), (250, 10, 10)), (5, 5))
    scene.save(photos / "small.png")
    store = Store.open(tmp_path / "db", model[0].info, create=True)
    run(model, store, photos)
    return {"store": store, "photos": photos, "paths": [*paths, photos / "small.png"]}


def _queries(store, dim: int) -> list[np.ndarray]:
    """Random unit vectors, a stored view's vector and a stored image's vector."""
    rng = np.random.default_rng(3)
    random = rng.standard_normal((6, dim)).astype(np.float32)
    _, views = ViewStore.open(store).keyed()
    return [*(random / np.linalg.norm(random, axis=1, keepdims=True)), views[7], store.all_vectors()[1][2]]


def _same_ranking(got, want) -> None:
    assert [r.metadata["id"] for r in got] == [r.metadata["id"] for r in want]
    np.testing.assert_allclose([r.score for r in got], [r.score for r in want], atol=1e-5)
    for a, b in zip(got, want, strict=True):
        assert ("view" in a.metadata) == ("view" in b.metadata)
        if "view" in a.metadata:
            assert a.metadata["view"] == pytest.approx(b.metadata["view"], abs=1e-6)


def test_the_views_index_ranks_as_the_matrix_product(viewed, model):
    store = viewed["store"]
    index, matrix, views = open_index(store), ViewStore.open(store).matrix(), open_view_index(store)
    assert views.views == 5 and len(views.index) == 35
    saved, saved_views = (
        open_saved_index(store.path, store.model_info),
        open_saved_view_index(store.path, store.model_info),
    )
    assert saved is not None and saved_views is not None  # the indexer saved both
    small = store.id_for_path(viewed["photos"] / "small.png")
    some = [r.metadata["id"] for r in search(store, index, _queries(store, store.embed_dim)[0], k=4)]
    for query in _queries(store, store.embed_dim):
        for k in (1, 3, 7):
            _same_ranking(search(store, index, query, k=k, views=views), search(store, index, query, k=k, views=matrix))
            by_path = [r.path for r in search(store, index, query, k=k, views=matrix)]
            assert [r.path for r in search_saved(saved, query, k, views=saved_views)] == by_path
        where = f"id IN ({', '.join(map(str, some))})"
        _same_ranking(
            search(store, index, query, k=3, where=where, exclude=[small], views=views),
            search(store, index, query, k=3, where=where, exclude=[small], views=matrix),
        )
        for offset in (0, 2, 5):
            page, reference = (search_page(store, index, query, k=2, offset=offset, views=v) for v in (views, matrix))
            _same_ranking(page.results, reference.results)
            assert (page.next_offset, page.total) == (reference.next_offset, reference.total)
    box = search_saved(saved, _queries(store, store.embed_dim)[6], 1, views=saved_views)[0]
    assert box.metadata["view"] == pytest.approx(list(view_boxes(5)[2]), abs=1e-6)  # the second image's third view


def test_the_views_index_follows_the_views_table_and_never_holds_a_gone_view(viewed, model):
    store, paths = viewed["store"], viewed["paths"]
    table = ViewStore.open(store)
    keys = open_view_index(store).index.ids()
    np.testing.assert_array_equal(np.sort(keys), table.keyed()[0])
    moved_id, gone_id = store.id_for_path(paths[0]), store.id_for_path(paths[1])
    os.rename(paths[0], viewed["photos"] / "moved.jpg")
    paths[1].unlink()
    run(model, store, viewed["photos"])
    saved = open_saved_view_index(store.path, store.model_info)  # saved by the indexer, in step with the table
    assert saved is not None
    held = np.sort(saved.index.ids())
    np.testing.assert_array_equal(held, ViewStore.open(store).keyed()[0])
    assert set(range(moved_id * KEY_STRIDE, moved_id * KEY_STRIDE + 5)) <= set(held.tolist())  # a move keeps them
    assert not (held // KEY_STRIDE == gone_id).any()  # deleted with their image

    # a change behind the saved index: the saved one is no longer used, and opening brings it in step
    victim = store.id_for_path(paths[2])
    ViewStore.open(store).delete_for([victim])
    assert open_saved_view_index(store.path, store.model_info) is None
    assert not (np.sort(open_view_index(store).index.ids()) // KEY_STRIDE == victim).any()
    assert open_saved_view_index(store.path, store.model_info) is not None

    # a damaged index file is rebuilt from the table
    meta = json.loads((store.path / f"{views_table_name(store.table_name)}.faiss.json").read_text())
    (store.path / meta["index_file"]).write_bytes(b"not a faiss index")
    rebuilt = open_view_index(store)
    np.testing.assert_array_equal(np.sort(rebuilt.index.ids()), ViewStore.open(store).keyed()[0])


def test_status_shows_the_views(viewed):
    from click.testing import CliRunner

    from clipsearch.cli import cli

    db = str(viewed["store"].path)
    status = CliRunner().invoke(cli, ["status", "--db", db, "--json"])
    assert status.exit_code == 0, status.output
    [entry] = json.loads(status.output)["models"]
    views = entry["views"]
    assert (views["count"], views["layout"]) == (35, 5)
    assert {k: views["index"][k] for k in ("built", "type", "vectors", "up_to_date")} == {
        "built": True, "type": "flat", "vectors": 35, "up_to_date": True,
    }  # fmt: skip
    text = CliRunner().invoke(cli, ["status", "--db", db])
    assert "Views: 35 (5 per image, --views 5); their search index: flat, 35 vectors, up to date\n" in text.output


def test_a_query_with_views_starts_without_lancedb(viewed, model):
    checkpoint = tiny_checkpoint(viewed["store"].path.parent / "ckpt")
    db = viewed["store"].path.parent / "db2"
    done = _cli("index", str(viewed["photos"]), "--db", str(db), "--model", str(checkpoint), "--views", "5",
                "--workers", "0", "-q")  # fmt: skip
    assert done.returncode == 0, done.stderr
    code = (
        "import json, sys\n"
        "from clipsearch.library import Library\n"
        f"library = Library(db={str(db)!r}, model={str(checkpoint)!r})\n"
        "hits = library.search('anything', k=3, metadata=False)\n"
        "print(json.dumps([[h.path, h.metadata.get('view')] for h in hits]))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('indexer', 'lancedb', 'retrieval'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    fast = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert fast.returncode == 0, fast.stderr
    hits, loaded = (json.loads(line) for line in fast.stdout.splitlines())
    assert "retrieval.views" in loaded and not [m for m in loaded if m.split(".")[0] in ("indexer", "lancedb")]
    assert "retrieval.store" not in loaded
    slow = Library(db=db, model=checkpoint).search("anything", k=3)  # through the store
    assert [[r.path, r.metadata.get("view")] for r in slow] == [
        [p, pytest.approx(v, abs=1e-6) if v else None] for p, v in hits
    ]
