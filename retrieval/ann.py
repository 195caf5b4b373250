"""A store's FAISS index, saved beside it and kept in step with it; and a fast read of it for one-shot queries.

Files, beside the store: `<db>/<table>.<token>.faiss` (the index), `<db>/<table>.<token>.paths.npz` (each
indexed id's file path) and `<db>/<table>.faiss.json`, which names both and records the store version the
index reflects, the table's fingerprint at that version, the model, the index type and its parameters.
Replacing the JSON is the single atomic commit, so a crash never leaves a half-written index in use; files
are never rewritten in place (new names, old ones unlinked), so a reader may map them.

The on-disk kind (`ivfpq-disk`, `retrieval.ondisk`) adds, named in the JSON's `ondisk` entry: the merged index
and its `.ivfdata` lists (written once by a build, kept by every incremental update), and `.rows.npy`, the
id -> row offset map of the table at `store_version` through which a query takes its candidates' exact
vectors; `index_file` is then its delta (ids added since the merge).

Two ways in:
- `open_index(store)` brings the saved index up to date with an open store, incrementally (adds new ids,
  removes gone ones) or by a rebuild; a search never returns an id that has left the store.
- `open_saved_index(db_dir, model_info)` reads the saved index and paths without opening the store, only
  when the table's files show no commit since the index was saved (else None: go through `open_index`).
  Importing LanceDB alone takes about as long as importing torch (~1 s, mostly its REST client's pydantic
  models), so this is what lets a one-shot `clipsearch query` start in little more than torch's import time.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import struct
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from retrieval.catalog import table_fingerprint
from retrieval.errors import StoreError
from retrieval.faiss_index import KINDS, LARGE_KIND, AnnIndex, IndexParams, as_ids, choose_kind
from retrieval.ondisk import MAX_DELTA_FRACTION, DiskIndex, LanceRows, MapFn, build_from_lance
from retrieval.types import RowIds

if TYPE_CHECKING:
    from retrieval.model.identity import ModelInfo

logger = logging.getLogger(__name__)

# HNSW cannot delete: removed ids are filtered out at search time until they make up this share of it.
MAX_TOMBSTONE_FRACTION = 0.1
# An IVF trained on far fewer vectors than it now holds has stale centroids: rebuild past this growth.
MAX_IVF_GROWTH = 2.0
# Fewer vectors than this cannot train the on-disk kind's product quantizer well (256 codes x ~40 points).
LARGE_MIN_VECTORS = 10_240
_FORMAT = "clipsearch-faiss"


class PathMap:
    """The file path of each indexed row id, as saved beside the index (what a result table prints)."""

    def __init__(self, ids: RowIds, offsets: np.ndarray, blob: np.ndarray) -> None:
        self._ids = ids  # [N] sorted int64
        self._offsets = offsets  # [N + 1] int64: path i is blob[offsets[i]:offsets[i + 1]]
        self._blob = blob  # uint8, the paths' exact file system bytes, concatenated

    @classmethod
    def from_paths(cls, ids: RowIds, paths: list[bytes]) -> PathMap:
        """From ids and their paths' bytes (`Store.catalog()`), in any order."""
        order = np.argsort(ids, kind="stable")
        ordered = [paths[i] for i in order]
        offsets = np.zeros(len(ordered) + 1, np.int64)
        np.cumsum([len(p) for p in ordered], out=offsets[1:])
        blob = np.frombuffer(b"".join(ordered), np.uint8)
        return cls(as_ids(ids)[order], offsets, blob)

    def save(self, path: Path) -> None:
        """Write to `path` (an .npz)."""
        with path.open("wb") as f:
            np.savez(f, ids=self._ids, offsets=self._offsets, blob=self._blob)

    @classmethod
    def load(cls, path: Path) -> PathMap:
        """Map a file written by `save`: a lookup reads only the pages of the ids it searches and the paths it
        returns, so a one-shot query over 100M rows (~8 GB of paths) does not read them all. Raises OSError,
        ValueError or KeyError when the file is missing or damaged."""
        try:
            return cls(*_map_npz(path, ("ids", "offsets", "blob")))
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: not a paths file ({e})") from e
        except _NotMappable as e:  # compressed, or not laid out as `np.savez` writes it: read it whole
            logger.debug("%s: %s; reading it whole", path, e)
        with np.load(path, allow_pickle=False) as data:
            return cls(data["ids"], data["offsets"], data["blob"])

    def get(self, row_id: int) -> str | None:
        """The path of an id (exact file system path, as `Store.rows` gives it), or None."""
        # bisect, not np.searchsorted: a member of an .npz is mapped at any byte offset, and numpy copies a
        # misaligned array whole before searching it (8 B a row); bisect reads the ~log2(N) entries it compares
        i = bisect.bisect_left(self._ids, row_id)
        if i == len(self._ids) or self._ids[i] != row_id:
            return None
        return os.fsdecode(self._blob[self._offsets[i] : self._offsets[i + 1]].tobytes())


