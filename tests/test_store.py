"""The LanceDB store: identity checks, the read API the query side relies on, atomic writes, odd paths."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import datetime, timezone

import lancedb
import numpy as np
import pytest
from test_index_support import tiny_model

from retrieval.errors import ModelMismatchError, QueryError, StoreError
from retrieval.model.identity import ModelInfo
from retrieval.store import (
    SCHEMA_VERSION,
    ImageRow,
    Store,
    default_db_dir,
    deferred_validate_call,
    display_path,
    image_schema,
)
from retrieval.types import ImageMetadata

INFO = ModelInfo("test-model", "ab" * 32, 4, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def row(row_id: int, path: str, vector, content_hash: str | None = None, **fields) -> ImageRow:
    """A row with test defaults; `fields` overrides row and metadata fields alike (by name)."""
    metadata = dict(content_hash=content_hash or f"{row_id:064x}", width=40, height=30, format="JPEG", taken_at=None,
                    camera_make=None, camera_model=None)  # fmt: skip
    base = dict(
        id=row_id,
        path=path,
        size=100 + row_id,
        mtime_ns=1_700_000_000_123_456_789 + row_id,
        indexed_at=datetime(2024, 5, 1, tzinfo=timezone.utc),
        vector=unit(vector),
    )
    for name, value in fields.items():
        (metadata if name in ImageMetadata._fields else base)[name] = value
    return ImageRow(metadata=ImageMetadata(**metadata), **base)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.open(tmp_path / "db", INFO, create=True)


def test_missing_store_says_to_index_first(tmp_path):
    with pytest.raises(StoreError, match=r"no image store at .*run `clipsearch index FOLDER` first"):
        Store.open(tmp_path / "nothing", INFO)
    assert not (tmp_path / "nothing").exists()


def test_default_dir_follows_clipsearch_home(tmp_path):
    assert default_db_dir() == tmp_path / "home"  # conftest points CLIPSEARCH_HOME there
    store = Store.open(None, INFO, create=True)
    assert store.path == tmp_path / "home" and store.count() == 0


def test_one_table_per_model_and_mismatch_errors(tmp_path, store):
    store.apply([row(1, "/p/a.jpg", [1, 0, 0, 0])])
    other = replace(INFO, name="other", weights_sha256="cd" * 32)
    with pytest.raises(ModelMismatchError, match=r"no images indexed with model 'other' \(it has: test-model\)"):
        Store.open(store.path, other)
    second = Store.open(store.path, other, create=True)  # another model gets its own table ...
    assert second.table_name != store.table_name and second.count() == 0
    assert Store.open(store.path, INFO).count() == 1  # ... and the first model's vectors are untouched
    assert sorted(m.model.name for m in Store.models(store.path)) == ["other", "test-model"]

    # A table whose recorded identity differs from the model asked for (same table name, other preprocessing).
    with pytest.raises(ModelMismatchError, match="holds vectors of model 'test-model'"):
        Store.open(store.path, replace(INFO, std=(0.3, 0.3, 0.3)))


def test_same_weights_under_another_name_share_the_table(store):
    store.apply([row(1, "/p/a.jpg", [1, 0, 0, 0])])
    renamed = replace(INFO, name="/checkpoints/test-model")
    assert Store.open(store.path, renamed).table_name == store.table_name


def test_newer_schema_is_refused(tmp_path):
    # A table as a future clipsearch would write it: same model, schema version + 1.
    schema = image_schema(4, INFO)
    metadata = {**schema.metadata, b"clipsearch.schema_version": str(SCHEMA_VERSION + 1).encode()}
    lancedb.connect(str(tmp_path / "db")).create_table(INFO.table_name, schema=schema.with_metadata(metadata))
    with pytest.raises(StoreError, match="schema version 2, newer than this clipsearch understands"):
        Store.open(tmp_path / "db", INFO)


def test_table_without_clipsearch_metadata_is_refused(tmp_path):
    lancedb.connect(str(tmp_path / "db")).create_table(INFO.table_name, schema=image_schema(4).remove_metadata())
    with pytest.raises(StoreError, match="has no readable clipsearch metadata"):
        Store.open(tmp_path / "db", INFO)


def test_read_api_round_trip(store):
    v0 = store.version
    taken = datetime(2021, 7, 4, 18, 30, 5)
    store.apply(
        [
            row(5, "/p/a.jpg", [1, 0, 0, 0], taken_at=taken, camera_make="Canon", camera_model="EOS 5D"),
            row(7, "/p/b.png", [0, 1, 0, 0], format="PNG", width=4000, height=3000),
            row(9, "/p/c d.jpg", [1, 1, 0, 0]),
        ]
    )
    assert store.version > v0
    assert store.count() == 3
    assert store.ids().tolist() == [5, 7, 9]
    ids, vectors = store.all_vectors()
    assert vectors.dtype == np.float32 and vectors.shape == (3, 4)
    assert dict(zip(ids.tolist(), vectors[:, 1].tolist(), strict=True)) == pytest.approx({5: 0.0, 7: 1.0, 9: 2**-0.5})
    np.testing.assert_allclose(store.vectors_for([9, 5]), [unit([1, 1, 0, 0]), unit([1, 0, 0, 0])], atol=1e-7)
    rows = store.rows([7, 5])
    assert [r["id"] for r in rows] == [7, 5]
    assert rows[0]["format"] == "PNG" and (rows[0]["width"], rows[0]["height"]) == (4000, 3000)
    assert rows[1]["taken_at"] == taken and rows[1]["camera_make"] == "Canon" and rows[1]["camera_model"] == "EOS 5D"
    assert rows[0]["taken_at"] is None and rows[0]["camera_make"] is None
    assert rows[1]["mtime"] == datetime.fromtimestamp(1_700_000_000.123456, timezone.utc)
    assert store.rows([5], columns=["path", "size"]) == [{"path": "/p/a.jpg", "size": 105}]
    assert store.filter_ids("format = 'JPEG'").tolist() == [5, 9]
    assert store.filter_ids("taken_at > timestamp '2020-01-01 00:00:00'").tolist() == [5]
    assert store.filter_ids("path LIKE '/p/c%'").tolist() == [9]
    assert store.id_for_path("/p/c d.jpg") == 9 and store.id_for_path("/p/none.jpg") is None
    with pytest.raises(StoreError, match=r"ids not in the store: \[4\]"):
        store.vectors_for([5, 4])
    with pytest.raises(StoreError, match=r"ids not in the store: \[4\]"):  # none of them found at all
        store.rows([4])
    with pytest.raises(QueryError, match="invalid filter 'no_such_column = 1'"):
        store.filter_ids("no_such_column = 1")
    with pytest.raises(QueryError, match="invalid filter"):
        store.filter_ids("format = = ")
    with pytest.raises(QueryError, match="unknown column"):
        store.rows([5], columns=["nope"])


def test_empty_store_reads(store):
    ids, vectors = store.all_vectors()
    assert ids.shape == (0,) and vectors.shape == (0, 4)
    assert store.vectors_for([]).shape == (0, 4)
    assert store.rows([]) == [] and store.filter_ids("size > 0").size == 0


def test_non_utf8_and_newline_paths_round_trip(store, tmp_path):
    raw = os.fsdecode(b"/photos/caf\xe9 \xff.jpg")  # Latin-1 bytes: not UTF-8
    newline = "/photos/two\nlines.jpg"
    store.apply([row(1, raw, [1, 0, 0, 0]), row(2, newline, [0, 1, 0, 0])])
    assert store.rows([1, 2], columns=["path"]) == [{"path": raw}, {"path": newline}]
    assert os.fsencode(store.rows([1])[0]["path"]) == b"/photos/caf\xe9 \xff.jpg"
    assert store.id_for_path(raw) == 1 and store.id_for_path(os.fsencode(raw)) == 1
    assert store.id_for_path(newline) == 2
    assert display_path(raw) == "/photos/caf\\xe9 \\xff.jpg"  # what SQL filters see
    assert store.filter_ids("path = '/photos/caf\\xe9 \\xff.jpg'").tolist() == [1]


def test_apply_upserts_and_deletes_in_one_commit(store):
    store.apply([row(1, "/p/a.jpg", [1, 0, 0, 0]), row(2, "/p/b.jpg", [0, 1, 0, 0])])
    version = store.version
    # a move (same id, new path) + a changed file (new id 3 replacing 2) together
    store.apply([row(1, "/p/moved/a.jpg", [1, 0, 0, 0]), row(3, "/p/b.jpg", [0, 0, 1, 0])], delete_ids=[2])
    assert store.version == version + 1
    assert store.ids().tolist() == [1, 3]
    assert store.id_for_path("/p/moved/a.jpg") == 1 and store.id_for_path("/p/a.jpg") is None
    np.testing.assert_allclose(store.vectors_for([3]), [unit([0, 0, 1, 0])])
    store.delete([1])
    assert store.ids().tolist() == [3]
    catalog = store.catalog()
    assert catalog.paths == [b"/p/b.jpg"] and catalog.mtimes_ns.tolist() == [1_700_000_000_123_456_789 + 3]


def test_ids_are_never_reused(store):
    first = store.allocate_ids(3).tolist()
    store.apply([row(i, f"/p/{i}.jpg", [1, 0, 0, i]) for i in first])
    store.delete(first)  # the highest ids are gone from the table ...
    assert store.count() == 0
    reopened = Store.open(store.path, INFO)
    assert reopened.allocate_ids(2).tolist() == [first[-1] + 1, first[-1] + 2]  # ... and still not handed out again


def test_many_ids_in_one_call(store):
    ids = store.allocate_ids(9000)  # more than one `id IN (...)` batch
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(9000, 4)).astype(np.float32)
    store.apply([row(int(i), f"/p/{i}.jpg", v) for i, v in zip(ids, vectors, strict=True)])
    picked = ids[::-7]
    expected = vectors[::-7] / np.linalg.norm(vectors[::-7], axis=1, keepdims=True)
    np.testing.assert_allclose(store.vectors_for(picked), expected, atol=1e-6)
    store.apply([], delete_ids=ids[:8500])
    assert store.count() == 500


def test_real_model_identity_opens_its_own_table(tmp_path):
    model, _ = tiny_model()
    store = Store.open(tmp_path / "db", model.info, create=True)
    assert store.table_name == model.info.table_name and store.embed_dim == 64


def test_deferred_validate_call_validates_on_the_first_call_not_before():
    import pydantic

    built = []

    def eager(function, **options):  # pydantic's, counting when a validator is built
        built.append(options)
        return pydantic.validate_call(function, **options)

    validate_call = deferred_validate_call(eager)

    @validate_call
    def double(x: int) -> int:
        return 2 * x

    @validate_call(config={"strict": True})
    def triple(x: int) -> int:
        return 3 * x

    assert built == []  # nothing built while the module defining them imports
    assert double("21") == 42  # then pydantic's lax coercion, as before
    with pytest.raises(pydantic.ValidationError):
        double("not a number")
    with pytest.raises(pydantic.ValidationError):
        triple("2")  # strict: the options reach pydantic
    assert triple(2) == 6
    assert built == [{}, {"config": {"strict": True}}]  # once per function
    assert double.__name__ == "double"


def test_lancedb_imports_with_pydantic_left_as_it_was():
    import subprocess
    import sys

    code = (
        "import pydantic; eager = pydantic.validate_call\n"
        "from retrieval.store import _import_lancedb\n"
        "lancedb = _import_lancedb()\n"
        "assert pydantic.validate_call is eager, 'pydantic.validate_call was not restored'\n"
        "assert 'lance_namespace_urllib3_client' in __import__('sys').modules\n"
        "print(lancedb.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lancedb"
