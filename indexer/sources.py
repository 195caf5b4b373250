"""What an index run reads: local folders (`walk`), `file://` and object-store URIs (listed through pyarrow's file
systems), and manifests (Parquet, CSV or JSONL files listing paths or URIs).

Every source comes out as the walk's `Found` records plus the roots the sync plan compares the store with, so the
sync rules (new / changed / unchanged / moved / removed) are the same whatever the source. A `file://` URI becomes
the local path it names, so its rows are the rows a folder index gives. Other URIs (`s3://bucket/photos`) stay URIs:
the decoder reads them through pyarrow (`indexer.decode.read_bytes`).
"""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import NamedTuple
from urllib.parse import unquote, urlparse

from indexer.walk import SKIPPED_DIRS, Found, is_image_name, walk
from retrieval.errors import ClipsearchError

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
_PATH_COLUMNS = ("path", "uri", "url", "file")  # the column of a manifest that names the files, first found


class SourceError(ClipsearchError):
    """A source that cannot be listed: an unreadable manifest, an unknown URI scheme."""


class Listing(NamedTuple):
    """The files found under the sources, and the roots rows are synced against."""

    found: list[Found]
    roots: list[str]  # absolute local paths or URIs; rows under a root whose file is gone are removed


def is_uri(source: str) -> bool:
    """Whether `source` is a URI (`s3://...`, `file://...`) rather than a local path."""
    scheme = urlparse(source).scheme
    return len(scheme) > 1 and "://" in source  # one letter: a Windows drive


def is_manifest(source: str) -> bool:
    """Whether `source` names a manifest file (by its extension)."""
    return not is_uri(source) and source.lower().endswith(MANIFEST_SUFFIXES) and os.path.isfile(source)


def local_path(uri: str) -> str:
    """The local path a `file://` URI names."""
    return unquote(urlparse(uri).path)


def list_sources(
    sources: Sequence[str], exclude: Sequence[str] = (), unsupported: Counter[str] | None = None
) -> Listing:
    """Find the image files of `sources`.

    Args:
        sources: local folders or files, `file://` or object-store URIs, manifests.
        exclude: glob patterns, as for `walk` (matched against names and paths relative to a folder or prefix).
        unsupported: counts image files nothing here decodes, by extension (local folders only).

    Raises:
        SourceError: a manifest cannot be read or has no path column; a URI's file system is unknown.
    """
    found: list[Found] = []
    roots: list[str] = []
    folders: list[str] = []
    for source in sources:
        if is_manifest(source):
            listed = _read_manifest(source)
            found.extend(_stat(listed))
            roots.extend(listed)
        elif is_uri(source):
            found.extend(_list_prefix(source, exclude))
            roots.append(local_path(source).rstrip("/") if _is_file_uri(source) else source.rstrip("/"))
        else:
            folders.append(source)
    folders = [os.path.abspath(os.fsdecode(f)) for f in folders]
    found[:0] = walk(folders, exclude, unsupported)
    return Listing(found, [*folders, *roots])


def _is_file_uri(uri: str) -> bool:
    """Whether `uri` is a `file://` URI."""
    return urlparse(uri).scheme == "file"


def exists(path: str | bytes) -> bool:
    """Whether a local path or a URI names an existing file or folder (an unreachable store counts as absent)."""
    text = os.fsdecode(path)
    if not is_uri(text):
        return os.path.exists(text)
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(text)
        return filesystem.get_file_info(inner).type != fs.FileType.NotFound
    except (OSError, ValueError):
        return False


def _list_prefix(uri: str, exclude: Sequence[str]) -> Iterator[Found]:
    """The image files under an object-store prefix (or the one object it names), sorted, as `Found` records."""
    from pyarrow import fs

    try:
        filesystem, prefix = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(prefix)
        infos = [info] if info.type == fs.FileType.File else filesystem.get_file_info(fs.FileSelector(prefix, True))
    except (OSError, ValueError) as e:
        yield Found(uri, 0, 0, f"cannot list ({e})")
        return
    # a local file's row holds its path, as a folder index would; an object's holds its URI
    base = "" if _is_file_uri(uri) else uri.split("://", 1)[0] + "://"
    for info in sorted(infos, key=lambda i: i.path):
        relative = info.path[len(prefix) :].lstrip("/")
        folders = relative.split("/")[:-1]
        if info.type != fs.FileType.File or not is_image_name(info.base_name):
            continue
        if any(f.startswith(".") or f in SKIPPED_DIRS for f in folders):  # as `walk` skips them
            continue
        if any(fnmatch.fnmatchcase(info.base_name, p) or fnmatch.fnmatchcase(relative, p) for p in exclude):
            continue
        yield Found(base + info.path, info.size, int(info.mtime_ns or 0))


def _read_manifest(path: str) -> list[str]:
    """The paths or URIs a manifest lists, in its order, without repeats; relative paths are taken relative to the
    manifest's folder, `file://` URIs become local paths."""
    import pyarrow as pa

    lower = path.lower()
    try:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif lower.endswith(".csv"):
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        else:
            import pyarrow.json as pjson

            table = pjson.read_json(path)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot read the manifest {path}: {e}; give a Parquet, CSV or JSONL file") from e
    names = [n for n in _PATH_COLUMNS if n in table.column_names]
    if not names:
        if len(table.column_names) != 1:
            raise SourceError(
                f"the manifest {path} has no column named {' or '.join(_PATH_COLUMNS)} (it has "
                f"{', '.join(table.column_names)}); name the column of paths or URIs `path`"
            )
        names = table.column_names
    folder = os.path.dirname(os.path.abspath(path))
    entries = []
    for value in table.column(names[0]).to_pylist():
        if not value:
            continue
        value = str(value)
        if is_uri(value):
            entries.append(local_path(value) if _is_file_uri(value) else value)
        else:
            entries.append(os.path.join(folder, value))  # an absolute path stays as it is
    return list(dict.fromkeys(entries))


def _stat(entries: list[str]) -> Iterator[Found]:
    """Size and mtime of each listed file; a missing or unreadable one becomes a `Found` with an error."""
    for entry in entries:
        if is_uri(entry):
            from pyarrow import fs

            try:
                filesystem, inner = fs.FileSystem.from_uri(entry)
                info = filesystem.get_file_info(inner)
            except (OSError, ValueError) as e:
                yield Found(entry, 0, 0, f"cannot read ({e})")
                continue
            if info.type != fs.FileType.File:
                yield Found(entry, 0, 0, "listed in the manifest but not found")
                continue
            yield Found(entry, info.size, int(info.mtime_ns or 0))
            continue
        try:
            st = os.stat(entry)
        except OSError as e:
            yield Found(entry, 0, 0, f"listed in the manifest but cannot be read ({e.strerror})")
            continue
        yield Found(entry, st.st_size, st.st_mtime_ns)