class _NotMappable(Exception):
    """An .npz member that cannot be memory-mapped in place."""


def _map_npz(path: Path, names: tuple[str, ...]) -> list[np.ndarray]:
    """Read-only memory maps of the named arrays of an uncompressed .npz (`np.savez` stores each member as is)."""
    arrays = []
    with zipfile.ZipFile(path) as archive, path.open("rb") as raw:
        for name in names:
            info = archive.getinfo(f"{name}.npy")  # KeyError: not one of our files
            if info.compress_type != zipfile.ZIP_STORED:
                raise _NotMappable(f"{name}.npy is compressed")
            raw.seek(info.header_offset)
            local = raw.read(30)  # the member's local header: its own name and extra field lengths come last
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: damaged archive (member {name}.npy)")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            raw.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(raw)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
            else:
                raise _NotMappable(f"{name}.npy has format version {version}")
            if fortran or dtype.hasobject or len(shape) != 1:
                raise _NotMappable(f"{name}.npy is not a flat array")
            if not shape[0]:
                arrays.append(np.zeros(0, dtype))
                continue
            arrays.append(np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape))
    return arrays


class SavedIndex(NamedTuple):
    """A saved index known to reflect its table's current state, with its paths."""

    index: AnnIndex  # read-only (memory-mapped)
    paths: PathMap
    fingerprint: str  # the table's fingerprint it is valid for


def _table_dir(store: Any) -> Path:
    """Where LanceDB keeps a local table's files."""
    return Path(store.path) / f"{store.table_name}.lance"


def _read_meta(json_path: Path) -> dict[str, Any] | None:
    """The JSON beside an index, or None when absent or unreadable."""
    try:
        return json.loads(json_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _same_space(recorded: dict[str, Any], model: ModelInfo) -> bool:
    """Whether a recorded model identity (`ModelInfo.to_dict()` through JSON) and a model make interchangeable
    vectors, as `Store.open` decides it: everything but the name must agree."""
    try:
        stored = type(model).from_dict(recorded)
    except (KeyError, TypeError, ValueError):
        return False
    return replace(stored, name=model.name) == model


def index_path(store: Any) -> Path:
    """Where a store's index metadata lives: `<db>/<table>.faiss.json`."""
    return Path(store.path) / f"{store.table_name}.faiss.json"


def save_index(
    index: AnnIndex,
    json_path: Path,
    store_version: int,
    auto: bool,
    snapshot: tuple[str, PathMap, ModelInfo] | None = None,
) -> None:
    """Write an index atomically: new uniquely named files, then an os.replace of the JSON.

    Args:
        index: the index.
        json_path: `<db>/<table>.faiss.json`.
        store_version: the store version this index reflects.
        auto: whether the type was chosen by size (and may change as the collection grows).
        snapshot: (table fingerprint, paths, stored model) taken no later than `store_version` was read, for
            `open_saved_index`; None leaves the index usable through `open_index` only.
    """
    directory = json_path.parent
    stem = json_path.name.removesuffix(".faiss.json")
    token = uuid.uuid4().hex[:12]
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "version": 1,
        "index_file": f"{stem}.{token}.faiss",
        "store_version": int(store_version),
        "ntotal": int(index.ntotal),
        "auto": bool(auto),
        "params": asdict(index.params),
        "tombstones": index.tombstones.tolist(),
        "saved_at": time.time(),
    }
    written = [meta["index_file"]]
    try:
        if isinstance(index, DiskIndex):
            meta["ondisk"] = _write_ondisk(index, directory, f"{stem}.{token}")
            written.append(meta["ondisk"]["row_map"])
        tmp = directory / f".{meta['index_file']}.tmp"
        with _removed_on_failure(tmp):
            index.write(tmp)
            os.replace(tmp, directory / meta["index_file"])
        _commit(json_path, meta, snapshot)
    except BaseException:
        previous = _named_files(_read_meta(json_path) or {})
        for name in [*written, *(meta.get("ondisk", {}).get(key) for key in ("index", "ivfdata"))]:
            if name and name not in previous:  # named by no JSON: nobody else would delete it
                (directory / name).unlink(missing_ok=True)
        raise


