"""Near-duplicate groups (`clipsearch duplicates`, `Library.duplicates`, collapsing them in queries) on a real store
of generated scenes indexed with the bundled shapes-mini model, and FAISS range search on every index type."""

from __future__ import annotations

import json
import shutil

import lancedb
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import ExifTags, Image, ImageEnhance

from clipsearch.cli import cli
from clipsearch.library import Library
from retrieval.duplicates import DEFAULT_THRESHOLD, MAX_DISTANCE, find_duplicates
from retrieval.errors import QueryError
from retrieval.faiss_index import AnnIndex
from retrieval.fingerprint import distance, fingerprint
from retrieval.shapes import Attributes, render

# Distinct scenes: no two share colour and shape.
OTHERS = (
    ("green", "triangle", "left", "grey"),
    ("yellow", "star", "right", "black"),
    ("purple", "heart", "top", "white"),
    ("orange", "ring", "bottom", "cyan"),
    ("white", "cross", "centre", "brown"),
    ("black", "hexagon", "left", "pink"),
)


def _exif(taken: str) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
    return exif


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two duplicate families among six distinct scenes, indexed with shapes-mini."""
    root = tmp_path_factory.mktemp("duplicates")
    photos = root / "photos"
    (photos / "copies").mkdir(parents=True)
    red = render(Attributes("circle", "red", "large", "centre", "grey", "flat"), 200, seed=1)
    red.save(photos / "red.jpg", quality=92, exif=_exif("2020:06:01 12:00:00"))
    shutil.copyfile(photos / "red.jpg", photos / "copies" / "red-copy.jpg")  # the same bytes
    red.save(photos / "copies" / "red-q40.jpg", quality=40)  # same size, no capture time
    red.resize((100, 100)).save(photos / "copies" / "red-half.png")
    blue = render(Attributes("square", "blue", "large", "left", "white", "stripes"), 160, seed=2)
    blue.save(photos / "b1.jpg", quality=92, exif=_exif("2022:01:01 09:00:00"))
    blue.save(photos / "copies" / "b2-older-copy.jpg", quality=85, exif=_exif("2018:01:01 09:00:00"))
    for i, (colour, shape, position, background) in enumerate(OTHERS):
        scene = Attributes(shape, colour, "large", position, background, "flat")
        render(scene, 160, seed=10 + i).save(photos / f"other-{i}.jpg", quality=92)
    db = root / "db"
    Library(db=db, model="shapes-mini").index([photos], workers=0, progress=False)
    return {"db": db, "photos": photos}


def run(store, *args: str):
    return CliRunner().invoke(cli, [*args, "--model", "shapes-mini", "--db", str(store["db"])])


def test_groups_with_the_best_pick_first(store):
    photos = store["photos"]
    groups = Library(db=store["db"], model="shapes-mini").duplicates()
    assert [[m.path for m in g.members] for g in groups] == [
        # the largest (pixel count) first; then the oldest capture time; then the shortest path
        [str(photos / "copies" / "b2-older-copy.jpg"), str(photos / "b1.jpg")],
        [
            str(photos / "red.jpg"),
            str(photos / "copies" / "red-copy.jpg"),
            str(photos / "copies" / "red-q40.jpg"),
            str(photos / "copies" / "red-half.png"),
        ],
    ]
    red = groups[1]
    assert red.best.path == str(photos / "red.jpg") and red.members[1].similarity == 1.0
    assert all(DEFAULT_THRESHOLD <= m.similarity <= 1.0 for g in groups for m in g.members)
    assert (red.best.width, red.best.height) == (200, 200)


def test_exact_copies_group_at_any_threshold(store):
    groups = Library(db=store["db"], model="shapes-mini").duplicates(threshold=1.0)
    assert [sorted(m.path.rsplit("/", 1)[1] for m in g.members) for g in groups] == [["red-copy.jpg", "red.jpg"]]


def test_duplicates_json_is_one_group_a_line(store):
    result = run(store, "duplicates", "--json")
    assert result.exit_code == 0, result.output
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(groups) == 2
    for group in groups:
        assert set(group) == {"best", "size", "members"}
        assert group["best"] == group["members"][0]["path"] and group["size"] == len(group["members"])
        for member in group["members"]:
            assert set(member) == {"id", "path", "width", "height", "taken_at", "similarity"}
            assert isinstance(member["id"], int) and isinstance(member["similarity"], float)
    assert groups[0]["members"][0]["taken_at"] == "2018-01-01T09:00:00"
    table = run(store, "duplicates")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0] == "group 1 (2 images)"
    assert table.stdout.splitlines()[1].split()[0] == "best"


def test_no_duplicates_and_bad_thresholds(store):
    result = run(store, "duplicates", "--threshold", "1.0", "--json")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1  # the byte-identical pair only
    refused = run(store, "duplicates", "--threshold", "0")
    assert refused.exit_code == 2 and "--threshold" in refused.output
    with pytest.raises(QueryError, match=r"give a cosine in \(0, 1\]"):
        Library(db=store["db"], model="shapes-mini").duplicates(threshold=1.5)


def test_collapse_duplicates_keeps_each_groups_best_member(store):
    photos = store["photos"]
    library = Library(db=store["db"], model="shapes-mini")
    plain = [r.path for r in library.search("a large red circle", k=4)]
    assert set(plain) == {
        str(photos / "red.jpg"),
        *(str(photos / "copies" / n) for n in ("red-copy.jpg", "red-q40.jpg", "red-half.png")),
    }
    collapsed = library.search("a large red circle", k=4, collapse_duplicates=True)
    assert collapsed[0].path == str(photos / "red.jpg")
    assert not any("/copies/red" in r.path for r in collapsed)
    assert len(collapsed) == 4 and [r.rank for r in collapsed] == [1, 2, 3, 4]
    result = run(store, "query", "a large red circle", "--collapse-duplicates", "--paths", "-n", "2")
    assert result.exit_code == 0 and result.stdout.splitlines()[0] == str(photos / "red.jpg")
    similar = run(store, "similar", str(photos / "b1.jpg"), "--collapse-duplicates", "--paths", "-n", "7")
    assert str(photos / "copies" / "b2-older-copy.jpg") in similar.stdout.splitlines()
    assert not any("/copies/red" in line for line in similar.stdout.splitlines())


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_range_search_finds_every_row_above_the_threshold(kind):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors[200:] = vectors[:200] + 0.05 * rng.standard_normal((200, 16)).astype(np.float32)  # close pairs
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(400, dtype=np.int64) * 7 + 3
    index = AnnIndex.build(ids, vectors, kind=kind)
    index.remove(ids[:10])
    limits, found = index.range_search(vectors[200:260], 0.9)
    exact = vectors[200:260] @ vectors[10:].T  # the removed rows are never returned
    for q in range(60):
        want = set(ids[10:][exact[q] >= 0.9].tolist())
        got = set(found[limits[q] : limits[q + 1]].tolist())
        assert got <= want
        assert len(got) >= 0.95 * len(want) if kind != "flat" else got == want


# Two different photos of the same kind of scene: same object, colour, size, position and background colour, the
# background's texture differs (a gradient, a checkerboard). shapes-mini embeds them above the default cosine.
LOOKALIKES = (
    Attributes("heart", "purple", "small", "centre", "cyan", "gradient"),
    Attributes("heart", "purple", "small", "centre", "cyan", "checker"),
)


def _variants(image: Image.Image) -> dict[str, Image.Image]:
    """The edits benchmarks/duplicates.py makes (JPEG q40 is applied when saving)."""
    w, h = image.size
    return {
        "q40": image,
        "half": image.resize((w // 2, h // 2), Image.Resampling.BICUBIC),
        "crop": image.crop((round(0.025 * w), round(0.025 * h), w - round(0.025 * w), h - round(0.025 * h))),
        "bright": ImageEnhance.Brightness(image).enhance(1.08),
    }


@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory):
    """Two lookalike scenes, the first with its edited copies, indexed with shapes-mini."""
    root = tmp_path_factory.mktemp("lookalikes")
    photos = root / "photos"
    photos.mkdir()
    first, second = (render(scene, 240, seed=25 + i) for i, scene in enumerate(LOOKALIKES))
    first.save(photos / "a.jpg", quality=92)
    second.save(photos / "b.jpg", quality=92)
    for name, variant in _variants(first).items():
        variant.save(photos / f"a-{name}.jpg", quality=40 if name == "q40" else 92)
    db = root / "db"
    Library(db=db, model="shapes-mini").index([photos], workers=0, progress=False)
    return {"db": db, "photos": photos}


def test_fingerprints_keep_edits_close_and_lookalikes_apart(lookalikes):
    photos = lookalikes["photos"]
    prints = {p.name: fingerprint(Image.open(p)) for p in photos.iterdir()}
    assert all(0 <= value < 2**63 for value in prints.values())
    edits = [prints[f"a-{name}.jpg"] for name in ("q40", "half", "crop", "bright")]
    assert distance(np.full(4, prints["a.jpg"]), np.array(edits)).max() <= MAX_DISTANCE
    assert distance(np.array([prints["a.jpg"]]), np.array([prints["b.jpg"]]))[0] > MAX_DISTANCE


def test_lookalike_scenes_are_not_duplicates_but_edits_are(lookalikes):
    library = Library(db=lookalikes["db"], model="shapes-mini")
    store = library._searchable_store()
    vectors = dict(zip(*store.all_vectors(), strict=True))
    a, b = (store.id_for_path(lookalikes["photos"] / name) for name in ("a.jpg", "b.jpg"))
    assert float(vectors[a] @ vectors[b]) >= DEFAULT_THRESHOLD  # the cosine alone would join them
    groups = [sorted(m.path.rsplit("/", 1)[1] for m in g.members) for g in library.duplicates()]
    assert groups == [["a-bright.jpg", "a-crop.jpg", "a-half.jpg", "a-q40.jpg", "a.jpg"]]
    cosine_alone = find_duplicates(store, library.ann_index(), max_distance=None)
    assert [len(g.members) for g in cosine_alone] == [6]


def test_a_store_without_fingerprints_falls_back_to_the_cosine_until_indexed_again(lookalikes, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(lookalikes["db"], db)
    library = Library(db=db, model="shapes-mini")
    table = lancedb.connect(str(db)).open_table(library._searchable_store().table_name)
    table.drop_columns(["fingerprint"])  # as a store written before fingerprints existed
    old = Library(db=db, model="shapes-mini")
    assert not old._searchable_store().has_column("fingerprint")
    assert [len(g.members) for g in old.duplicates()] == [6]  # the cosine alone: the lookalike joins
    summary = Library(db=db, model="shapes-mini").index([lookalikes["photos"]], workers=0, progress=False)
    assert (summary.encoded, summary.new, summary.unchanged) == (0, 0, 6)  # read again for the fingerprint only
    again = Library(db=db, model="shapes-mini")
    store = again._searchable_store()
    assert store.has_column("fingerprint") and len(store.missing_fingerprints()) == 0
    assert [len(g.members) for g in again.duplicates()] == [5]
    rerun = again.index([lookalikes["photos"]], workers=0, progress=False)
    assert (rerun.unchanged, rerun.indexed) == (6, 0)  # filled once: nothing is read again
