"""Where a store lives, what the indexer's sync needs to know about a table's rows, and a copy of it kept beside
the table; all without importing LanceDB, pyarrow or numpy.

The copy, `<db>/<table>.catalog`, holds every row's id, path, size, mtime and content hash, the table's fingerprint
(`table_fingerprint`) taken before those rows were read, the model identity, and a SHA-256 of all of it. An index
run whose folders have not changed plans from it alone: no LanceDB import (~2 s), no model, no workers. It is only
ever a shortcut: `load_catalog` returns it only while the table's fingerprint is the one it records and its digest
checks out; any commit since (including one by a run killed before it could rewrite the copy), a damaged or edited
file, gives None, and the caller reads the store instead. It is replaced atomically (a new file renamed over the old
one), so a reader sees a whole file or none.

The file is laid out to be read in one go with the standard library (an unchanged run of 10,000 files spends a few
milliseconds on it): a format line, a JSON header line (fingerprint, model, row count, the byte length of each
section), the sections (ids, sizes and mtimes as little-endian int64; paths and hashes joined by NUL, which neither
holds: one that did would split into too many rows, and the copy would not be trusted), then the hex SHA-256 of
everything before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import uuid
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from retrieval.errors import StoreError

if TYPE_CHECKING:
    import numpy as np

    from retrieval.model.identity import ModelInfo

    # A column of int64s: numpy's from `Store.catalog()`, the standard library's from a copy `load_catalog` read.
    Int64s = np.ndarray | array[int]

logger = logging.getLogger(__name__)

_FORMAT = b"clipsearch-catalog-2"
_LEGACY_SUFFIX = ".catalog.npz"  # the numpy copy of earlier versions: removed when a copy is written
_SECTIONS = ("ids", "sizes", "mtimes_ns", "paths", "hashes")  # in file order
_DIGEST_LENGTH = 64  # hex SHA-256


class Catalog(NamedTuple):
    """What sync needs to know about every stored row, as parallel arrays."""

    ids: Int64s  # the store's row ids
    paths: list[bytes]  # os.fsencode(path)
    sizes: Int64s
    mtimes_ns: Int64s
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
    import numpy as np  # here: the copy is read, and an unchanged run planned, without numpy

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
    """Where a table's catalogue copy lives: `<db>/<table>.catalog`."""
    return Path(db_dir) / f"{table_name}.catalog"


def _int64_bytes(values: Int64s) -> bytes:
    """A column as little-endian int64 bytes."""
    if hasattr(values, "astype"):  # numpy: one copy at most, whatever the length
        return values.astype("<i8", copy=False).tobytes()
    column = array("q", values)
    if sys.byteorder == "big":
        column.byteswap()
    return column.tobytes()


def _int64s(data: bytes) -> array[int]:
    """The inverse of `_int64_bytes`."""
    column = array("q")
    column.frombytes(data)
    if sys.byteorder == "big":
        column.byteswap()
    return column


def _encode(catalog: Catalog, fingerprint: str, model: ModelInfo) -> bytes:
    """The file's bytes: format line, header line, sections, digest."""
    sections = {
        "ids": _int64_bytes(catalog.ids),
        "sizes": _int64_bytes(catalog.sizes),
        "mtimes_ns": _int64_bytes(catalog.mtimes_ns),
        "paths": b"\0".join(catalog.paths),
        "hashes": "\0".join(catalog.hashes).encode(),
    }
    header = {
        "fingerprint": fingerprint,
        "model": model.to_dict(),
        "rows": len(catalog.paths),
        "lengths": {name: len(sections[name]) for name in _SECTIONS},
    }
    body = b"".join([_FORMAT, b"\n", json.dumps(header, sort_keys=True).encode(), b"\n", *sections.values()])
    return body + hashlib.sha256(body).hexdigest().encode()


def _decode(data: bytes) -> tuple[dict, Catalog]:
    """The header and rows of a file's bytes; ValueError (or KeyError, TypeError) when they do not make one."""
    body, digest = data[:-_DIGEST_LENGTH], data[-_DIGEST_LENGTH:]
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise ValueError("its digest does not match its contents")
    header, rest = _header(body)
    rows, lengths = int(header["rows"]), header["lengths"]
    sections, offset = {}, 0
    for name in _SECTIONS:
        sections[name] = rest[offset : offset + int(lengths[name])]
        offset += int(lengths[name])
    if offset != len(rest):
        raise ValueError("its sections do not add up to its length")
    catalog = Catalog(
        ids=_int64s(sections["ids"]),
        paths=sections["paths"].split(b"\0") if rows else [],
        sizes=_int64s(sections["sizes"]),
        mtimes_ns=_int64s(sections["mtimes_ns"]),
        hashes=sections["hashes"].decode().split("\0") if rows else [],
    )
    if {len(column) for column in catalog} != {rows}:
        raise ValueError("its columns differ in length")
    return header, catalog


def _header(data: bytes) -> tuple[dict, bytes]:
    """The JSON header of a file (or of its first lines), and the bytes after it."""
    magic, header, rest = data.split(b"\n", 2)
    if magic != _FORMAT:
        raise ValueError(f"it is not a {_FORMAT.decode()} file")
    parsed = json.loads(header)
    if not isinstance(parsed, dict):
        raise ValueError("its header is not an object")
    return parsed, rest


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
        tmp.write_bytes(_encode(catalog, fingerprint, model))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        (Path(db_dir) / f"{table_name}{_LEGACY_SUFFIX}").unlink()


def remove_catalog(db_dir: str | os.PathLike[str], table_name: str) -> None:
    """Delete a table's catalogue copy (and one an earlier version left), if there is one."""
    for path in (catalog_path(db_dir, table_name), Path(db_dir) / f"{table_name}{_LEGACY_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()


def catalog_model(db_dir: str | os.PathLike[str], table_name: str) -> ModelInfo | None:
    """The model identity a table's catalogue copy records (read alone, not checked against the table: for picking
    a table, whose copy `load_catalog` then checks); None when there is no readable copy."""
    from retrieval.model.identity import ModelInfo

    try:
        with catalog_path(db_dir, table_name).open("rb") as f:
            head = f.readline() + f.readline()
        return ModelInfo.from_dict(_header(head)[0]["model"])
    except (OSError, ValueError, KeyError, TypeError):
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
        header, catalog = _decode(path.read_bytes())
        if header["fingerprint"] != table_fingerprint(Path(db_dir) / f"{table_name}.lance"):
            logger.debug("%s is older than the table; reading the store instead", path)
            return None
        return ModelInfo.from_dict(header["model"]), catalog
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # damaged or edited (UnicodeDecodeError is a ValueError)
        logger.info("cannot use %s (%s); reading the store instead", path, e)
        return None