def _write_ondisk(index: DiskIndex, directory: Path, name: str) -> dict[str, Any]:
    """Write an on-disk index's row map; returns the JSON's `ondisk` entry naming its files."""
    reader = index.reader
    if not isinstance(reader, LanceRows):
        raise ValueError(f"an {LARGE_KIND} index is saved with its table's row map (a LanceRows reader)")
    row_map = f"{name}.rows.npy"
    tmp = directory / f".{row_map}.tmp"
    with _removed_on_failure(tmp):
        with tmp.open("wb") as f:
            np.save(f, np.asarray(reader.row_map))
        os.replace(tmp, directory / row_map)
    return {
        "index": index.files[0],
        "ivfdata": index.files[1],
        "written_as": index.written_as,
        "row_map": row_map,
        "table_version": reader.version,  # the table version the row offsets are valid for
    }


def _named_files(meta: dict[str, Any]) -> set[str]:
    """Every file a JSON names."""
    ondisk = meta.get("ondisk") or {}
    names = [meta.get("index_file"), meta.get("paths_file"), *(ondisk.get(k) for k in ("index", "ivfdata", "row_map"))]
    return {name for name in names if name}


def _commit(json_path: Path, meta: dict[str, Any], snapshot: tuple[str, PathMap, ModelInfo] | None) -> None:
    """Write the snapshot's paths file, replace the JSON, then unlink the files the old JSON named."""
    directory = json_path.parent
    previous = _read_meta(json_path) or {}
    meta = {k: v for k, v in meta.items() if k not in ("fingerprint", "paths_file", "model")}
    if snapshot is not None:
        fingerprint, paths, model = snapshot
        paths_name = meta["index_file"].removesuffix(".faiss") + f".{uuid.uuid4().hex[:6]}.paths.npz"
        tmp = directory / f".{paths_name}.tmp"
        with _removed_on_failure(tmp):
            paths.save(tmp)
            os.replace(tmp, directory / paths_name)
        meta.update(fingerprint=fingerprint, paths_file=paths_name, model=model.to_dict())
    tmp_meta = directory / f".{json_path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with _removed_on_failure(tmp_meta):
            tmp_meta.write_text(json.dumps(meta))
            os.replace(tmp_meta, json_path)
    except BaseException:
        if snapshot is not None:
            (directory / meta["paths_file"]).unlink(missing_ok=True)
        raise
    for old in _named_files(previous) - _named_files(meta):
        with contextlib.suppress(OSError):  # a reader on Windows may hold it open; it is unused anyway
            (directory / old).unlink()


