"""Comparing what the walk found with what the store holds: what to read, what to skip, what has gone.

Only file system metadata is used here, so an unchanged file (same path, size and mtime) is skipped without
being opened. Content hashes decide the rest later, in the workers: a new path whose bytes the store already
has is a move (its vector is kept) or a copy (its vector is reused).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from indexer.walk import Found
from retrieval.catalog import Catalog, hash_key
from retrieval.store_state import Failure

if TYPE_CHECKING:
    import numpy as np


class WorkItem(NamedTuple):
    """A file to read: new, or changed since it was stored."""

    path: str
    size: int
    mtime_ns: int
    old_id: int | None = None  # the row stored for this path, when the file changed
    old_hash: str | None = None
    refresh: bool = False  # unchanged, but read again to fill a column its row lacks (a fingerprint)


class Comparison(NamedTuple):
    """What the walk and the store's rows say by metadata alone: the first fields of a `Plan`."""

    work: list[WorkItem]  # files to read, in walk order
    unchanged: int  # files skipped without reading
    failed_unchanged: list[Failure]  # earlier failures whose file has not changed since: not read again
    walk_failures: list[Failure]  # broken symlinks, unlistable folders
    vanished: dict[int, str]  # id -> content hash of rows under the roots whose file no longer exists


class Plan(NamedTuple):
    """The outcome of comparing a walk with the store."""

    work: list[WorkItem]  # files to read, in walk order
    unchanged: int  # files skipped without reading
    failed_unchanged: list[Failure]  # earlier failures whose file has not changed since: not read again
    walk_failures: list[Failure]  # broken symlinks, unlistable folders
    vanished: dict[int, str]  # id -> content hash of rows under the roots whose file no longer exists
    known: np.ndarray  # sorted hash keys of stored content with a size some work item has
    stored_sizes: frozenset[int]  # sizes of stored files: other sizes cannot match stored content
    hash_to_ids: dict[str, set[int]]  # content hash -> the rows holding it


def is_under(path: bytes, roots: Sequence[bytes]) -> bool:
    """Whether `path` is one of `roots` or inside one."""
    return any(path == r or path.startswith(r.rstrip(b"/") + b"/") for r in roots)


def plan_sync(
    found: Iterable[Found],
    catalog: Catalog,
    roots: Sequence[str],
    failed: Iterable[Failure] = (),
    retry_failed: bool = False,
    refresh: Collection[int] = frozenset(),
    exists: Callable[[str | bytes], bool] = os.path.exists,
) -> Plan:
    """Decide what an index run has to do: `compare` the walk with the store, then gather what the workers need to
    tell moves and copies of stored content from new files.

    Args and the rules: as for `compare`.
    """
    import numpy as np  # here: an unchanged run (`indexer.unchanged`) only compares, without numpy

    comparison = compare(found, catalog, roots, failed, retry_failed, refresh, exists)
    stored_sizes = frozenset(catalog.sizes.tolist())
    wanted_sizes = {item.size for item in comparison.work} & stored_sizes
    keys = [hash_key(h) for h, s in zip(catalog.hashes, catalog.sizes.tolist(), strict=True) if s in wanted_sizes]
    known = np.unique(np.array(keys, dtype=np.uint64))
    hash_to_ids: dict[str, set[int]] = {}
    for i, h in zip(catalog.ids.tolist(), catalog.hashes, strict=True):
        hash_to_ids.setdefault(h, set()).add(i)
    return Plan(*comparison, known, stored_sizes, hash_to_ids)


def compare(
    found: Iterable[Found],
    catalog: Catalog,
    roots: Sequence[str],
    failed: Iterable[Failure] = (),
    retry_failed: bool = False,
    refresh: Collection[int] = frozenset(),
    exists: Callable[[str | bytes], bool] = os.path.exists,
) -> Comparison:
    """Sort what the walk found into files to read, unchanged files, failures, and rows whose file is gone.

    Args:
        found: the walk's results.
        catalog: what the store holds.
        roots: the folders (or files) being indexed, absolute. Rows outside them are never touched; rows
            under a root that does not exist (an unmounted drive) are not removed either.
        failed: the failures recorded by earlier runs; a file with the size and mtime it failed with is not read
            again (it would only fail again), unless `retry_failed`.
        retry_failed: read every earlier failure again.
        refresh: ids of rows to read again even when their file is unchanged (rows an older version wrote
            without a fingerprint); their vectors are kept, nothing is encoded.
        exists: whether a root or a stored file exists (a distributed run's roots may be object-store URIs).
    """
    by_path = dict(zip(catalog.paths, range(len(catalog.paths)), strict=True))
    # `os.fsencode`, without its call per file
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    earlier = {} if retry_failed else {f.path: f for f in failed if f.size is not None}
    seen: set[bytes] = set()
    work: list[WorkItem] = []
    failures: list[Failure] = []
    failed_unchanged: list[Failure] = []
    unchanged = 0
    for path, size, mtime_ns, error in found:
        raw = path.encode(encoding, errors)
        if error is not None:
            failures.append(Failure(path, "walk", error))
            continue
        seen.add(raw)
        failure = earlier.get(path)
        if failure is not None and failure.matches(size, mtime_ns):
            failed_unchanged.append(failure)
            continue
        row = by_path.get(raw)
        if row is None:
            work.append(WorkItem(path, size, mtime_ns))
        elif catalog.sizes[row] == size and catalog.mtimes_ns[row] == mtime_ns:
            if int(catalog.ids[row]) in refresh:
                work.append(WorkItem(path, size, mtime_ns, int(catalog.ids[row]), catalog.hashes[row], True))
            else:
                unchanged += 1
        else:
            work.append(WorkItem(path, size, mtime_ns, int(catalog.ids[row]), catalog.hashes[row]))

    present_roots = [os.fsencode(r) for r in roots if exists(r)]
    vanished = {
        int(catalog.ids[i]): catalog.hashes[i]
        for i, p in enumerate(catalog.paths)
        if p not in seen and is_under(p, present_roots) and not exists(p)
    }
    return Comparison(work, unchanged, failed_unchanged, failures, vanished)
