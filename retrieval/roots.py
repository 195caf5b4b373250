"""The folders a store indexed ("roots"): short display names, paths relative to them, and whether a file,
symlinks resolved, is still inside one of them.

The web app shows an image as (root name, relative path) and never sends an absolute path; it serves a file
only when its resolved path is under a resolved root, so a symlink swapped in for an indexed file cannot
point it anywhere else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

from retrieval.errors import QueryError


class Located(NamedTuple):
    """Where an image sits: the display name of its root and its path inside that root."""

    root: str  # the root's display name
    path: str  # relative, "/"-separated, valid UTF-8 (undecodable bytes as \\xNN)


def display(text: str) -> str:
    """Valid UTF-8 text for a path that may hold undecodable bytes (surrogate escapes)."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _inside(path: str, root: str) -> bool:
    """Whether `path` is strictly inside the folder `root` (both absolute and normalised)."""
    return path.startswith(root.rstrip(os.sep) + os.sep)


class Roots:
    """The roots of a store, each with a unique display name: its base name, "photos (2)" on a clash.

    Args:
        roots: absolute paths, as the state file records them (`StoreState.roots`).
    """

    def __init__(self, roots: Sequence[str]) -> None:
        self.paths = [os.path.normpath(r) for r in roots]
        self.names: list[str] = []
        for path in self.paths:
            base = display(os.path.basename(path)) or display(path)  # "/" has no base name
            name, n = base, 1
            while name in self.names:
                n += 1
                name = f"{base} ({n})"
            self.names.append(name)

    def locate(self, path: str) -> Located | None:
        """The root name and relative path of an absolute path: under the innermost root holding it (a root
        that is a file shows as its own name under its folder's name); None when no root holds it."""
        path = os.path.normpath(path)
        inside = [(len(r), i) for i, r in enumerate(self.paths) if _inside(path, r)]
        if inside:
            i = max(inside)[1]
            relative = os.path.relpath(path, self.paths[i])
            return Located(self.names[i], display(relative).replace(os.sep, "/"))
        if path in self.paths:
            folder = os.path.dirname(path)
            return Located(display(os.path.basename(folder)) or "/", display(os.path.basename(path)))
        return None

    def folder(self, spec: str) -> str:
        """The absolute folder for `"<root name>"` or `"<root name>/<folder inside it>"`.

        Raises:
            QueryError: an unknown root name, or a folder that is absolute or climbs out with `..`.
        """
        name, _, inner = spec.strip("/").partition("/")
        if name not in self.names:
            known = ", ".join(repr(n) for n in self.names) or "none yet"
            raise QueryError(f"unknown folder {spec!r}: start it with the name of an indexed folder ({known})")
        parts = [p for p in inner.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts) or "\x00" in inner:
            raise QueryError(f"folder {spec!r} must stay inside {name!r}: no '..' parts")
        return os.path.join(self.paths[self.names.index(name)], *parts)

    def holds_real(self, path: str) -> bool:
        """Whether `path` with every symlink resolved is one of the roots or inside one (the roots resolved too)."""
        real = os.path.realpath(path)
        for root in self.paths:
            real_root = os.path.realpath(root)
            if real == real_root or _inside(real, real_root):
                return True
        return False
