"""Where a store lives, what the indexer's sync needs to know about a table's rows, and a copy of it kept beside
the table; all without importing LanceDB or pyarrow.

The copy, `<db>/<table>.catalog.npz`, holds every row's id, path, size, mtime and content hash, the table's
fingerprint (`table_fingerprint`) taken before those rows were read, the model identity, and a digest of all of
it. An index run whose folders have not changed plans from it alone: no LanceDB import (~2 s), no model, no
workers. It is only ever a shortcut: `load_catalog` returns it only while the table's fingerprint is the one it
records and its digest checks out; any commit since (including one by a run killed before it could rewrite the
copy), a damaged or edited file, gives None, and the caller reads the store instead. It is replaced atomically
(a new file renamed over the old one), so a reader sees a whole file or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from retrieval.errors import StoreError
from retrieval.types import RowIds

if TYPE_CHECKING:
    from retrieval.model.identity import ModelInfo

logger = logging.getLogger(__name__)

_FORMAT = "clipsearch-catalog-1"


class Catalog(NamedTuple):
    """What sync needs to know about every stored row, as parallel arrays."""

    ids: RowIds
    paths: list[bytes]  # os.fsencode(path)
    sizes: np.ndarray  # int64
    mtimes_ns: np.ndarray  # int64
    hashes: list[str]


def default_db_dir() -> Path:
    """`$CLIPSEARCH_HOME`, else `~/.local/share/clipsearch`."""
    home = os.environ.get("CLIPSEARCH_HOME")
    return Path(home).expanduser() if home else Path.home() / ".local" / "share" / "clipsearch"


# "s3://bucket", "gs://...", "az://..."; also as `Path` leaves them ("s3:/bucket"). Two letters at least: not "C:/".
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def store_dir(db_dir: str | os.PathLike[str] | None) -> Path:
    """The store directory (`default_db_dir()` for None); an object-store URI is refused with what to do instead.

    Raises:
        StoreError: `db_dir` (or `$CLIPSEARCH_HOME`) is a URI.
    """
    path = Path(db_dir).expanduser() if db_dir is not None else default_db_dir()
    if _URI.match(os.fspath(db_dir) if db_dir is not None else os.fspath(path)):
        where = os.fspath(db_dir) if db_dir is not None else os.environ.get("CLIPSEARCH_HOME", os.fspath(path))
        raise StoreError(
            f"{where}: the store must be a directory (local, or a network file system every node mounts); "
            "object-store URIs are not supported as --db, since the lock and state files kept beside the table "
            "are local files: mount the bucket (s3fs, gcsfuse, blobfuse) and pass the mount's path"
        )
    return path


def hash_key(content_hash: str) -> np.uint64:
    """The first 64 bits of a hex content hash: a compact key for the known-content lookup."""
    return np.uint64(int(content_hash[:16], 16))


def table_fingerprint(table_dir: Path) -> str | None:
    """A digest of a LanceDB table's committed versions; None when it cannot be taken.

    Lance writes every commit (insert, delete, merge, schema change, compaction) as a new, never reused
    manifest file under `<table>.lance/_versions/`, and its cleanup only deletes old ones, so the names, sizes
    and mtimes of those files (with the folder's inode, for a table dropped and created again) change with
    every change to the table. An equal fingerprint therefore means an unchanged table; any doubt (a missing
    folder, another layout) gives None, which never matches.
    """
    versions = table_dir / "_versions"
    try:
        entries = sorted(
            (entry.name, (stat := entry.stat()).st_size, stat.st_mtime_ns)
            for entry in os.scandir(versions)
            if entry.name.endswith(".manifest")
        )
        inode = table_dir.stat().st_ino
    except OSError:
        return None
    if not entries:
        return None
    return hashlib.sha256(repr((inode, entries)).encode()).hexdigest()


def catalog_path(db_dir: str | os.PathLike[str], table_name: str) -> Path:
    """Where a table's catalogue copy lives: `<db>/<table>.catalog.npz`."""
    return Path(db_dir) / f"{table_name}.catalog.npz"


def _arrays(catalog: Catalog, fingerprint: str, model: ModelInfo) -> dict[str, np.ndarray]:
    """The file's arrays, the digest over all the others last."""
    offsets = np.zeros(len(catalog.paths) + 1, np.int64)
    np.cumsum([len(p) for p in catalog.paths], out=offsets[1:])
    arrays = {
        "format": np.array(_FORMAT),
        "fingerprint": np.array(fingerprint),
        "model": np.array(json.dumps(model.to_dict(), sort_keys=True)),
        "ids": np.asarray(catalog.ids, np.int64),
        "sizes": np.asarray(catalog.sizes, np.int64),
        "mtimes_ns": np.asarray(catalog.mtimes_ns, np.int64),
        "offsets": offsets,
        "paths": np.frombuffer(b"".join(catalog.paths), np.uint8),
        "hashes": np.array([h.encode() for h in catalog.hashes], dtype=np.bytes_).reshape(-1),
    }
    arrays["digest"] = np.array(_digest(arrays))
    return arrays


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array but the digest: its name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        if name != "digest":
            value = np.ascontiguousarray(arrays[name])
            digest.update(f"{name}|{value.dtype.str}|{value.shape}\n".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def save_catalog(
    db_dir: str | os.PathLike[str], table_name: str, fingerprint: str, model: ModelInfo, catalog: Catalog
) -> None:
    """Replace the table's catalogue copy atomically.

    Args:
        db_dir: the store directory.
        table_name: the table's name.
        fingerprint: `table_fingerprint` of the table, taken before `catalog` was read from it, so a commit in
            between makes the copy stale rather than wrong.
        model: the table's model identity.
        catalog: the table's rows (`Store.catalog()`).

    Raises:
        OSError: it could not be written (the previous copy, if any, is left as it was).
    """
    path = catalog_path(db_dir, table_name)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as f:
            np.savez(f, **_arrays(catalog, fingerprint, model))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_catalog(db_dir: str | os.PathLike[str], table_name: str) -> None:
    """Delete a table's catalogue copy, if there is one."""
    with contextlib.suppress(OSError):
        catalog_path(db_dir, table_name).unlink()


def catalog_model(db_dir: str | os.PathLike[str], table_name: str) -> ModelInfo | None:
    """The model identity a table's catalogue copy records (read alone, not checked against the table: for picking
    a table, whose copy `load_catalog` then checks); None when there is no readable copy."""
    from retrieval.model.identity import ModelInfo

    try:
        with np.load(catalog_path(db_dir, table_name), allow_pickle=False) as data:
            return ModelInfo.from_dict(json.loads(str(data["model"])))
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None


def load_catalog(db_dir: str | os.PathLike[str], table_name: str) -> tuple[ModelInfo, Catalog] | None:
    """The table's catalogue copy and model identity, if the copy reflects the table as it is now.

    Returns:
        (model, catalog); None when there is no copy, it cannot be read, its digest does not match its contents,
        or the table has changed (or cannot be fingerprinted) since the copy was written.
    """
    from retrieval.model.identity import ModelInfo

    path = catalog_path(db_dir, table_name)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        if str(arrays["format"]) != _FORMAT or str(arrays["digest"]) != _digest(arrays):
            logger.info("%s does not match its digest; reading the store instead", path)
            return None
        if str(arrays["fingerprint"]) != table_fingerprint(Path(db_dir) / f"{table_name}.lance"):
            logger.debug("%s is older than the table; reading the store instead", path)
            return None
        model = ModelInfo.from_dict(json.loads(str(arrays["model"])))
        offsets, blob = arrays["offsets"].tolist(), arrays["paths"].tobytes()
        catalog = Catalog(
            ids=arrays["ids"],
            paths=[blob[start:end] for start, end in zip(offsets[:-1], offsets[1:], strict=True)],
            sizes=arrays["sizes"],
            mtimes_ns=arrays["mtimes_ns"],
            hashes=[h.decode() for h in arrays["hashes"].tolist()],
        )
    except FileNotFoundError:
        return None
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        EOFError,
        zipfile.BadZipFile,
    ) as e:  # a damaged file: np.load raises all these
        logger.info("cannot read %s (%s); reading the store instead", path, e)
        return None
    if (
        not len(catalog.ids)
        == len(catalog.paths)
        == len(catalog.sizes)
        == len(catalog.mtimes_ns)
        == len(catalog.hashes)
    ):
        return None
    return model, catalog