@contextlib.contextmanager
def _removed_on_failure(tmp: Path) -> Iterator[None]:
    """Delete the temporary file `tmp` if the block writing and renaming it fails."""
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_index(json_path: Path, mmap: bool = False) -> tuple[AnnIndex, dict[str, Any]]:
    """Read an index saved by `save_index`; returns it and its JSON metadata.

    Args:
        json_path: `<db>/<table>.faiss.json`.
        mmap: map the index file (read-only, for searching only).

    Raises:
        StoreError: the files are missing, unreadable or inconsistent.
    """
    meta = _read_meta(json_path)
    if meta is None or meta.get("format") != _FORMAT:
        raise StoreError(f"{json_path}: not a clipsearch FAISS index")
    path = json_path.parent / meta["index_file"]
    params = IndexParams(**meta["params"])
    tombstones = np.asarray(meta.get("tombstones", []), dtype=np.int64)
    try:
        if params.kind == LARGE_KIND:
            index = _open_ondisk(json_path, meta, params, tombstones)
        else:
            index = AnnIndex.read(path, params, tombstones, mmap=mmap)
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: cannot read the FAISS index ({e}); it will be rebuilt") from e
    if index.ntotal != int(meta["ntotal"]):
        raise StoreError(f"{path}: holds {index.ntotal} vectors, its metadata says {meta['ntotal']}")
    return index, meta


def _open_ondisk(json_path: Path, meta: dict[str, Any], params: IndexParams, tombstones: RowIds) -> DiskIndex:
    """An on-disk index with the table's rows at its store version as the re-ranking's exact vectors."""
    directory = json_path.parent
    ondisk = meta["ondisk"]
    table = directory / f"{json_path.name.removesuffix('.faiss.json')}.lance"
    row_map = np.load(directory / ondisk["row_map"], mmap_mode="r")  # a query touches only its ids' pages
    reader = LanceRows(str(table), int(ondisk["table_version"]), row_map)
    return DiskIndex.open(
        directory / ondisk["index"],
        directory / ondisk["ivfdata"],
        params,
        directory / meta["index_file"],
        tombstones,
        reader,
        written_as=ondisk["written_as"],
    )


def open_saved_index(
    db_dir: str | os.PathLike[str], model_info: ModelInfo, kind: str | None = None, table: str | None = None
) -> SavedIndex | None:
    """The saved index and paths of a model's table, if they reflect the table as it is now; read without
    opening the store.

    Args:
        db_dir: the store directory.
        model_info: the model whose table to use (its own table name; a table shared under another name
            is only reached through the store).
        kind: the index type wanted; a saved index of another type gives None.
        table: another table of the model's vectors to read the index of (its sub-views, `retrieval.views`).

    Returns:
        The index (memory-mapped, read-only) with its paths; None when there is no such saved index, it
        holds no vectors, it is of another model or type, or the table has changed since it was saved. The
        caller then opens the store and uses `open_index`, which also reports what is wrong.
    """
    db_dir = Path(db_dir)
    table = table or model_info.table_name
    json_path = db_dir / f"{table}.faiss.json"
    meta = _read_meta(json_path)
    if meta is None or meta.get("format") != _FORMAT or not meta.get("fingerprint") or not meta.get("paths_file"):
        return None
    if not _same_space(meta.get("model") or {}, model_info) or (kind is not None and meta["params"]["kind"] != kind):
        return None
    if int(meta["ntotal"]) - len(meta.get("tombstones", [])) <= 0:
        return None
    fingerprint = table_fingerprint(db_dir / f"{table}.lance")
    if fingerprint != meta["fingerprint"]:
        return None
    try:
        index, loaded = load_index(json_path, mmap=True)
        if loaded.get("paths_file") != meta["paths_file"]:  # replaced since we read it: take the slow way
            return None
        paths = PathMap.load(db_dir / meta["paths_file"])
    except (StoreError, OSError, ValueError, KeyError) as e:  # e.g. replaced by a writer between two reads
        logger.debug("saved index of %s not usable: %s", table, e)
        return None
    return SavedIndex(index, paths, fingerprint)


