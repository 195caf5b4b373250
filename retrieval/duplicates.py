"""Near-duplicate groups: the same picture re-encoded, resized, lightly cropped or brightened, and burst frames.

Two stored images are duplicates when their files have the same content hash (exact copies), or when their
vectors' cosine reaches the threshold AND their perceptual fingerprints (`retrieval.fingerprint`) differ in at
most `MAX_DISTANCE` bits. Every stored vector is range-searched in the store's FAISS index (exact for a flat
index, as accurate as the index otherwise). Pairs are joined into groups with union-find, so a burst whose first
and last frames differ a little more still forms one group through the frames between.

Why both: an embedding says what a picture shows, so two different photos of the same kind of scene can embed
as close as two copies of one photo (with shapes-mini, distinct scenes differing only in background texture reach
cosine 0.986-0.997, above re-encodes and crops at 0.96-0.99). Their pixels differ where copies' do not, and the
fingerprint sees that. A row without a fingerprint (written by a version before them, until the next `index` run
fills it) is judged by the cosine alone.

Each group is ordered by its best pick first: the largest picture (pixel count), then the oldest capture
time (the original rather than a later copy; missing times last), then the shortest path, then the lowest id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from retrieval.errors import QueryError
from retrieval.fingerprint import distance

if TYPE_CHECKING:
    from retrieval.faiss_index import AnnIndex
    from retrieval.store import Store

logger = logging.getLogger(__name__)

# Cosine at or above which two stored images are near-duplicates (with fingerprints that agree). From
# benchmarks/duplicates.py with shapes-mini on design seeds 101 and 102: with the fingerprint gate, pairwise
# precision and recall are the same for every cosine from 0.93 to 0.96; 0.96 (the default before fingerprints) is
# kept. clip-retrieval uses 0.94 with ViT-B/32-class models.
DEFAULT_THRESHOLD = 0.96
# Most fingerprint bits (of 63) two near-duplicates may differ in. Chosen on design seeds 101 / 102 at cosine 0.96:
# 14 and 16 bits give precision 0.993 / 0.999-1.000 and recall 0.989 / 1.000; 12 loses a crop on seed 102, 18 and
# up join more distinct scenes (precision 0.986 / 0.992). 16 leaves bursts and crops the most room. The cosine
# alone gave precision 0.970 / 0.983 there. Held-out figures per seed: README, "Near-duplicates".
MAX_DISTANCE = 16
_CHUNK = 4096  # query vectors per range search (bounds the result lists held at once)


class DuplicateMember(NamedTuple):
    """One image of a duplicate group."""

    id: int  # the store's row id
    path: str
    width: int | None
    height: int | None
    taken_at: datetime | None  # EXIF capture time
    similarity: float  # cosine with the group's best member (1.0 for itself and exact copies)


class DuplicateGroup(NamedTuple):
    """Near-identical images, the best pick first."""

    members: list[DuplicateMember]

    @property
    def best(self) -> DuplicateMember:
        """The member to keep: largest, then oldest, then shortest path."""
        return self.members[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: {"best": path, "size": n, "members": [{id, path, width, height, taken_at, similarity}]}."""
        members = [
            member._asdict() | {"taken_at": member.taken_at.isoformat() if member.taken_at else None}
            for member in self.members
        ]
        return {"best": self.best.path, "size": len(self.members), "members": members}


def _find(parent: dict[int, int], i: int) -> int:
    """The root of i's set, halving the path on the way."""
    while parent.setdefault(i, i) != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union(parent: dict[int, int], a: int, b: int) -> None:
    """Join a's and b's sets."""
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)


def _best_first(row: dict[str, Any]) -> tuple[Any, ...]:
    """Sort key of the best-pick rule."""
    pixels = (row["width"] or 0) * (row["height"] or 0)
    taken = row["taken_at"]
    return (-pixels, taken is None, taken or datetime.min, len(row["path"]), row["id"])


