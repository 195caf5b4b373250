"""Finding the image files under the folders to index.

Images are the files whose extension is of a format Pillow decodes here (`indexer.formats`). Recursive, sorted
(so runs are reproducible), case-insensitive on extensions, and safe on real photo libraries: hidden folders,
Synology's `@eaDir`, `.git`, `node_modules` and macOS AppleDouble `._*` files are skipped; symlinked folders are
followed once each, so a symlink loop cannot recurse forever; a broken symlink or an unlistable folder is
reported, not raised.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from indexer.formats import supported_extensions, unsupported_extension

logger = logging.getLogger(__name__)

SKIPPED_DIRS = frozenset({"@eaDir", ".git", "node_modules"})


class Found(NamedTuple):
    """A file the walk found: an image to consider (error None), or a problem to report (error set)."""

    path: str  # absolute, as reached through the given root (symlinks not resolved)
    size: int
    mtime_ns: int
    error: str | None = None


def is_image_name(name: str) -> bool:
    """True for a file name with a supported image extension (any case) that is not an AppleDouble file."""
    # `os.path.splitext`'s extension, without its calls (this runs for every file of every walk): none when the name
    # has no dot or only dots before its last one (".jpg" is a hidden file named "jpg")
    dot = name.rfind(".")
    return (
        dot > 0
        and name[dot:].lower() in supported_extensions()
        and not name.startswith("._")
        and bool(name[:dot].lstrip("."))
    )


def _excluded(name: str, relative: str, patterns: Sequence[str]) -> bool:
    """Whether a glob matches the entry's name or its path relative to the root (`/`-separated)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(relative, p) for p in patterns)


def walk(
    roots: Iterable[str | os.PathLike[str]], exclude: Sequence[str] = (), unsupported: Counter[str] | None = None
) -> Iterator[Found]:
    """Yield every image file under `roots`, each once, in a stable order.

    Args:
        roots: folders (or single image files) to index; made absolute, not resolved.
        exclude: glob patterns (`fnmatch`, `*` also crosses `/`) matched against each file or folder name
            and against its path relative to its root; a matching folder is not entered.
        unsupported: when given, counts the image files skipped because nothing installed decodes their format,
            by extension (".svg", ".heic" without pillow-heif).

    Yields:
        `Found` records; problems (broken symlinks, unlistable folders) come with `error` set.
    """
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()
    for root in roots:
        root = os.path.abspath(os.fsdecode(root))
        try:
            st = os.stat(root)
        except OSError as e:
            yield Found(root, 0, 0, f"cannot read the folder or file ({e.strerror})")
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_dir(root, root, st, exclude, seen_dirs, seen_files, unsupported)
        elif root not in seen_files:
            seen_files.add(root)
            yield Found(root, st.st_size, st.st_mtime_ns)


def _walk_dir(
    root: str,
    directory: str,
    dir_stat: os.stat_result,
    exclude: Sequence[str],
    seen_dirs: set[tuple[int, int]],
    seen_files: set[str],
    unsupported: Counter[str] | None,
) -> Iterator[Found]:
    """Depth-first walk of one folder; `seen_dirs` holds (device, inode) of folders already entered."""
    key = (dir_stat.st_dev, dir_stat.st_ino)
    if key in seen_dirs:
        logger.debug("skipping %s: folder already walked (symlink loop or second path)", directory)
        return
    seen_dirs.add(key)
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield Found(directory, 0, 0, f"cannot list the folder ({e.strerror})")
        return
    # Once per folder, not per file: a file's path relative to the root is the folder's plus its name.
    prefix = os.path.relpath(directory, root).replace(os.sep, "/") + "/" if exclude else ""
    prefix = "" if prefix == "./" else prefix
    subdirs = []
    for entry in entries:
        name = entry.name
        if exclude and _excluded(name, prefix + name, exclude):
            continue
        try:
            is_dir = entry.is_dir()  # follows symlinks
        except OSError:
            is_dir = False
        if is_dir:
            if not name.startswith(".") and name not in SKIPPED_DIRS:
                subdirs.append(entry)
            continue
        if not is_image_name(name):  # on the name alone: a file that is no image costs no system call
            if unsupported is not None and not name.startswith("._") and (ext := unsupported_extension(name)):
                unsupported[ext] += 1
            continue
        if entry.path in seen_files:
            continue
        try:
            st = entry.stat()  # follows symlinks
        except OSError as e:
            broken = entry.is_symlink()
            yield Found(entry.path, 0, 0, "broken symbolic link" if broken else f"cannot stat ({e.strerror})")
            continue
        if not stat.S_ISREG(st.st_mode):
            continue  # a FIFO or device named like an image would block or never end
        seen_files.add(entry.path)
        yield Found(entry.path, st.st_size, st.st_mtime_ns)
    for entry in subdirs:
        try:
            st = entry.stat()
        except OSError as e:
            yield Found(entry.path, 0, 0, f"cannot enter the folder ({e.strerror})")
            continue
        yield from _walk_dir(root, entry.path, st, exclude, seen_dirs, seen_files, unsupported)
