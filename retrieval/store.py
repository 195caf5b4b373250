"""The image store: an embedded LanceDB database with one table of images per model.

Layout of a store directory (`$CLIPSEARCH_HOME`, default `~/.local/share/clipsearch`):

    images_<model>_<sha12>.lance/        one LanceDB table per model (`ModelInfo.table_name`)
    images_<model>_<sha12>.state.json    runs, failures and the id sequence of that table (store_state.py)
    images_<model>_<sha12>.lock          the indexer's write lock

Each table's Arrow schema metadata records the model identity (`ModelInfo.to_dict()`) and the schema
version, so they are committed together with the table itself; `Store.open` checks both.

Row contract (what readers may rely on):
- `id` is a stable int64: kept when a file is moved or renamed, never reused after a row is deleted.
- The vector of an id never changes: a file whose content changes gets a new id (the old one is deleted
  in the same atomic commit). A FAISS index can therefore be updated by id differences alone.
- `path` is the absolute path as display text (UTF-8; bytes that are not UTF-8 appear as `\\xNN`); it is
  what SQL filters see. `path_bytes` holds the exact `os.fsencode` bytes, and `rows()` returns `path` rebuilt
  from them (`os.fsdecode`), so a returned path always opens the file, whatever its name's encoding.
- `fingerprint` (a perceptual hash, `retrieval.fingerprint`) is null in rows written before it existed, and absent
  from tables created then until the next `index` run adds the column and fills it (`add_missing_columns`).
- `mtime`/`indexed_at` are UTC timestamps; `taken_at` is the EXIF capture time as the camera recorded it
  (local wall-clock time, no zone), null when absent, like `camera_make`/`camera_model`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa

from retrieval.catalog import Catalog, default_db_dir, store_dir  # noqa: F401  (default_db_dir: re-exported)
from retrieval.errors import ModelMismatchError, QueryError, StoreError, StoreWriteError
from retrieval.model.identity import ModelInfo
from retrieval.store_state import StoreState
from retrieval.types import Embeddings, ImageMetadata, RowIds

if TYPE_CHECKING:
    import lancedb

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TABLE_PREFIX = "images_"
_META_MODEL = b"clipsearch.model"
_META_SCHEMA = b"clipsearch.schema_version"
# Columns a reader gets from `rows()` when it names none: everything but the vector and the raw path bytes.
ROW_COLUMNS = (
    "id",
    "path",
    "size",
    "mtime",
    "content_hash",
    "width",
    "height",
    "format",
    "taken_at",
    "camera_make",
    "camera_model",
    "indexed_at",
)
_IN_CHUNK = 4096  # ids per `id IN (...)` clause, keeping SQL statements of bounded size


def image_schema(embed_dim: int, model_info: ModelInfo | None = None) -> pa.Schema:
    """The Arrow schema of an image table for embeddings of `embed_dim` floats."""
    metadata = {_META_SCHEMA: str(SCHEMA_VERSION).encode()}
    if model_info is not None:
        metadata[_META_MODEL] = json.dumps(model_info.to_dict()).encode()
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("path_bytes", pa.binary(), nullable=False),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("mtime", pa.timestamp("ns", tz="UTC"), nullable=False),
            pa.field("content_hash", pa.string(), nullable=False),  # SHA-256 of the file's bytes, hex
            pa.field("width", pa.int32()),  # as displayed, i.e. after EXIF orientation
            pa.field("height", pa.int32()),
            pa.field("format", pa.string()),  # Pillow's format name: JPEG, PNG, WEBP, ...
            pa.field("taken_at", pa.timestamp("us")),
            pa.field("camera_make", pa.string()),
            pa.field("camera_model", pa.string()),
            pa.field("fingerprint", pa.int64()),  # perceptual hash of the pixels (retrieval/fingerprint.py)
            pa.field("indexed_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), embed_dim), nullable=False),
        ],
        metadata=metadata,
    )


class ImageRow(NamedTuple):
    """One row to write: an image file, its metadata and its embedding."""

    id: int
    path: str  # absolute; a str from os.fsdecode, so non-UTF-8 names survive as surrogate escapes
    size: int
    mtime_ns: int
    metadata: ImageMetadata  # content hash, dimensions, format, EXIF time and camera
    indexed_at: datetime
    vector: np.ndarray  # [D] float32, L2-normalised


class FragmentTarget(NamedTuple):
    """Where a worker writes fragments for `Store.apply_fragments`."""

    uri: str  # the table's Lance dataset
    schema: pa.Schema  # its full schema, columns added after indexing included
    storage_version: str  # its file format version, which new data files must have


class WrittenFragment(NamedTuple):
    """A fragment a worker wrote for `Store.apply_fragments`, not part of the table until committed."""

    metadata: Any  # lance.fragment.FragmentMetadata
    ids: list[int]  # the ids of its rows


class StoredModel(NamedTuple):
    """A model table present in a store directory."""

    table_name: str
    model: ModelInfo
    schema_version: int


def display_path(path: str | bytes) -> str:
    """A path as valid UTF-8 text: undecodable bytes become `\\xNN` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _connect(db_dir: Path) -> lancedb.DBConnection:
    """A connection whose reads always see the latest committed version (another process may be indexing)."""
    lancedb = _import_lancedb()  # here, not at the top: a query answered from the saved index never needs it
    return lancedb.connect(str(db_dir), read_consistency_interval=timedelta(0))