def find_duplicates(
    store: Store, index: AnnIndex, threshold: float = DEFAULT_THRESHOLD, max_distance: int | None = MAX_DISTANCE
) -> list[DuplicateGroup]:
    """Groups of near-duplicate images in a store.

    Args:
        store: the open store.
        index: its FAISS index, up to date (`retrieval.ann.open_index`).
        threshold: the cosine at or above which two images are duplicates, in (0, 1].
        max_distance: the most fingerprint bits two duplicates may differ in; None judges by the cosine alone.

    Returns:
        Groups of two or more images, each best pick first; groups ordered by their best member's path.

    Raises:
        QueryError: a threshold outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise QueryError(f"duplicate threshold {threshold}: give a cosine in (0, 1], e.g. {DEFAULT_THRESHOLD}")
    parent: dict[int, int] = {}
    hashes = store.rows(store.ids(), columns=["id", "content_hash"])
    by_hash: dict[str, int] = {}
    for row in hashes:
        first = by_hash.setdefault(row["content_hash"], row["id"])
        if first != row["id"]:
            _union(parent, first, row["id"])
    ids, vectors = store.all_vectors()
    agree = _FingerprintCheck(store, ids) if max_distance is not None else None
    for start in range(0, len(ids), _CHUNK):
        limits, found = index.range_search(vectors[start : start + _CHUNK], threshold)
        chunk = ids[start : start + _CHUNK]
        queries = np.repeat(chunk, np.diff(limits))  # [pairs] the query id of each hit
        keep = found != queries
        if agree is not None:
            keep &= agree(queries, found, max_distance)
        for a, b in zip(queries[keep].tolist(), found[keep].tolist(), strict=True):
            _union(parent, a, b)
    members: dict[int, list[int]] = {}
    for row_id in list(parent):
        members.setdefault(_find(parent, row_id), []).append(row_id)
    groups = [sorted(group) for group in members.values() if len(group) > 1]
    if not groups:
        return []
    flat = [i for group in groups for i in group]
    rows = {row["id"]: row for row in store.rows(flat, columns=["id", "path", "width", "height", "taken_at"])}
    vector_of = dict(zip(flat, store.vectors_for(flat), strict=True))
    result = []
    for group in groups:
        ordered = sorted((rows[i] for i in group), key=_best_first)
        best = vector_of[ordered[0]["id"]]
        result.append(
            DuplicateGroup(
                [
                    DuplicateMember(
                        id=row["id"],
                        path=row["path"],
                        width=row["width"],
                        height=row["height"],
                        taken_at=row["taken_at"],
                        similarity=round(min(1.0, float(vector_of[row["id"]] @ best)), 6),
                    )
                    for row in ordered
                ]
            )
        )
    logger.info("%d duplicate groups holding %d images", len(result), len(flat))
    return sorted(result, key=lambda group: group.best.path)


class _FingerprintCheck:
    """Whether pairs of rows have fingerprints within a distance (pairs missing one pass: cosine alone)."""

    def __init__(self, store: Store, ids: np.ndarray) -> None:
        self._order = np.argsort(ids)
        self._ids = ids[self._order]
        if store.has_column("fingerprint"):
            column = store.rows(ids, columns=["fingerprint"])
            values = [row["fingerprint"] for row in column]
        else:
            values = [None] * len(ids)
        self._known = np.array([v is not None for v in values], bool)[self._order]
        self._prints = np.array([v or 0 for v in values], np.int64)[self._order]
        if not self._known.all():
            logger.info(
                "%d of %d images have no fingerprint yet (indexed by an older version); they are judged by the "
                "cosine alone until `clipsearch index` is run again on their folders",
                int((~self._known).sum()),
                len(ids),
            )

    def __call__(self, a: np.ndarray, b: np.ndarray, max_distance: int) -> np.ndarray:
        """[pairs] bool: the fingerprints of a[i] and b[i] are within `max_distance` bits, or one is missing."""
        i, j = np.searchsorted(self._ids, a), np.searchsorted(self._ids, b)
        close = distance(self._prints[i], self._prints[j]) <= max_distance
        return close | ~self._known[i] | ~self._known[j]


def pairs(groups: Sequence[DuplicateGroup]) -> set[frozenset[str]]:
    """Every pair of paths the groups join (for measuring pairwise precision and recall)."""
    out = set()
    for group in groups:
        paths = [m.path for m in group.members]
        out |= {frozenset((a, b)) for i, a in enumerate(paths) for b in paths[i + 1 :]}
    return out