def saved_models(db_dir: str | os.PathLike[str]) -> list[ModelInfo] | None:
    """The model of every table in a store directory, read from their saved indexes when each of them reflects
    its table as it is now; None when any table lacks such an index (then ask `Store.models`).
    """
    tables = saved_tables(db_dir)
    return None if tables is None else [model for model, _ in tables]


def saved_tables(db_dir: str | os.PathLike[str]) -> list[tuple[ModelInfo, int]] | None:
    """`saved_models` with each table's image count: (model, images) per table, or None."""
    from retrieval.model.identity import ModelInfo

    db_dir = Path(db_dir)
    try:
        # Image tables only (`retrieval.store.TABLE_PREFIX`): other tables, such as learned concepts, have no index.
        tables = sorted(
            p.name.removesuffix(".lance")
            for p in db_dir.iterdir()
            if p.name.endswith(".lance") and p.name.startswith("images_")
        )
    except OSError:
        return None
    found = []
    for table in tables:
        meta = _read_meta(db_dir / f"{table}.faiss.json") or {}
        fingerprint = meta.get("fingerprint")
        if not meta.get("model") or not fingerprint or fingerprint != table_fingerprint(db_dir / f"{table}.lance"):
            return None
        found.append((ModelInfo.from_dict(meta["model"]), int(meta["ntotal"]) - len(meta.get("tombstones", []))))
    return found


def open_index(store: Any, kind: str | None = None, save: bool = True, shard_map: MapFn | None = None) -> AnnIndex:
    """The store's nearest-neighbour index, brought up to date with the store.

    A saved index reflecting the store's current version is used as is. A stale one is updated in place
    (new ids added, gone ids removed) unless a rebuild is cheaper or needed: a different type asked for,
    a size-chosen type the collection has outgrown, an IVF that has more than doubled since training, too
    many HNSW tombstones, or an on-disk index whose delta and tombstones pass `ondisk.MAX_DELTA_FRACTION`.

    Args:
        store: an open `retrieval.store.Store`.
        kind: force flat, hnsw, ivf, ivfpq or ivfpq-disk; None keeps the saved type, or chooses by size.
        save: write the updated index back beside the store, with the snapshot `open_saved_index` reads
            (skipped, with a log line, when the directory is read-only).
        shard_map: runs an on-disk build's shard tasks, `map(fn, tasks)` (e.g. as Ray tasks); default: local
            processes.

    Returns:
        An index holding exactly the store's current row ids.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown index type {kind!r}; choose one of {', '.join(KINDS)}")
    json_path = index_path(store)
    # Taken before the version is read: any commit after this point changes the table's fingerprint, so a
    # snapshot saved with it can only ever be used for the state the index reflects (see `table_fingerprint`).
    fingerprint = table_fingerprint(_table_dir(store))
    version = store.version
    index: AnnIndex | None = None
    meta: dict[str, Any] = {}
    if json_path.exists():
        try:
            index, meta = load_index(json_path)
        except StoreError as e:
            logger.warning("%s", e)
    auto = kind is None and bool(meta.get("auto", True))
    if index is not None and kind is not None and index.kind != kind:
        index = None
    if index is not None and meta.get("store_version") == version:
        if save and fingerprint is not None and meta.get("fingerprint") != fingerprint:
            _try_save(lambda: _commit(json_path, meta, _snapshot(store, fingerprint)), json_path.parent)
        return index

    started = time.perf_counter()
    store_ids = np.sort(as_ids(store.ids()))
    if index is not None:
        index = _update(index, store, store_ids, auto)
    if index is None:
        target = kind or (choose_kind(len(store_ids)) if auto else meta["params"]["kind"])
        if target == LARGE_KIND and len(store_ids) < LARGE_MIN_VECTORS:
            logger.info("%d vectors are too few to train %s; using an exact index", len(store_ids), target)
            target = "flat"
        if target == LARGE_KIND:
            name = f"{json_path.name.removesuffix('.faiss.json')}.{uuid.uuid4().hex[:12]}"
            index = build_from_lance(str(_table_dir(store)), version, json_path.parent, name, map=shard_map)
        else:
            ids, vectors = store.all_vectors()
            index = AnnIndex.build(ids, vectors, kind=target)
    logger.info(
        "%s index over %d vectors is up to date with store version %s (%.2f s)",
        index.kind,
        len(index),
        version,
        time.perf_counter() - started,
    )
    if save:
        snapshot = _snapshot(store, fingerprint) if fingerprint is not None else None
        _try_save(lambda: save_index(index, json_path, version, auto, snapshot), json_path.parent)
    return index


def sync_index(index: AnnIndex, store: Any, kind: str | None = None) -> AnnIndex:
    """An index already in memory brought up to date with the store, without reading or writing the saved files:
    new ids added, gone ones removed, or, where `open_index` would rebuild, `open_index` itself.

    For a long-lived reader (`clipsearch serve`) while `clipsearch index` commits every few seconds: reloading
    and saving a 100k-vector index after each commit took ~1 s a time; the indexer saves it when it is done.

    Args:
        index: the index as the reader last synced it.
        store: the open store.
        kind: the index type forced, as given to `open_index`; None lets the size choose.
    """
    updated = _update(index, store, np.sort(as_ids(store.ids())), auto=kind is None)
    return updated if updated is not None else open_index(store, kind=kind)


def _snapshot(store: Any, fingerprint: str) -> tuple[str, PathMap, ModelInfo]:
    """What `open_saved_index` needs besides the index: every id's path (one scan, ~50 ms at 100k rows)."""
    catalog = store.catalog()
    return fingerprint, PathMap.from_paths(catalog.ids, catalog.paths), store.model_info