def _import_lancedb() -> ModuleType:
    """`import lancedb`, with pydantic's `validate_call` deferring its work while lancedb's imports run.

    lancedb imports the REST client of lance-namespace, whose API methods (hundreds) are wrapped in
    `pydantic.validate_call`, which builds each one's validator as its module is imported, in every process that opens
    a store, for a remote client clipsearch never calls: `import lancedb` took 1.53 CPU-s at the median on the 2-core
    Xeon, 1.09 with this (8 runs each, interleaved). Wrapped this way, a method builds pydantic's validator on its
    first call and then validates every call as before (`deferred_validate_call`).
    """
    if "lancedb" in sys.modules:
        return sys.modules["lancedb"]
    try:
        import pydantic
    except ImportError:  # a lancedb without pydantic: nothing to defer
        pydantic = None
    eager = getattr(pydantic, "validate_call", None)
    if eager is not None:
        pydantic.validate_call = deferred_validate_call(eager)
    try:
        import lancedb
    finally:
        if eager is not None:
            pydantic.validate_call = eager
    return lancedb


def deferred_validate_call(eager: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for pydantic's `validate_call` (`eager`) that builds the validator on the wrapped function's first
    call rather than when it is defined; used both as `@validate_call` and as `@validate_call(config=...)`."""

    def decorate(function: Callable[..., Any], options: dict[str, Any]) -> Callable[..., Any]:
        validated: Callable[..., Any] | None = None

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal validated
            if validated is None:
                validated = eager(function, **options)
            return validated(*args, **kwargs)

        return call

    def validate_call(function: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        if function is None:
            return lambda f: decorate(f, options)
        return decorate(function, options)

    return validate_call


def _read_identity(schema: pa.Schema, table_name: str) -> tuple[ModelInfo, int]:
    """The model and schema version recorded in a table's schema metadata."""
    metadata = schema.metadata or {}
    try:
        version = int(metadata[_META_SCHEMA])
        info = ModelInfo.from_dict(json.loads(metadata[_META_MODEL]))
    except (KeyError, ValueError, TypeError) as e:
        raise StoreError(
            f"table {table_name!r} has no readable clipsearch metadata ({e!r}); it was not written by clipsearch "
            "or is damaged: move it away and index again"
        ) from e
    return info, version


def _same_space(a: ModelInfo, b: ModelInfo) -> bool:
    """Whether two models produce interchangeable vectors (the name alone does not matter)."""
    fields = (
        "weights_sha256", "embed_dim", "image_size", "mean", "std", "resize_mode", "tokenizer", "interpolation",
        "precision",
    )  # fmt: skip
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _id_list(ids: Iterable[int]) -> list[str]:
    """SQL `id IN (...)` clauses covering `ids`, at most `_IN_CHUNK` ids each."""
    values = [str(int(i)) for i in ids]
    return [f"id IN ({', '.join(values[i : i + _IN_CHUNK])})" for i in range(0, len(values), _IN_CHUNK)]


class Store:
    """One model's table in a store directory. Open with `Store.open`."""

    def __init__(self, db_dir: Path, db: lancedb.DBConnection, table: Any, model_info: ModelInfo) -> None:
        self.path = db_dir
        self.model_info = model_info
        self._db = db
        self._table = table
        self.table_name: str = table.name
        self.state = StoreState(db_dir / f"{self.table_name}.state.json")
        self._pinned_version: int | None = None  # see `pinned_version`

    @classmethod
    def open(cls, db_dir: str | os.PathLike[str] | None, model_info: ModelInfo, create: bool = False) -> Store:
        """Open the table of `model_info` in the store at `db_dir`.

        A table recorded with the same weights under another name (e.g. a checkpoint folder and its registry
        name) is used as well, since its vectors are the same.

        Args:
            db_dir: the store directory; None means `default_db_dir()`.
            model_info: the model whose vectors the caller reads or writes.
            create: create the directory and the table when missing (the indexer does).

        Raises:
            StoreError: no store or no table for this model (and not `create`), or a schema this version of
                clipsearch does not know.
            ModelMismatchError: the table exists but holds another model's vectors, or the store only holds
                other models' tables.
        """
        db_dir = store_dir(db_dir).absolute()
        present = cls.models(db_dir)
        by_name = {m.table_name: m for m in present}
        table_name = model_info.table_name
        if table_name not in by_name:
            twin = next((m for m in present if _same_space(m.model, model_info)), None)
            if twin is not None:
                table_name = twin.table_name
        if table_name in by_name:
            stored = by_name[table_name]
            if stored.schema_version > SCHEMA_VERSION:
                raise StoreError(
                    f"the store at {db_dir} has schema version {stored.schema_version}, newer than this clipsearch "
                    f"understands ({SCHEMA_VERSION}); upgrade clipsearch (pip install -U clipsearch)"
                )
            if not _same_space(stored.model, model_info):
                raise ModelMismatchError(
                    f"table {table_name!r} in {db_dir} holds vectors of model {stored.model.name!r} "
                    f"(weights {stored.model.weights_sha256[:12]}), not of {model_info.name!r} "
                    f"(weights {model_info.weights_sha256[:12]}); use --model {stored.model.name!r}, "
                    "or index into another --db"
                )
            db = _connect(db_dir)
            return cls(db_dir, db, db.open_table(table_name), stored.model)
        if not create:
            precisions = sorted(
                m.model.precision
                for m in present
                if _same_space(m.model, replace(model_info, precision=m.model.precision))
            )
            if precisions:  # the model's images are there, encoded at another precision
                raise ModelMismatchError(
                    f"the store at {db_dir} holds {model_info.name!r}'s images indexed with {precisions[0]} encoders, "
                    f"not {model_info.precision}; pass --precision {precisions[0]}, or run "
                    f"`clipsearch index FOLDER --precision {model_info.precision}`"
                )
            if present:
                names = ", ".join(sorted({m.model.name for m in present}))
                raise ModelMismatchError(
                    f"the store at {db_dir} has no images indexed with model {model_info.name!r} (it has: {names}); "
                    f"pass --model with one of those, or run `clipsearch index FOLDER --model {model_info.name}`"
                )
            raise StoreError(f"no image store at {db_dir}; run `clipsearch index FOLDER` first")
        db_dir.mkdir(parents=True, exist_ok=True)
        db = _connect(db_dir)
        try:
            table = db.create_table(model_info.table_name, schema=image_schema(model_info.embed_dim, model_info))
        except (ValueError, OSError) as e:  # another process created it meanwhile, or a crash left a husk
            try:
                return cls.open(db_dir, model_info)
            except StoreError:
                raise StoreError(
                    f"table {model_info.table_name} in {db_dir} exists but cannot be opened ({e}); if no other "
                    f"`clipsearch index` is running, delete {db_dir / model_info.table_name}.lance and index again"
                ) from e
        logger.info("created table %s in %s", table.name, db_dir)
        return cls(db_dir, db, table, model_info)

    @staticmethod
    def models(db_dir: str | os.PathLike[str] | None = None) -> list[StoredModel]:
        """The model tables present in a store directory (empty when there is no store).

        Raises:
            StoreError: a table's clipsearch metadata is unreadable.
        """
        db_dir = store_dir(db_dir)
        if not db_dir.is_dir():
            return []
        db = _connect(db_dir)
        found = []
        for name in sorted(_table_names(db)):
            if name.startswith(TABLE_PREFIX):
                try:
                    schema = db.open_table(name).schema
                except ValueError:  # listed but not committed yet: another process is creating it
                    logger.warning("skipping table %s in %s: it cannot be opened (yet)", name, db_dir)
                    continue
                info, version = _read_identity(schema, name)
                found.append(StoredModel(name, info, version))
        return found

    # ---- reading -------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The table's version; it changes with every committed write."""
        return self._pinned_version if self._pinned_version is not None else int(self._table.version)

    @contextlib.contextmanager
    def pinned_version(self) -> Iterator[int]:
        """Within the block, `version` answers the version read on entry instead of asking LanceDB each time
        (a round trip to its background thread: 0.2 ms on an idle machine, several under load). For one request
        of a long-lived reader, whose caches (index, views, rows) each check the version: a commit during the
        block is seen by the next one. Not for writers."""
        self._pinned_version = int(self._table.version)
        try:
            yield self._pinned_version
        finally:
            self._pinned_version = None

    @property
    def embed_dim(self) -> int:
        """The length of the stored vectors."""
        return self.model_info.embed_dim

    def count(self) -> int:
        """The number of images stored."""
        return int(self._table.count_rows())

    def ids(self) -> RowIds:
        """Every stored id, ascending."""
        column = self._scan(["id"]).column("id")
        return np.sort(column.to_numpy().astype(np.int64, copy=False))

    def all_vectors(self) -> tuple[RowIds, Embeddings]:
        """Every id with its vector, in one consistent read: ([N] int64, [N, D] float32)."""
        table = self._scan(["id", "vector"])
        return table.column("id").to_numpy().astype(np.int64, copy=False), self._matrix(table)

    def vectors_for(self, ids: Sequence[int] | RowIds) -> Embeddings:
        """The vectors of `ids`, in the order given.

        Raises:
            StoreError: an id is not in the store.
        """
        wanted = np.asarray(ids, dtype=np.int64)
        table = self._take(np.unique(wanted), ["id", "vector"])
        order = self._positions(table.column("id").to_numpy(), wanted)
        return self._matrix(table)[order]

    def rows(self, ids: Sequence[int] | RowIds, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Metadata of `ids` as dicts, in the order given; `path` is the exact file system path (see module doc).

        Args:
            ids: stored ids.
            columns: which columns; default `ROW_COLUMNS` (all but the vector). "vector" may be asked for.

        Raises:
            StoreError: an id is not in the store.
            QueryError: an unknown column.
        """
        columns = list(columns or self.row_columns())
        unknown = [c for c in columns if c not in self._table.schema.names]
        if unknown:
            raise QueryError(f"unknown column(s) {unknown}; the store has {self._table.schema.names}")
        read = list(dict.fromkeys(["id", *columns, *(["path_bytes"] if "path" in columns else [])]))
        wanted = np.asarray(ids, dtype=np.int64)
        table = self._take(np.unique(wanted), read)
        order = self._positions(table.column("id").to_numpy(), wanted)
        if "mtime" in read:  # Python datetimes stop at microseconds
            i = table.schema.get_field_index("mtime")
            table = table.set_column(i, "mtime", table.column("mtime").cast(pa.timestamp("us", tz="UTC"), safe=False))
        records = table.to_pylist()
        out = []
        for i in order:
            record = records[i]
            if "path" in columns:
                record["path"] = os.fsdecode(record["path_bytes"])
            if "vector" in columns:
                record["vector"] = np.asarray(record["vector"], dtype=np.float32)
            out.append({c: record[c] for c in columns})
        return out

    def has_column(self, column: str) -> bool:
        """Whether the table has a column (a table written by an older version may lack newer ones)."""
        return column in self._table.schema.names

    def missing_fingerprints(self) -> RowIds:
        """Ids of the rows without a fingerprint, ascending: every row when the table has no such column."""
        if not self.has_column("fingerprint"):
            return self.ids()
        return self.filter_ids("fingerprint IS NULL")

    def filter_ids(self, where: str) -> RowIds:
        """Ids of the rows matching a LanceDB SQL filter, e.g. `"format = 'PNG' AND width > 1000"`.

        Raises:
            QueryError: the filter cannot be parsed or run (the message says why).
        """
        try:
            table = self._table.search().where(where).select(["id"]).limit(None).to_arrow()
        except (ValueError, RuntimeError, OSError) as e:
            raise QueryError(
                f"invalid filter {where!r}: {e}; write it in LanceDB's SQL, e.g. \"format = 'JPEG' AND width > 1000\""
            ) from e
        return np.sort(table.column("id").to_numpy().astype(np.int64, copy=False))

    def row_columns(self) -> list[str]:
        """`ROW_COLUMNS` plus any column added after indexing (e.g. by `clipsearch tag`)."""
        own = set(image_schema(self.embed_dim).names)
        return [*ROW_COLUMNS, *(name for name in self._table.schema.names if name not in own)]

    def set_column(self, column: str, ids: Sequence[int] | RowIds, values: Sequence[str | None]) -> None:
        """Set a text column of the rows `ids`, adding it (all null) when missing, in one commit.

        Raises:
            QueryError: a bad column name, or one of the store's own columns.
            StoreError: the column exists with another type.
        """
        own = image_schema(self.embed_dim).names
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", column) or column in own:
            raise QueryError(
                f"cannot write column {column!r}: use a plain name (letters, digits, _) that is not one of the "
                f"store's own columns ({', '.join(own)})"
            )
        field = self._table.schema.field(column) if column in self._table.schema.names else None
        if field is None:
            self._table.add_columns(pa.field(column, pa.string()))
        elif not pa.types.is_string(field.type):
            raise StoreError(f"column {column!r} already holds {field.type}, not text; choose another --column")
        if len(ids):
            update = pa.table({"id": pa.array(np.asarray(ids, dtype=np.int64)), column: pa.array(values, pa.string())})
            self._table.merge_insert("id").when_matched_update_all().execute(update)

    def id_for_path(self, path: str | bytes | os.PathLike) -> int | None:
        """The id of the image at `path` (made absolute, symlinks not resolved), or None."""
        raw = os.fsencode(os.path.abspath(os.fsdecode(path)))
        table = self._table.search().where(f"path_bytes = X'{raw.hex()}'").select(["id"]).limit(None).to_arrow()
        return int(table.column("id")[0].as_py()) if table.num_rows else None

    def catalog(self) -> Catalog:
        """Path, size, mtime and content hash of every row, for the indexer's sync."""
        table = self._scan(["id", "path_bytes", "size", "mtime", "content_hash"])
        return Catalog(
            ids=table.column("id").to_numpy().astype(np.int64, copy=False),
            paths=table.column("path_bytes").to_pylist(),
            sizes=table.column("size").to_numpy().astype(np.int64, copy=False),
            mtimes_ns=table.column("mtime").cast(pa.int64()).to_numpy(),
            hashes=table.column("content_hash").to_pylist(),
        )

    # ---- writing (the indexer holds the write lock around these) --------------------------------

    def add_missing_columns(self) -> list[str]:
        """Add the store's own columns a table written by an older version lacks (all null), in one commit each.

        Returns:
            The names of the columns added.
        """
        missing = [f for f in image_schema(self.embed_dim) if not self.has_column(f.name)]
        with _writing(self.path):
            for column in missing:
                self._table.add_columns(column)
        if missing:
            logger.info("added column(s) %s to table %s", [f.name for f in missing], self.table_name)
        return [f.name for f in missing]

    def allocate_ids(self, n: int) -> RowIds:
        """`n` fresh ids, above every id ever handed out for this table (deleted ones are not reused)."""
        floor = int(self.ids()[-1]) + 1 if self.count() else 1
        return self.state.allocate_ids(n, floor)

    def apply(self, rows: Sequence[ImageRow], delete_ids: Iterable[int] = ()) -> None:
        """Upsert `rows` by id and delete `delete_ids`, as one atomic commit.

        An interruption leaves the table either before or after the whole change: a changed file's new row
        and the deletion of its old one land together, so a crash never loses or duplicates it.

        Raises:
            StoreWriteError: the disk is full or read-only.
        """
        delete_ids = [int(i) for i in delete_ids]
        if not rows and not delete_ids:
            return
        data = self._arrow(rows)
        merge = self._table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
        clauses = _id_list(delete_ids)
        with _writing(self.path):
            if len(clauses) > 1:  # keep each statement bounded: all but the first batch go as plain deletes first
                for clause in clauses[1:]:
                    self._table.delete(clause)
            if clauses:
                merge = merge.when_not_matched_by_source_delete(clauses[0])
            merge.execute(data)

    def delete(self, ids: Iterable[int]) -> None:
        """Delete rows by id (each `id IN` batch is one commit)."""
        with _writing(self.path):
            for clause in _id_list(ids):
                self._table.delete(clause)

    def optimize(self) -> None:
        """Compact the small fragments chunked commits leave, and delete files of versions superseded over an
        hour ago (not sooner: a query running in another process may still be reading them)."""
        with _writing(self.path):
            self._table.optimize(cleanup_older_than=timedelta(hours=1))

    def fragment_target(self) -> FragmentTarget:
        """Where and how other processes write fragments for `apply_fragments`: the table's Lance URI, its full
        schema and its file format version."""
        dataset = self._table.to_lance()
        return FragmentTarget(dataset.uri, dataset.schema, dataset.data_storage_version)

    def apply_fragments(
        self, fragments: Sequence[WrittenFragment], rows: Sequence[ImageRow] = (), delete_ids: Iterable[int] = ()
    ) -> None:
        """Add Lance fragments written elsewhere (`fragment_target`) plus `rows`, and delete `delete_ids`, as one
        atomic commit; rows already stored under an id that comes in again are replaced (an upsert, as `apply`).

        This is how a distributed indexer commits: its workers write the fragments, this process commits them, so
        a fragment no commit names (a killed worker's, a retried task's first attempt) is never part of the table.

        Args:
            fragments: fragments written with `fragment_target()`'s schema, with the ids they hold.
            rows: rows written here, into one more fragment.
            delete_ids: ids to delete.

        Raises:
            StoreWriteError: the disk is full or read-only.
        """
        import lance

        delete_ids = [int(i) for i in delete_ids]
        if not fragments and not rows and not delete_ids:
            return
        new = [f.metadata for f in fragments]
        if rows:
            target = self.fragment_target()
            data = rows_to_arrow(rows, target.schema, self.embed_dim)
            with _writing(self.path):
                new += lance.fragment.write_fragments(
                    data, target.uri, schema=target.schema, data_storage_version=target.storage_version
                )
        incoming = [r.id for r in rows] + [i for f in fragments for i in f.ids]
        # An id coming in is deleted first in the same commit: committing the same chunk again replaces its rows.
        gone = list(dict.fromkeys([*incoming, *delete_ids]))
        clauses = _id_list(gone)
        with _writing(self.path):
            for clause in clauses[1:]:  # bounded statements, as `apply` does: all but the first go as plain deletes
                self._table.delete(clause)
            dataset = self._table.to_lance()
            updated, removed = [], []
            for fragment in dataset.get_fragments() if clauses else ():
                changed = fragment.delete(clauses[0])
                if changed is None:  # every row of it deleted
                    removed.append(fragment.fragment_id)
                elif changed.num_deletions != fragment.metadata.num_deletions:
                    updated.append(changed)
            operation = lance.LanceOperation.Update(
                removed_fragment_ids=removed, updated_fragments=updated, new_fragments=new
            )
            lance.LanceDataset.commit(dataset.uri, operation, read_version=dataset.version)

    # ---- helpers -------------------------------------------------------------------------------

    def _scan(self, columns: list[str]) -> pa.Table:
        """Selected columns of every row."""
        return self._table.search().select(columns).limit(None).to_arrow()

    def _take(self, ids: RowIds, columns: list[str]) -> pa.Table:
        """Selected columns of the rows with these (unique) ids."""
        parts = [self._table.search().where(c).select(columns).limit(None).to_arrow() for c in _id_list(ids)]
        return pa.concat_tables(parts) if parts else self._table.schema.empty_table().select(columns)

    @staticmethod
    def _positions(found: np.ndarray, wanted: RowIds) -> np.ndarray:
        """Index into `found` of each id of `wanted`."""
        order = np.argsort(found)
        sorted_found = found[order]
        pos = np.searchsorted(sorted_found, wanted)
        pos = np.clip(pos, 0, max(len(found) - 1, 0))
        missing = wanted if len(found) == 0 else wanted[sorted_found[pos] != wanted]  # no ids found: all missing
        if len(missing):
            raise StoreError(f"ids not in the store: {missing[:10].tolist()}; the store changed, query again")
        return order[pos]

    def _matrix(self, table: pa.Table) -> Embeddings:
        """The vector column as a [N, D] float32 array."""
        column = table.column("vector").combine_chunks()
        values = column.values if len(column) else pa.array([], pa.float32())
        return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, self.embed_dim)

    def _arrow(self, rows: Sequence[ImageRow]) -> pa.Table:
        """Rows as an Arrow table of this store's schema."""
        # Only the store's own columns: a partial merge-insert leaves added ones (e.g. `tag` labels) as they are.
        own = set(image_schema(self.embed_dim).names)
        return rows_to_arrow(rows, pa.schema([f for f in self._table.schema if f.name in own]), self.embed_dim)


def rows_to_arrow(rows: Sequence[ImageRow], schema: pa.Schema, embed_dim: int) -> pa.Table:
    """`rows` as an Arrow table of `schema` (the image schema, perhaps with added columns, which are left null).

    The vector column is a fixed-size list of `embed_dim` float32, the type Lance searches.
    """
    vectors = np.stack([r.vector for r in rows]).astype(np.float32) if rows else np.zeros((0, embed_dim))
    columns = {
        "id": [r.id for r in rows],
        "path": [display_path(r.path) for r in rows],
        "path_bytes": [os.fsencode(r.path) for r in rows],
        "size": [r.size for r in rows],
        "mtime": pa.array([r.mtime_ns for r in rows], pa.int64()).cast(schema.field("mtime").type),
        **{name: [getattr(r.metadata, name) for r in rows] for name in ImageMetadata._fields},
        "indexed_at": [r.indexed_at for r in rows],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), embed_dim),
    }
    arrays = []
    for f in schema:
        column = columns.get(f.name)
        if column is None:
            arrays.append(pa.nulls(len(rows), f.type))
        else:
            arrays.append(column if isinstance(column, pa.Array) else pa.array(column, f.type))
    return pa.table(arrays, schema=schema)


@contextlib.contextmanager
def _writing(db_dir: Path) -> Iterator[None]:
    """Raise a file system failure of a write to the store as a `StoreWriteError` saying what to do."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # LanceDB raises RuntimeError("... (os error 28) ...")
        error = StoreWriteError.from_error(db_dir, e)
        if error is None:
            raise
        raise error from e


def _table_names(db: lancedb.DBConnection) -> list[str]:
    """All table names of a connection, following pagination."""
    names: list[str] = []
    token = None
    while True:
        page = db.list_tables(page_token=token)
        names.extend(page.tables)
        token = page.page_token
        if not token:
            return names


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)
