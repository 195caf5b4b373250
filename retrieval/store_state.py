"""A table's bookkeeping beside its data: the id sequence, the folders ever indexed into it, recent indexing runs
and the files that failed.

Kept in one small JSON file per table, replaced atomically (write, fsync, rename), so a reader never sees
half of it and a crash leaves the previous version. Only the indexer, holding the write lock, writes it.
Paths are stored as Python text; names that are not UTF-8 survive as surrogate escapes (JSON `\\udcNN`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from retrieval.errors import StoreError, StoreWriteError

if TYPE_CHECKING:
    from retrieval.types import RowIds

STATE_VERSION = 1
KEEP_RUNS = 20  # runs remembered for `clipsearch status`


class Failure(NamedTuple):
    """A file that could not be indexed."""

    path: str
    stage: str  # walk, read, decode, preprocess, worker, encode
    reason: str
    size: int | None = None  # the file's size and mtime when it failed: an unchanged file is not retried
    mtime_ns: int | None = None

    def to_dict(self) -> dict[str, str]:
        """What a user is shown: {"path", "stage", "reason"} (size and mtime are bookkeeping)."""
        return {"path": self.path, "stage": self.stage, "reason": self.reason}

    def matches(self, size: int, mtime_ns: int) -> bool:
        """Whether the file is as it was when it failed (same size and mtime)."""
        return self.size == size and self.mtime_ns == mtime_ns


class StoreState:
    """Reads and atomically rewrites one table's `<table>.state.json`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        """The whole state; an empty one when the file does not exist yet.

        Raises:
            StoreError: the file exists but is not valid state JSON.
        """
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"version": STATE_VERSION, "next_id": 1, "runs": [], "failures": []}
        except (OSError, ValueError) as e:
            raise StoreError(
                f"cannot read {self.path} ({e}); delete it (only the run history and failure list are lost)"
            ) from e
        if not isinstance(data, dict) or data.get("version", 0) > STATE_VERSION:
            raise StoreError(f"{self.path} was written by a newer clipsearch; upgrade clipsearch")
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Replace the file atomically and durably.

        Raises:
            StoreWriteError: the disk is full or read-only (the previous file is left as it was).
        """
        data = {**data, "version": STATE_VERSION, "runs": data.get("runs", [])[-KEEP_RUNS:]}
        try:
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise StoreWriteError.from_error(self.path.parent, e) from e

    def allocate_ids(self, n: int, floor: int) -> RowIds:
        """Reserve `n` ids >= `floor` and above every id reserved before; persisted before they are used."""
        import numpy as np  # here: an index run with nothing to do reads and records its state without numpy

        data = self.load()
        start = max(int(data.get("next_id", 1)), floor)
        data["next_id"] = start + n
        self.save(data)
        return np.arange(start, start + n, dtype=np.int64)

    def runs(self) -> list[dict[str, Any]]:
        """Recent runs, oldest first."""
        return list(self.load().get("runs", []))

    def roots(self) -> list[str]:
        """Every folder (or file) a run has indexed into this table, in the order first indexed.

        A state written before roots were kept has none: the roots of its recorded runs stand in for them.
        """
        return _roots(self.load())

    def failures(self) -> list[Failure]:
        """Files that failed in the latest runs, sorted by path (older states recorded no size and mtime)."""
        return [Failure(*f) for f in self.load().get("failures", [])]

    def record(self, run: dict[str, Any], failures: list[Failure]) -> None:
        """Store `run` (replacing the entry with the same `run_id`), add its roots to the table's roots, and store
        the current list of failures."""
        data = self.load()
        runs = [r for r in data.get("runs", []) if r.get("run_id") != run["run_id"]]
        # Roots outlive the run history (KEEP_RUNS): the web app serves files only from under them.
        data["roots"] = _merged(_roots(data), run.get("roots", []))
        data["runs"] = [*runs, run]
        data["failures"] = [list(f) for f in sorted(failures, key=lambda f: (f.path, f.stage, f.reason))]
        self.save(data)


def _roots(data: dict[str, Any]) -> list[str]:
    """The state's roots, or for a state from before they were kept, the roots of its recorded runs."""
    if "roots" in data:
        return list(data["roots"])
    return _merged([], [root for run in data.get("runs", []) for root in run.get("roots", [])])


def _merged(roots: list[str], more: list[str]) -> list[str]:
    """`roots` followed by those of `more` not in it yet."""
    return list(dict.fromkeys([*roots, *more]))