def _try_save(write: Callable[[], None], directory: Path) -> None:
    """Run a write of the index files; a read-only or full store directory only costs rebuilding later."""
    try:
        write()
    except OSError as e:
        logger.warning(
            "could not save the search index in %s (%s); each query rebuilds it until the directory is writable "
            "and has free space",
            directory,
            e.strerror or e,
        )


def _update(index: AnnIndex, store: Any, store_ids: RowIds, auto: bool) -> AnnIndex | None:
    """Apply the store's additions and removals to `index`; None when a rebuild is the better course."""
    held = index.ids()
    new = np.setdiff1d(store_ids, held, assume_unique=True)
    gone = np.setdiff1d(held, store_ids, assume_unique=True)
    n = len(store_ids)
    if auto and choose_kind(n) != index.kind:
        return None
    if index.kind in ("ivf", "ivfpq", LARGE_KIND) and n > MAX_IVF_GROWTH * max(index.params.trained_on, 1):
        return None
    if isinstance(index, DiskIndex):
        merged = index.ntotal - index.delta_size
        if index.delta_size + len(new) + len(index.tombstones) + len(gone) > MAX_DELTA_FRACTION * merged:
            return None
    if index.kind == "hnsw" and (
        (len(index.tombstones) + len(gone)) > MAX_TOMBSTONE_FRACTION * (len(held) + len(new))
        or np.isin(new, index.tombstones).any()
    ):
        return None
    index.remove(gone)
    if len(new):
        index.add(new, store.vectors_for(new))
    if isinstance(index, DiskIndex) and getattr(index.reader, "version", None) != store.version:
        # row offsets shift with commits (deletions, compaction): map the ids again at the store's version
        index.reader = LanceRows.scan(str(_table_dir(store)), store.version)
    logger.debug("index update: +%d -%d", len(new), len(gone))
    return index


def index_state(store: Any) -> dict[str, Any]:
    """What `clipsearch status` shows about the saved index: type, size, parameters and freshness."""
    meta = _read_meta(index_path(store))
    if meta is None or meta.get("format") != _FORMAT:
        return {"built": False}
    return {
        "built": True,
        "type": meta["params"]["kind"],
        "vectors": int(meta["ntotal"]) - len(meta.get("tombstones", [])),
        "up_to_date": meta.get("store_version") == store.version,
        "params": meta["params"],
    }
